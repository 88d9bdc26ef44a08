"""The denoising loss against hand-computed values, for every prediction type and weighting."""

import math

import pytest
import torch

from retouch.losses import denoising_loss, loss_weight, noisy, prediction_target
from retouch.schedules import PREDICTION_TYPES, get_schedule, to_x0


def _case():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 2, generator=g, dtype=torch.float64)
    pred = torch.randn(3, 2, generator=g, dtype=torch.float64)
    return x0, eps, pred


def test_the_loss_equals_a_hand_computed_value_for_each_prediction_type():
    schedule = get_schedule("scaled_linear")
    t = torch.tensor([10.0, 500.0, 990.0])
    x0, eps, pred = _case()
    for kind in PREDICTION_TYPES:
        total = 0.0
        for b in range(3):
            a, s = schedule.coeffs(float(t[b]))
            target = {"epsilon": eps[b], "v_prediction": a * eps[b] - s * x0[b],
                      "sample": x0[b], "flow_prediction": eps[b] - x0[b]}[kind]
            total += float(((pred[b] - target) ** 2).mean())
        got = denoising_loss(pred, x0, eps, t, schedule, prediction_type=kind)
        assert float(got) == pytest.approx(total / 3, rel=1e-6), kind


def test_min_snr_weights_the_x0_error_by_min_snr_gamma_for_every_type():
    """The weighted error of each type equals ``min(SNR, gamma) |d x0|^2`` at the same x_t."""
    schedule = get_schedule("scaled_linear")
    t = torch.tensor([20.0, 300.0, 900.0])
    x0, eps, pred = _case()
    alpha, sigma = schedule.alpha_sigma(t)
    x_t = noisy(schedule, x0, eps, t)
    for kind in PREDICTION_TYPES:
        target = prediction_target(kind, x0, eps, alpha, sigma)
        w = loss_weight(kind, alpha, sigma, weighting="min_snr", gamma=5.0)
        d_pred = ((pred - target) ** 2).sum(1)
        d_x0 = ((to_x0(pred, x_t, alpha, sigma, kind) - x0) ** 2).sum(1)
        snr = (alpha / sigma) ** 2
        torch.testing.assert_close(w * d_pred, snr.clamp(max=5.0) * d_x0)
    # The paper's forms on a VP schedule: eps min(SNR, g)/SNR; v min(SNR, g)/(SNR + 1).
    snr = (alpha / sigma) ** 2
    torch.testing.assert_close(loss_weight("epsilon", alpha, sigma, weighting="min_snr"),
                               snr.clamp(max=5.0) / snr)
    torch.testing.assert_close(loss_weight("v_prediction", alpha, sigma, weighting="min_snr"),
                               snr.clamp(max=5.0) / (snr + 1))


def test_flow_schedule_and_bad_input():
    schedule = get_schedule("rectified_flow")
    x0, eps, pred = _case()
    t = torch.tensor([0.25, 0.5, 0.75])
    x_t = noisy(schedule, x0, eps, t)
    torch.testing.assert_close(x_t[1], 0.5 * x0[1] + 0.5 * eps[1])
    loss = denoising_loss(pred, x0, eps, t, schedule, prediction_type="flow_prediction")
    assert math.isfinite(float(loss))
    with pytest.raises(ValueError, match="one time per row"):
        denoising_loss(pred, x0, eps, t[:2], schedule)
    with pytest.raises(ValueError, match="sigma"):
        denoising_loss(pred, x0, eps, torch.tensor([0.0, 0.5, 0.5]), schedule)
    with pytest.raises(ValueError, match="unknown weighting"):
        denoising_loss(pred, x0, eps, t, schedule, weighting="snr")
