"""Solver steps as plain functions over the denoiser contract, and the one sampling loop.

A step maps ``(denoiser, x, t, t_next, x0_hat, state) -> x_next``: ``x0_hat = denoiser(x, t)``
was computed by the loop; ``state`` (:class:`SamplerState`, owned by the loop) holds the grid,
the step index, the recent ``(t, x0_hat)`` history of multistep solvers and the noise source
of stochastic ones. Steps are written on ``alpha``, ``sigma`` and ``lambda = log(alpha/sigma)``
so one formula serves VP and rectified-flow schedules, and deterministic steps work with time
running either way (``t_next > t`` is inversion). Only Heun calls the denoiser again (at
``t_next``; its second call is not shown to callbacks).

Settings that reproduce diffusers schedulers (parity-tested in ``tests/test_diffusers_parity.py``;
grids from :func:`retouch.grids.discrete_grid`, ``final`` defaults to clean):

=================================================  ==============================================
diffusers                                          retouch
=================================================  ==============================================
``DDIMScheduler(eta=0)``, ``set_alpha_to_one=True`` ``ddim_step``; ``discrete_grid(spacing=...,
                                                   steps_offset=..., convention="ddim")``
``set_alpha_to_one=False``                         same, ``final=0``
``DDIMScheduler`` ``eta>0`` / ``variance_noise``   ``partial(ddim_step, eta=...)``; ``sample(...,
                                                   noises=[...])``
``DDPMScheduler`` (``fixed_small``)                ``ddpm_step`` (= DDIM with eta = 1)
``EulerDiscreteScheduler``                         ``euler_step``, ``convention="euler"``
                                                   (start from ``x_T = x_ve * alpha(t_0)``)
``HeunDiscreteScheduler``                          ``heun_step`` (same ODE, other coordinates)
``DPMSolverMultistepScheduler`` (``dpmsolver++``,   ``dpmpp_2m_step`` / ``dpmpp_3m_step``,
``midpoint``, order 2 / 3, ``lower_order_final``)  ``convention="multistep"``
``UniPCMultistepScheduler`` (``bh2``/``bh1``)      ``unipc_step`` (``unipc.py``)
``final_sigmas_type="sigma_min"``                  ``final=0``
=================================================  ==============================================

``clip_sample``/``thresholding`` are not supported (SD configs disable them). diffusers' DDIM
always steps from ``t`` to ``t - T // N``; that is the next grid entry for ``leading`` spacing
and for ``trailing`` when N divides T, but not for ``linspace`` — retouch steps along the grid.

References: Song et al. 2021 (DDIM); Ho et al. 2020 (DDPM); Karras et al. 2022 (EDM, Heun);
Lu et al. 2022 (DPM-Solver++); Zhao et al. 2023 (UniPC).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from retouch.denoiser import Denoiser, Prediction
from retouch.schedules import Schedule

__all__ = [
    "SAMPLERS",
    "ddim_noise_scale",
    "start_latents",
    "SamplerState",
    "StepContext",
    "Step",
    "ddim_step",
    "ddpm_step",
    "euler_step",
    "heun_step",
    "dpmpp_2m_step",
    "dpmpp_3m_step",
    "get_step",
    "check_grid",
    "sample",
]

#: diffusers' DPM-Solver/UniPC ``lower_order_final`` applies below this many steps.
LOWER_ORDER_FINAL_STEPS = 15
#: How many past ``(t, x0_hat)`` pairs the loop keeps for multistep solvers.
HISTORY_LEN = 3


@dataclass
class SamplerState:
    """Per-run memory the loop owns and passes to every step."""

    times: list[float]  # the whole time grid, t_0 ... t_N
    index: int = 0  # current step i (from times[i] to times[i + 1])
    history: list[tuple[float, Tensor]] = field(default_factory=list)  # past (t_j, x0_hat_j)
    generator: torch.Generator | None = None  # randomness of stochastic steps
    noises: Sequence[Tensor | None] | None = None  # caller-supplied noise per step, or None
    noise: Tensor | None = None  # noise the current step injected (set by stochastic steps)
    renoise: Tensor | None = None  # eps the step must renoise with (a guided Prediction's)
    scratch: dict[str, Any] = field(default_factory=dict)  # a step function's own memory

    @property
    def steps_left(self) -> int:
        """Steps remaining including the current one."""
        return len(self.times) - 1 - self.index

    def draw_noise(self, like: Tensor) -> Tensor:
        """The supplied noise for this step, else ``N(0, I)`` from ``generator``; recorded."""
        z = self.noises[self.index] if self.noises is not None else None
        if z is None:
            z = torch.randn(like.shape, generator=self.generator, dtype=like.dtype, device="cpu")
        self.noise = z.to(device=like.device, dtype=like.dtype)
        return self.noise


@dataclass
class StepContext:
    """What a callback sees after step ``i``; it may return a replacement for ``x``."""

    i: int  # step index
    t: float  # time the model was evaluated at
    t_next: float  # time of ``x``
    x: Tensor  # latent after the step (at t_next), shape (B, ...)
    x_prev: Tensor  # latent the model saw (at t)
    x0_hat: Tensor  # denoiser output at (x_prev, t)
    noise: Tensor | None  # noise injected by a stochastic step, else None
    denoiser: Denoiser

    @property
    def eps_hat(self) -> Tensor:
        """The model output in eps form, ``(x_prev - alpha x0_hat) / sigma``."""
        alpha, sigma = self.denoiser.schedule.coeffs(self.t)
        return (self.x_prev - alpha * self.x0_hat) / sigma


Step = Callable[[Denoiser, Tensor, float, float, Tensor, SamplerState], Tensor]


def _lam(denoiser: Denoiser, t: float) -> float:
    return float(denoiser.schedule.log_snr(t))


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


def _flow_view(denoiser: Denoiser, t: float) -> tuple[float, float]:
    """``(c, tau)`` with ``z = x / c = (1 - tau) x0 + tau eps``: any schedule seen as a flow."""
    alpha, sigma = denoiser.schedule.coeffs(t)
    return alpha + sigma, sigma / (alpha + sigma)


def euler_step(
    denoiser: Denoiser, x: Tensor, t: float, t_next: float, x0_hat: Tensor, state: SamplerState
) -> Tensor:
    """Euler on the probability-flow ODE ``dz/dtau = (z - x0_hat) / tau`` (flow view).

    ``z = x / (alpha + sigma)``, ``tau = sigma / (alpha + sigma)``. Algebraically equal to
    DDIM (eta = 0) and to k-diffusion's Euler on ``dy/ds = (y - x0)/s``, ``s = sigma/alpha``.
    References: Karras et al. 2022, Alg. 1 (first stage); Liu et al. 2023.
    """
    c, tau = _flow_view(denoiser, t)
    c_n, tau_n = _flow_view(denoiser, t_next)
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
    c, tau = _flow_view(denoiser, t)
    c_n, tau_n = _flow_view(denoiser, t_next)
    z = x / c
    d = (z - x0_hat) / tau
    z_euler = z + (tau_n - tau) * d
    if tau_n == 0:
        return c_n * z_euler
    d_next = (z_euler - denoiser(c_n * z_euler, t_next)) / tau_n
    return c_n * (z + (tau_n - tau) * (d + d_next) / 2)


def _usable_history(denoiser: Denoiser, history: list, lam: float, k: int) -> list:
    """Up to ``k`` most recent ``(lambda_j, x0_hat_j)`` of ``history``, newest first, while the
    log-SNR gaps to ``lam`` stay finite and non-zero."""
    out = []
    for t_j, x0_j in reversed(history[-k:] if k > 0 else []):
        lam_j = _lam(denoiser, t_j)
        if not (math.isfinite(lam_j) and math.isfinite(lam) and lam_j != lam):
            break
        out.append((lam_j, x0_j))
    return out


def _dpmpp_order(denoiser, state, t_next, lam, order, lower_order_final) -> tuple[int, list]:
    hist = _usable_history(denoiser, state.history, lam, order - 1)
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
    lam, lam_n = _lam(denoiser, t), _lam(denoiser, t_next)
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


def check_grid(times: Sequence[float] | Tensor, *, inverse: bool = False) -> list[float]:
    """Validate a time grid: >= 2 finite times, strictly decreasing (increasing if ``inverse``)."""
    ts = [float(t) for t in (times.tolist() if isinstance(times, Tensor) else times)]
    if len(ts) < 2:
        raise ValueError(f"a time grid needs at least 2 times (NFE >= 1), got {len(ts)}")
    for i, (a, b) in enumerate(zip(ts[:-1], ts[1:], strict=True)):
        if not (math.isfinite(a) and math.isfinite(b)):
            raise ValueError(f"non-finite time at grid index {i}: {a} -> {b}")
        if (b <= a) if inverse else (b >= a):
            word = "increasing (inversion)" if inverse else "decreasing (sampling)"
            raise ValueError(
                f"time grid must be strictly {word}; times[{i}]={a}, times[{i + 1}]={b}"
            )
    return ts


def sample(
    denoiser: Denoiser,
    x: Tensor,
    times: Sequence[float] | Tensor,
    *,
    step: Step = ddim_step,
    callbacks: Sequence[Callable[[StepContext], Tensor | None]] = (),
    progress: bool = True,
    inverse: bool = False,
    noises: Sequence[Tensor | None] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Run ``step`` along ``times`` from ``x`` at ``times[0]``; return ``x`` at ``times[-1]``.

    Each step: ``x0_hat = denoiser(x, t_i)``, ``x = step(...)``, then every callback sees a
    :class:`StepContext` and may return a new ``x`` (or None). ``inverse=True`` runs time
    upwards (deterministic steps only). ``noises[i]`` (if given) is the noise a stochastic
    step injects at step i (edit-friendly DDPM); otherwise it is drawn from ``generator`` and
    shown to callbacks as ``ctx.noise``. Raises FloatingPointError naming the step if the
    latent becomes non-finite. Shapes: x (B, ...).
    """
    ts = check_grid(times, inverse=inverse)
    if noises is not None and len(noises) != len(ts) - 1:
        raise ValueError(f"noises has {len(noises)} entries for {len(ts) - 1} steps")
    if not _finite(x):
        raise ValueError("the start latent holds NaN or Inf values; pass finite values")
    state = SamplerState(times=ts, generator=generator, noises=noises)
    for i in tqdm(range(len(ts) - 1), disable=not progress, desc="sampling", leave=False):
        t, t_next = ts[i], ts[i + 1]
        where = f"at step {i} (t={t:g} -> {t_next:g})"
        state.index, state.noise = i, None
        x0_hat, state.renoise = _split(denoiser(x, t), step)
        if not _finite(x0_hat):
            raise FloatingPointError(f"the denoiser returned NaN or Inf {where}: check the model "
                                     "weights and the guidance scale")
        x_next = step(denoiser, x, t, t_next, x0_hat, state)
        if not _finite(x_next):
            raise FloatingPointError(f"the {_name(step)} step produced NaN or Inf {where}")
        state.history = [*state.history[-(HISTORY_LEN - 1) :], (t, x0_hat)]
        ctx = StepContext(i, t, t_next, x_next, x, x0_hat, state.noise, denoiser)
        for callback in callbacks:
            out = callback(ctx)
            if out is not None:
                if not _finite(out):
                    raise FloatingPointError(f"the callback {_name(callback)} returned NaN or "
                                             f"Inf {where}")
                ctx.x = out
        x = ctx.x
    return x


def _split(prediction: Tensor | Prediction, step: Step) -> tuple[Tensor, Tensor | None]:
    """``(x0_hat, eps to renoise with or None)``; a Prediction needs a step that renoises."""
    if not isinstance(prediction, Prediction):
        return prediction, None
    if not getattr(getattr(step, "func", step), "renoises", False):
        raise ValueError(f"this guidance (e.g. CFG++) renoises with its own eps, which the "
                         f"{_name(step)} step cannot take; use the ddim or ddpm sampler")
    return prediction.x0, prediction.eps


def _finite(x: Tensor) -> bool:
    return bool(torch.isfinite(x).all())


def _name(fn: Any) -> str:
    """A readable name of a step function or callback (partials and bound methods too)."""
    fn = getattr(fn, "func", fn)
    return getattr(fn, "__name__", None) or type(fn).__name__


def _unipc() -> Step:
    from retouch.unipc import unipc_step

    return unipc_step


#: Step functions by name (``unipc`` lives in :mod:`retouch.unipc`).
SAMPLERS: dict[str, Callable[[], Step]] = {
    "ddim": lambda: ddim_step,
    "ddpm": lambda: ddpm_step,
    "euler": lambda: euler_step,
    "heun": lambda: heun_step,
    "dpmpp_2m": lambda: dpmpp_2m_step,
    "dpmpp_3m": lambda: dpmpp_3m_step,
    "unipc": _unipc,
}


def get_step(name: str, **options: Any) -> Step:
    """Step function by name, with keyword options bound (``get_step("ddim", eta=1.0)``)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid names: {', '.join(SAMPLERS)}")
    fn = SAMPLERS[name]()
    return partial(fn, **options) if options else fn
