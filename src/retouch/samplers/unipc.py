"""UniPC: unified predictor-corrector multistep solver (data prediction, B(h) variants).

One step function in the :mod:`retouch.samplers` contract. At step ``i`` the corrector UniC
first refines the latent the model was just evaluated at, using the new ``x0_hat`` (no extra
NFE), then the predictor UniP moves to ``t_next``. The correction is added as an increment
to the current latent, so a callback's replacement of ``x`` after step ``i - 1`` survives.

Settings matching diffusers' ``UniPCMultistepScheduler``: ``order=solver_order``,
``variant=solver_type``, ``predict_x0=True``, ``disable_corrector=[]``, grid
``convention="multistep"``.

References: Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast
Sampling of Diffusion Models", Alg. 2-3 (UniP-p, UniC-p with B(h) = h or e^h - 1).
"""

from __future__ import annotations

import math

import numpy as np
from torch import Tensor

from retouch.denoiser import Denoiser
from retouch.samplers.state import SamplerState, log_snr_at, usable_history

__all__ = ["unipc_step"]

_VARIANTS = ("bh1", "bh2")


def _coefficients(h: float, rks: list[float], order: int, variant: str):
    """``h phi_1``, ``B(h)`` and the order conditions ``R rho = b`` of UniPC (in -h, x0 form)."""
    hh = -h
    h_phi_1 = math.expm1(hh)  # e^{-h} - 1
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if variant == "bh1" else math.expm1(hh)
    rows, b, factorial = [], [], 1
    r = np.asarray(rks, dtype=np.float64)
    for k in range(1, order + 1):
        rows.append(r ** (k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, b_h, np.stack(rows), np.asarray(b)


def _update(
    denoiser: Denoiser,
    x: Tensor,
    t: float,
    t_next: float,
    m0: Tensor,
    past: list[tuple[float, Tensor]],
    *,
    m_next: Tensor | None,
    variant: str,
) -> Tensor:
    """UniP (``m_next`` None) or UniC from ``(x, t)`` with ``m0 = x0_hat(t)`` and ``past``
    ``(lambda_k, x0_hat_k)`` newest first; order = ``len(past) + 1``."""
    alpha, sigma = denoiser.schedule.coeffs(t)
    alpha_n, sigma_n = denoiser.schedule.coeffs(t_next)
    lam = log_snr_at(denoiser, t)
    h = log_snr_at(denoiser, t_next) - lam
    rks = [(lam_k - lam) / h for lam_k, _ in past] + [1.0]
    d1s = [(m_k - m0) / rk for rk, (_, m_k) in zip(rks, past, strict=False)]
    order = len(past) + 1
    h_phi_1, b_h, big_r, b = _coefficients(h, rks, order, variant)
    x_next = (sigma_n / sigma) * x - (alpha_n * h_phi_1) * m0
    if m_next is None:  # predictor UniP-p uses the first order - 1 conditions
        if order == 1:
            return x_next
        rhos = [0.5] if order == 2 else np.linalg.solve(big_r[:-1, :-1], b[:-1]).tolist()
        return x_next - (alpha_n * b_h) * sum(r * d for r, d in zip(rhos, d1s, strict=True))
    rhos = [0.5] if order == 1 else np.linalg.solve(big_r, b).tolist()
    res = rhos[-1] * (m_next - m0)
    for r, d in zip(rhos[:-1], d1s, strict=True):
        res = res + r * d
    return x_next - (alpha_n * b_h) * res


def unipc_step(
    denoiser: Denoiser,
    x: Tensor,
    t: float,
    t_next: float,
    x0_hat: Tensor,
    state: SamplerState,
    *,
    order: int = 2,
    variant: str = "bh2",
    lower_order_final: bool = True,
) -> Tensor:
    """UniC-p correction of ``x`` with the fresh ``x0_hat``, then a UniP-p step to ``t_next``.

    ``order`` p warms up from 1; with ``lower_order_final`` it is at most the number of steps
    left (diffusers' rule), and it is 1 on a step to clean. Shapes: x, x0_hat (B, ...).
    References: Zhao et al. 2023, Alg. 2-3.
    """
    if variant not in _VARIANTS:
        raise ValueError(f"unknown UniPC variant {variant!r}; valid: {', '.join(_VARIANTS)}")
    if denoiser.schedule.coeffs(t)[1] == 0:
        raise ValueError(f"cannot step from clean time t={t} (sigma = 0)")
    memo = state.scratch.get("unipc")
    if memo is not None and memo["index"] == state.index - 1 and state.history:
        t_prev, m_prev = state.history[-1]
        past = usable_history(
            denoiser, state.history[:-1], log_snr_at(denoiser, t_prev), memo["order"] - 1
        )
        x_corr = _update(
            denoiser, memo["x"], t_prev, t, m_prev, past, m_next=x0_hat, variant=variant
        )
        x = x + (x_corr - memo["x_pred"])
    lam = log_snr_at(denoiser, t)
    p = min(order, state.index + 1)
    if lower_order_final:
        p = min(p, state.steps_left)
    if denoiser.schedule.coeffs(t_next)[1] == 0:
        p = 1
    past = usable_history(denoiser, state.history, lam, p - 1)
    x_pred = _update(denoiser, x, t, t_next, x0_hat, past, m_next=None, variant=variant)
    state.scratch["unipc"] = {
        "index": state.index,
        "x": x,
        "x_pred": x_pred,
        "order": len(past) + 1,
    }
    return x_pred
