"""Guidance (CFG, null-text, dual, CFG++, loss guidance): exact identities on the analytic GMM.

The conditional model is exact (:class:`~retouch.analytic.ClassConditionalGMM`): ``label = 1``
is the denoiser of the mixture's first two components (the "class"), ``label = 0`` that of
the whole mixture (the unconditional model).
"""

import pytest
import torch

from retouch.analytic import ClassConditionalGMM, GaussianMixture
from retouch.attention import attention_control
from retouch.attention.sites import BatchLayout, guidance_halves
from retouch.denoiser import CountedDenoiser, Prediction, halves_of
from retouch.grids import log_snr_grid
from retouch.guidance import (
    CFGDenoiser,
    CFGPlusPlus,
    DualGuidance,
    LossGuidance,
    NullTextGuidance,
    combine,
)
from retouch.samplers import ddim_step, get_step, sample
from retouch.schedules import get_schedule


def Labelled(schedule):  # noqa: N802 (reads as the class it makes)
    """``D(x, t | label)``: the class-conditional exact denoiser (label 1) or the full one (0)."""
    return ClassConditionalGMM(GaussianMixture.random(dim=8, components=6, seed=3), schedule)


SCHEDULE = get_schedule("scaled_linear")
COND, UNCOND = {"label": torch.ones(1)}, {"label": torch.zeros(1)}


def _x():
    return torch.randn(16, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_cfg_combines_the_branches_in_one_call():
    inner = CountedDenoiser(Labelled(SCHEDULE))
    x = _x()
    cfg = CFGDenoiser(inner, cond=COND, uncond=UNCOND, scale=4.0)
    out = cfg(x, 500.0)
    assert inner.calls == 1
    lab = Labelled(SCHEDULE)
    expected = combine(lab(x, 500.0, label=torch.zeros(1)), lab(x, 500.0, label=torch.ones(1)), 4.)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_cfgpp_at_zero_is_unconditional_ddim_and_with_equal_branches_is_plain_ddim():
    inner, x = Labelled(SCHEDULE), _x()
    times = log_snr_grid(SCHEDULE, 11, final=0.0)
    uncond_only = sample(inner_branch(inner, UNCOND), x, times, progress=False)
    cfgpp0 = sample(CFGPlusPlus(inner, cond=COND, uncond=UNCOND, scale=0.0), x, times,
                    progress=False)
    torch.testing.assert_close(cfgpp0, uncond_only, rtol=0, atol=1e-12)
    plain = sample(inner_branch(inner, COND), x, times, progress=False)
    same = sample(CFGPlusPlus(inner, cond=COND, uncond=COND, scale=0.6), x, times,
                  progress=False)
    torch.testing.assert_close(same, plain, rtol=0, atol=1e-12)


def test_cfgpp_renoises_with_the_unconditional_noise():
    """One DDIM step of CFG++: ``x' = alpha' x0_lambda + sigma' eps_u`` (Chung et al., Alg. 1)."""
    inner, x, t, t_next = Labelled(SCHEDULE), _x(), 600.0, 300.0
    pred = CFGPlusPlus(inner, cond=COND, uncond=UNCOND, scale=0.4)(x, t)
    assert isinstance(pred, Prediction)
    x0_u, x0_c = inner(x, t, label=torch.zeros(1)), inner(x, t, label=torch.ones(1))
    alpha, sigma = SCHEDULE.coeffs(t)
    alpha_n, sigma_n = SCHEDULE.coeffs(t_next)
    eps_u = (x - alpha * x0_u) / sigma
    want = alpha_n * (x0_u + 0.4 * (x0_c - x0_u)) + sigma_n * eps_u
    got = sample(CFGPlusPlus(inner, cond=COND, uncond=UNCOND, scale=0.4), x, [t, t_next],
                 progress=False)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # CFG's step with the same x0 renoises with eps derived from x0_lambda: another point.
    cfg = sample(CFGDenoiser(inner, cond=COND, uncond=UNCOND, scale=0.4), x, [t, t_next],
                 progress=False)
    assert (cfg - got).abs().max() > 1e-3


def test_cfgpp_refuses_what_it_cannot_do():
    inner = Labelled(SCHEDULE)
    with pytest.raises(ValueError, match=r"lambda in \[0, 1\], got 7.5"):
        CFGPlusPlus(inner, cond=COND, uncond=UNCOND, scale=7.5)
    guided = CFGPlusPlus(inner, cond=COND, uncond=UNCOND, scale=0.5)
    with pytest.raises(ValueError, match="euler_step step cannot take; use the ddim or ddpm"):
        sample(guided, _x(), log_snr_grid(SCHEDULE, 4, final=0.0), step=get_step("euler"),
               progress=False)


def inner_branch(inner, cond):
    class Branch:
        schedule = inner.schedule

        def __call__(self, x, t):
            return inner(x, t, **cond)

    return Branch()


def test_dual_guidance_is_the_instructpix2pix_combination():
    inner, x, t = Labelled(SCHEDULE), _x(), 400.0
    half = {"label": torch.full((1,), 0.5)}
    dual = DualGuidance(inner, uncond=UNCOND, image=half, full=COND, image_scale=1.5,
                        text_scale=7.0)
    assert dual.halves == ("uncond", "image", "cond")
    u, i, f = (inner(x, t, **c) for c in (UNCOND, half, COND))
    torch.testing.assert_close(dual(x, t), u + 1.5 * (i - u) + 7.0 * (f - i), rtol=1e-12,
                               atol=1e-12)
    one = DualGuidance(inner, uncond=UNCOND, image=half, full=COND, image_scale=1.0,
                       text_scale=1.0)
    torch.testing.assert_close(one(x, t), f, rtol=1e-12, atol=1e-12)


def test_null_text_guidance_uses_each_steps_embedding():
    class Emb:
        schedule = SCHEDULE

        def __call__(self, x, t, *, encoder_hidden_states):
            return x * encoder_hidden_states.reshape(-1, 1)

    times = [900.0, 500.0, 100.0]
    cond, nulls = torch.full((1,), 2.0), [torch.full((1,), 0.5), torch.full((1,), 1.0)]
    guide = NullTextGuidance(Emb(), cond=cond, embeddings=nulls, times=times, scale=3.0)
    x = _x()
    for k, t in enumerate(times[:-1]):
        torch.testing.assert_close(guide(x, t), combine(x * nulls[k], x * 2.0, 3.0))
    with pytest.raises(ValueError, match="2 null embeddings for 1 steps"):
        NullTextGuidance(Emb(), cond=cond, embeddings=nulls, times=times[:2], scale=3.0)


def test_loss_guidance_moves_x0_against_the_energy_gradient():
    """A linear denoiser ``x0 = c x`` and ``E = |x0 - y|^2 / 2``: ``grad_x E = c (c x - y)``."""

    class Linear:
        schedule = SCHEDULE

        def __call__(self, x, t):
            return 0.7 * x

    x, y, t, w = _x(), torch.ones(16, 8, dtype=torch.float64), 500.0, 0.3
    guided = LossGuidance(Linear(), lambda x0, xt, t: 0.5 * (x0 - y).pow(2).sum(), scale=w)
    alpha, sigma = SCHEDULE.coeffs(t)
    with torch.no_grad():
        out = guided(x, t)
    want = 0.7 * x - w * (sigma**2 / alpha) * 0.7 * (0.7 * x - y)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    off = LossGuidance(Linear(), lambda x0, xt, t: x0.sum(), scale=lambda t: 0.0)
    torch.testing.assert_close(off(x, t), 0.7 * x)


def test_every_guidance_says_its_halves_through_wrappers():
    inner = Labelled(SCHEDULE)
    cfg = CFGDenoiser(inner, cond=COND, uncond=UNCOND, scale=2.0)
    assert halves_of(cfg) == ("uncond", "cond")
    assert halves_of(CountedDenoiser(cfg)) == ("uncond", "cond")
    assert halves_of(LossGuidance(cfg, lambda *a: a[0].sum(), scale=1.0)) == ("uncond", "cond")
    assert halves_of(inner) == ("cond",)
    with pytest.raises(ValueError, match="one batched call"):
        halves_of(CFGDenoiser(inner, cond=COND, uncond=UNCOND, scale=2.0, batched=False))

    unet = _tiny_unet()
    with attention_control(unet, [], layout=BatchLayout(("image",))) as session:
        wrapped = session.denoiser(CountedDenoiser(cfg), [1.0, 0.0])
        assert guidance_halves(wrapped) == ("uncond", "cond")


def _tiny_unet():
    from tiny_models import tiny_unet

    return tiny_unet("sd1")


def test_ddim_step_without_a_prediction_is_unchanged():
    """The renoise path does not touch plain DDIM: the step equals its closed form."""
    inner, x, t, t_next = Labelled(SCHEDULE), _x(), 700.0, 350.0
    x0 = inner(x, t, label=torch.ones(1))
    from retouch.samplers import SamplerState

    got = ddim_step(inner_branch(inner, COND), x, t, t_next, x0, SamplerState(times=[t, t_next]))
    alpha, sigma = SCHEDULE.coeffs(t)
    alpha_n, sigma_n = SCHEDULE.coeffs(t_next)
    torch.testing.assert_close(got, alpha_n * x0 + sigma_n * (x - alpha * x0) / sigma)


def test_cfgpp_ddim_step_is_cfg_with_weight_lambda_over_one_minus_decay():
    """Exact identity behind `bench guidance`: a CFG++ DDIM step equals a CFG DDIM step with
    ``w = lambda / (1 - e^{-h})``, ``e^{-h} = alpha sigma' / (alpha' sigma)``."""
    from retouch.bench.guidance import effective_weights

    inner, x, t, t_next = Labelled(SCHEDULE), _x(), 600.0, 300.0
    (w,) = effective_weights(SCHEDULE, [t, t_next], 0.4)
    pp = sample(CFGPlusPlus(inner, cond=COND, uncond=UNCOND, scale=0.4), x, [t, t_next],
                progress=False)
    cfg = sample(CFGDenoiser(inner, cond=COND, uncond=UNCOND, scale=w), x, [t, t_next],
                 progress=False)
    torch.testing.assert_close(pp, cfg, rtol=1e-10, atol=1e-10)


def test_loss_guidance_keeps_a_cfgpp_noise():
    inner, x = Labelled(SCHEDULE), _x()
    pp = CFGPlusPlus(inner, cond=COND, uncond=UNCOND, scale=0.5)
    out = LossGuidance(pp, lambda x0, xt, t: 0.0 * x0.sum(), scale=1.0)(x, 500.0)
    assert isinstance(out, Prediction)
    torch.testing.assert_close(out.eps, pp(x, 500.0).eps)
    torch.testing.assert_close(out.x0, pp(x, 500.0).x0)


def test_a_session_refuses_a_denoiser_with_other_halves():
    cfg = CFGDenoiser(Labelled(SCHEDULE), cond=COND, uncond=UNCOND, scale=2.0)
    with attention_control(_tiny_unet(), [], layout=BatchLayout(("a", "b"), ("cond",))) as s:
        with pytest.raises(ValueError, match=r"stacks its rows as \('uncond', 'cond'\)"):
            s.denoiser(cfg, [1.0, 0.0])
