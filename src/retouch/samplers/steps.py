"""Solver steps as plain functions ``(denoiser, x, t, t_next, x0_hat, state) -> x_next``
(see :mod:`retouch.samplers` for the contract and the diffusers settings they reproduce)."""

from __future__ import annotations

import math

from torch import Tensor

from retouch.denoiser import Denoiser
from retouch.samplers.flow import flow_view
from retouch.samplers.state import (
    LOWER_ORDER_FINAL_STEPS,
    SamplerState,
    log_snr_at,
    usable_history,
)
from retouch.schedules import Schedule

__all__ = ["start_latents", "ddim_noise_scale", "ddim_step", "ddpm_step", "euler_step",
           "heun_step", "dpmpp_2m_step", "dpmpp_3m_step"]


def start_latents(schedule: Schedule, t: float, noise: Tensor) -> Tensor:
    """``x_T ~ N(0, alpha(t)^2 + sigma(t)^2)`` from standard ``noise``: N(0, 1) for VP, sigma
    alone for rectified flow at t = 1."""
    alpha, sigma = schedule.coeffs(t)
    return noise * (alpha**2 + sigma**2) ** 0.5


def ddim_noise_scale(schedule: Schedule, t: float, t_next: float, eta: float) -> float:
    """``c = eta sigma' sqrt(1 - e^{-2h})`` of :func:`ddim_step`, ``e^{-h} = alpha sigma' /
    (alpha' sigma)``: the std of the fresh noise a DDIM step with ``eta`` adds (0 at eta = 0
    and at the clean end)."""
    alpha, sigma = schedule.coeffs(t)
    alpha_n, sigma_n = schedule.coeffs(t_next)
    if eta == 0 or sigma_n == 0:
        return 0.0
    ratio = alpha * sigma_n / (alpha_n * sigma)
    return eta * sigma_n * math.sqrt(max(0.0, 1 - ratio**2))


def ddim_step(
    denoiser: Denoiser,
    x: Tensor,
    t: float,
    t_next: float,
    x0_hat: Tensor,
    state: SamplerState,
    *,
    eta: float = 0.0,
) -> Tensor:
    """DDIM: ``x' = alpha' x0 + sqrt(sigma'^2 - c^2) eps + c z``, ``c = eta sigma' sqrt(1-e^-2h)``.

    ``h = lambda' - lambda``; ``c`` is DDIM's ``sigma_t(eta)`` written for any schedule
    (the posterior std of ``q(x' | x, x0)`` times eta). eta = 0 is deterministic and
    invertible (``t_next > t`` allowed); ``z`` comes from ``state.draw_noise``.
    Shapes: x, x0_hat (B, ...). References: Song et al. 2021, eq. 12 and 16.
    """
    alpha, sigma = denoiser.schedule.coeffs(t)
    alpha_n, sigma_n = denoiser.schedule.coeffs(t_next)
    if sigma == 0:
        raise ValueError(f"cannot step from clean time t={t} (sigma = 0)")
    renoise = state.renoise  # CFG++: eps is the guidance's own, not (x - alpha x0_hat) / sigma
    if (eta == 0 or sigma_n == 0) and renoise is None:
        return (sigma_n / sigma) * x + (alpha_n - alpha * sigma_n / sigma) * x0_hat
    if t_next > t and eta != 0:
        raise ValueError("stochastic DDIM (eta > 0) cannot run with t_next > t (inversion)")
    c = ddim_noise_scale(denoiser.schedule, t, t_next, eta)
    eps_hat = (x - alpha * x0_hat) / sigma if renoise is None else renoise
    z = state.draw_noise(x) if eta != 0 and sigma_n != 0 else 0.0
    return alpha_n * x0_hat + math.sqrt(sigma_n**2 - c**2) * eps_hat + c * z


def ddpm_step(
    denoiser: Denoiser, x: Tensor, t: float, t_next: float, x0_hat: Tensor, state: SamplerState
) -> Tensor:
    """DDPM ancestral step: a draw from ``q(x' | x, x0_hat)``, i.e. DDIM with eta = 1.

    References: Ho et al. 2020, eq. 6-7 (posterior variance ``beta_tilde``).
    """
    return ddim_step(denoiser, x, t, t_next, x0_hat, state, eta=1.0)


ddim_step.renoises = ddpm_step.renoises = True  # they take a Prediction's own eps


def euler_step(
    denoiser: Denoiser, x: Tensor, t: float, t_next: float, x0_hat: Tensor, state: SamplerState
) -> Tensor:
    """Euler on the probability-flow ODE ``dz/dtau = (z - x0_hat) / tau`` (flow view).

    ``z = x / (alpha + sigma)``, ``tau = sigma / (alpha + sigma)``. Algebraically equal to
    DDIM (eta = 0) and to k-diffusion's Euler on ``dy/ds = (y - x0)/s``, ``s = sigma/alpha``.
    References: Karras et al. 2022, Alg. 1 (first stage); Liu et al. 2023.
    """
    c, tau = flow_view(denoiser.schedule, t)
    c_n, tau_n = flow_view(denoiser.schedule, t_next)
    z = x / c
    return c_n * (z + (tau_n - tau) * (z - x0_hat) / tau)


def heun_step(
    denoiser: Denoiser, x: Tensor, t: float, t_next: float, x0_hat: Tensor, state: SamplerState
) -> Tensor:
    """Heun (2nd order) on ``dz/dtau = (z - x0_hat)/tau``; Euler when ``t_next`` is clean.

    Costs a second denoiser call at ``t_next`` (2 NFE per step, 1 on a last step to clean).
    Written in the flow view so it also starts from ``alpha = 0`` (flow ``t = 1``); for VP it
    differs from diffusers' Heun (which works on ``y = x/alpha``) at second order only.
    References: Karras et al. 2022, Alg. 1.
    """
    c, tau = flow_view(denoiser.schedule, t)
    c_n, tau_n = flow_view(denoiser.schedule, t_next)
    z = x / c
    d = (z - x0_hat) / tau
    z_euler = z + (tau_n - tau) * d
    if tau_n == 0:
        return c_n * z_euler
    d_next = (z_euler - denoiser(c_n * z_euler, t_next)) / tau_n
    return c_n * (z + (tau_n - tau) * (d + d_next) / 2)


def _dpmpp_order(denoiser, state, t_next, lam, order, lower_order_final) -> tuple[int, list]:
    hist = usable_history(denoiser, state.history, lam, order - 1)
    order = 1 + len(hist)
    if denoiser.schedule.coeffs(t_next)[1] == 0:
        order = 1  # lambda' = inf: the step to clean is x' = x0_hat whatever the order
    if lower_order_final and len(state.times) - 1 < LOWER_ORDER_FINAL_STEPS:
        order = min(order, state.steps_left)  # diffusers: 1st order last, <= 2nd before it
    return order, hist


def _dpmpp_step(
    denoiser, x, t, t_next, x0_hat, state, *, order: int, lower_order_final: bool
) -> Tensor:
    alpha, sigma = denoiser.schedule.coeffs(t)
    alpha_n, sigma_n = denoiser.schedule.coeffs(t_next)
    if sigma == 0:
        raise ValueError(f"cannot step from clean time t={t} (sigma = 0)")
    lam, lam_n = log_snr_at(denoiser, t), log_snr_at(denoiser, t_next)
    h = lam_n - lam
    order, hist = _dpmpp_order(denoiser, state, t_next, lam, order, lower_order_final)
    phi_1 = -math.expm1(-h)  # 1 - e^{-h}
    x_next = (sigma_n / sigma) * x + (alpha_n * phi_1) * x0_hat
    if order == 1:
        return x_next
    (lam_1, m1), m0 = hist[0], x0_hat
    r0 = (lam - lam_1) / h
    d1_0 = (m0 - m1) / r0
    if order == 2:  # midpoint form, as diffusers' solver_type="midpoint"
        return x_next + (0.5 * alpha_n * phi_1) * d1_0
    lam_2, m2 = hist[1]
    r1 = (lam_1 - lam_2) / h
    d1_1 = (m1 - m2) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    phi_2 = phi_1 / h - 1  # = -((e^{-h} - 1)/h + 1)
    phi_3 = (h - phi_1) / h**2 - 0.5  # = (e^{-h} - 1 + h)/h^2 - 1/2
    return x_next - alpha_n * phi_2 * d1 - alpha_n * phi_3 * d2


def dpmpp_2m_step(
    denoiser: Denoiser,
    x: Tensor,
    t: float,
    t_next: float,
    x0_hat: Tensor,
    state: SamplerState,
    *,
    lower_order_final: bool = True,
) -> Tensor:
    """DPM-Solver++(2M): ``x' = (sigma'/sigma) x + alpha' (1 - e^{-h}) D``, ``h = lambda'-lambda``.

    ``D = (1 + 1/(2r)) x0_hat - 1/(2r) x0_hat_prev``, ``r = h_prev / h`` (first order on the
    first step, on a step to clean and, below 15 steps, on the last one, as diffusers).
    References: Lu et al. 2022, "DPM-Solver++", Alg. 2.
    """
    return _dpmpp_step(
        denoiser, x, t, t_next, x0_hat, state, order=2, lower_order_final=lower_order_final
    )


def dpmpp_3m_step(
    denoiser: Denoiser,
    x: Tensor,
    t: float,
    t_next: float,
    x0_hat: Tensor,
    state: SamplerState,
    *,
    lower_order_final: bool = True,
) -> Tensor:
    """DPM-Solver++(3M): third-order multistep data-prediction solver in ``lambda``.

    Adds ``-alpha' phi_2 D1 - alpha' phi_3 D2`` from divided differences of the last three
    ``x0_hat``; warms up through orders 1 and 2. References: Lu et al. 2022, "DPM-Solver++",
    App. B (3rd-order multistep); diffusers ``multistep_dpm_solver_third_order_update``.
    """
    return _dpmpp_step(
        denoiser, x, t, t_next, x0_hat, state, order=3, lower_order_final=lower_order_final
    )


