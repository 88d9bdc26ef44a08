"""The one denoising loss: a time per batch row, any prediction type, uniform or min-SNR weights.

For ``x_t = alpha(t) x0 + sigma(t) eps`` the network's target is the prediction type's view of
``(x0, eps)``: ``eps``; ``v = alpha eps - sigma x0``; ``x0`` itself; the flow velocity
``u = eps - x0``. Every type's squared error is a multiple of the ``x0`` error at the same
``x_t``, ``|d pred|^2 = c(t) |d x0|^2`` with ``c = (alpha / sigma)^2`` (eps),
``((alpha^2 + sigma^2) / sigma)^2`` (v), ``1`` (x0) and ``((alpha + sigma) / sigma)^2`` (flow),
so min-SNR-gamma -- weight ``min(SNR, gamma)`` on the ``x0`` error, ``SNR = (alpha / sigma)^2``
-- is ``min(SNR, gamma) / c`` on the prediction's error: ``min(SNR, gamma) / SNR`` for eps and
``min(SNR, gamma) / (SNR + 1)`` for v on a VP schedule, as in the paper.

Used by ToyWorld training, and to be used by personalization, control adapters and score
distillation. References: Ho et al. 2020 (eps loss); Salimans & Ho 2022 (v); Liu et al. 2023
(rectified flow); Hang et al. 2023 ("Efficient Diffusion Training via Min-SNR Weighting").
"""

from __future__ import annotations

import torch
from torch import Tensor

from retouch.schedules import PREDICTION_TYPES, Schedule

__all__ = ["WEIGHTINGS", "noisy", "prediction_target", "loss_weight", "denoising_loss"]

#: Per-row loss weightings.
WEIGHTINGS = ("uniform", "min_snr")


def _per_row(c: Tensor, like: Tensor) -> Tensor:
    return c.to(like).view(-1, *([1] * (like.ndim - 1)))


def noisy(schedule: Schedule, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """``x_t = alpha(t) x0 + sigma(t) eps`` with one time per row. Shapes: x0, eps (B, ...);
    t (B,) model times of ``schedule``."""
    alpha, sigma = schedule.alpha_sigma(t)
    return _per_row(alpha, x0) * x0 + _per_row(sigma, x0) * eps


def prediction_target(kind: str, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """What a network of prediction type ``kind`` should output at ``alpha x0 + sigma eps``;
    ``alpha``, ``sigma`` (B,)."""
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {kind!r}; valid: {', '.join(PREDICTION_TYPES)}")
    a, s = _per_row(alpha, x0), _per_row(sigma, x0)
    if kind == "epsilon":
        return eps
    if kind == "v_prediction":
        return a * eps - s * x0
    if kind == "sample":
        return x0
    return eps - x0  # flow_prediction


def loss_weight(kind: str, alpha: Tensor, sigma: Tensor, *, weighting: str = "uniform",
                gamma: float = 5.0) -> Tensor:
    """Per-row weight (B,) of the prediction's squared error (see the module doc)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")
    if weighting == "uniform":
        return torch.ones_like(alpha)
    if not gamma > 0:
        raise ValueError(f"min-SNR needs gamma > 0, got {gamma}")
    snr = (alpha / sigma) ** 2
    scale = {"epsilon": snr, "v_prediction": ((alpha**2 + sigma**2) / sigma) ** 2,
             "sample": torch.ones_like(snr), "flow_prediction": ((alpha + sigma) / sigma) ** 2}
    if kind not in scale:
        raise ValueError(f"unknown prediction type {kind!r}; valid: {', '.join(PREDICTION_TYPES)}")
    return snr.clamp(max=gamma) / scale[kind]


def denoising_loss(
    prediction: Tensor,
    x0: Tensor,
    eps: Tensor,
    t: Tensor,
    schedule: Schedule,
    *,
    prediction_type: str = "epsilon",
    weighting: str = "uniform",
    gamma: float = 5.0,
) -> Tensor:
    """``mean_b w_b mean |prediction_b - target_b|^2``: the network's output at
    ``noisy(schedule, x0, eps, t)`` against its target. Shapes: prediction, x0, eps (B, ...);
    t (B,) model times (sigma(t) > 0). Returns a scalar."""
    if t.ndim != 1 or t.shape[0] != x0.shape[0]:
        raise ValueError(f"t must hold one time per row, (B,) = ({x0.shape[0]},), got "
                         f"{tuple(t.shape)}")
    alpha, sigma = schedule.alpha_sigma(t)
    if bool((sigma == 0).any()):
        raise ValueError("the loss needs sigma(t) > 0 for every row (no clean times)")
    target = prediction_target(prediction_type, x0, eps, alpha, sigma)
    w = loss_weight(prediction_type, alpha, sigma, weighting=weighting, gamma=gamma)
    dtype = torch.promote_types(prediction.dtype, torch.float32)  # half precision upcast
    per_row = (prediction.to(dtype) - target.to(dtype)).pow(2).flatten(1).mean(1)
    return (w.to(per_row) * per_row).mean()
