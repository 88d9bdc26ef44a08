"""Time grids: the model times a sampler or an inversion visits, over a :class:`Schedule`.

``discrete_grid`` reproduces diffusers' timestep spacings exactly; ``karras_grid``,
``log_snr_grid`` and ``uniform_grid`` are the EDM, DPM-Solver and rectified-flow grids. Every
grid ends at a ``final`` time, by default the schedule's clean time.

References: Lin et al. 2024 ("Common diffusion noise schedules and sample steps are flawed",
spacings); Karras et al. 2022 (EDM); Lu et al. 2022 (DPM-Solver); Liu et al. 2023 (rectified
flow).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .schedules import DiscreteVPSchedule, FlowSchedule, Schedule

__all__ = ["spaced_timesteps", "discrete_grid", "karras_grid", "log_snr_grid", "uniform_grid"]

_SPACINGS = ("leading", "trailing", "linspace")
_CONVENTIONS = ("ddim", "euler", "multistep")


def spaced_timesteps(
    steps: int,
    *,
    num_train_timesteps: int = 1000,
    spacing: str = "leading",
    steps_offset: int = 0,
    convention: str = "ddim",
) -> Tensor:
    """Exactly diffusers' ``scheduler.timesteps`` for ``set_timesteps(steps)`` (float64, (N,)).

    ``convention`` names the diffusers family whose rule is reproduced:

    ==============  =======================================================================
    ``"ddim"``      DDIM, DDPM, PNDM: ``linspace`` rounded to integers
    ``"euler"``     Euler, Heun, LMS: ``linspace`` kept fractional (float32)
    ``"multistep"`` DPMSolverMultistep, UniPC, DEIS: ``linspace``/``leading`` computed on
                    N+1 points with the smallest dropped (the final step goes to the
                    grid's ``final`` time instead)
    ==============  =======================================================================

    ``leading`` adds ``steps_offset``; ``trailing`` ends one below ``T``. Reference: Lin et
    al. 2024, Table 2.
    """
    if steps < 1:
        raise ValueError(f"need at least 1 step, got {steps}")
    if spacing not in _SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; valid: {', '.join(_SPACINGS)}")
    if convention not in _CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; valid: {', '.join(_CONVENTIONS)}")
    n_train = num_train_timesteps
    if steps > n_train:
        raise ValueError(f"steps {steps} exceed num_train_timesteps {n_train}")
    extra = 1 if convention == "multistep" else 0
    if spacing == "trailing":
        ratio = n_train / steps
        ts = np.round(np.arange(n_train, 0, -ratio)) - 1
    elif spacing == "leading":
        ratio = n_train // (steps + extra)
        ts = (np.arange(0, steps + extra) * ratio).round()[::-1][:steps] + steps_offset
    elif convention == "euler":
        ts = np.linspace(0, n_train - 1, steps, dtype=np.float32)[::-1]
    else:
        ts = np.linspace(0, n_train - 1, steps + extra).round()[::-1][:steps]
    return torch.tensor(ts.astype(np.float64))


def _with_final(schedule: Schedule, times: Tensor, final: float | None) -> Tensor:
    final = schedule.t_clean if final is None else float(final)
    if float(times[-1]) == final:
        return times
    return torch.cat([times.to(torch.float64), torch.tensor([final], dtype=torch.float64)])


def discrete_grid(
    schedule: Schedule,
    steps: int,
    *,
    spacing: str = "leading",
    steps_offset: int = 0,
    convention: str = "ddim",
    final: float | None = None,
) -> Tensor:
    """Sampling grid ``[t_0 > ... > t_{N-1} > final]`` of a diffusers spacing (N steps).

    ``final`` defaults to ``schedule.t_clean`` (DDIM ``set_alpha_to_one=True``; Euler/DPM
    ``final_sigmas_type="zero"``); pass ``final=0`` for ``set_alpha_to_one=False`` or
    ``final_sigmas_type="sigma_min"``. For :class:`FlowSchedule` use :func:`uniform_grid`.
    """
    if not isinstance(schedule, DiscreteVPSchedule):
        raise ValueError("discrete_grid needs a DiscreteVPSchedule; use uniform_grid for flow")
    ts = spaced_timesteps(
        steps,
        num_train_timesteps=schedule.num_train_timesteps,
        spacing=spacing,
        steps_offset=steps_offset,
        convention=convention,
    )
    return _with_final(schedule, ts, final)


def karras_grid(
    schedule: Schedule,
    steps: int,
    *,
    rho: float = 7.0,
    k_sigma_min: float | None = None,
    k_sigma_max: float | None = None,
    final: float | None = None,
) -> Tensor:
    """EDM grid: ``s_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho``.

    ``s = sigma / alpha``; bounds default to the schedule's at ``t_max`` and ``t = 0``
    (flow: ``t = 1e-3`` and ``t = 0.999``). N model times, then ``final``.
    References: Karras et al. 2022, eq. 5.
    """
    if steps < 1:
        raise ValueError(f"need at least 1 step, got {steps}")
    is_flow = isinstance(schedule, FlowSchedule)
    t_lo, t_hi = (1e-3, 0.999) if is_flow else (0.0, schedule.t_max)
    s_min = float(schedule.k_sigma(t_lo)) if k_sigma_min is None else k_sigma_min
    s_max = float(schedule.k_sigma(t_hi)) if k_sigma_max is None else k_sigma_max
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    s = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    times = schedule.t_from_k_sigma(s)
    if k_sigma_min is None and steps > 1:
        times[-1] = t_lo  # pin the default ends against round-off
    if k_sigma_max is None:
        times[0] = t_hi
    return _with_final(schedule, times, final)


def log_snr_grid(
    schedule: Schedule,
    steps: int,
    *,
    t_start: float | None = None,
    t_stop: float = 0.0,
    final: float | None = None,
) -> Tensor:
    """N model times uniform in ``lambda = log(alpha/sigma)`` from ``t_start`` to ``t_stop``,
    then ``final`` (diffusers' ``use_lu_lambdas``; Lu et al. 2022, DPM-Solver sec. 3.3)."""
    if steps < 1:
        raise ValueError(f"need at least 1 step, got {steps}")
    t_start = schedule.t_max if t_start is None else t_start
    if isinstance(schedule, FlowSchedule) and t_stop == 0.0:
        t_stop = 1e-3
    lam_0, lam_1 = float(schedule.log_snr(t_start)), float(schedule.log_snr(t_stop))
    lams = torch.linspace(lam_0, lam_1, steps, dtype=torch.float64)
    times = schedule.t_from_log_snr(lams)
    times[-1] = t_stop  # pin the ends against round-off
    times[0] = t_start
    return _with_final(schedule, times, final)


def uniform_grid(
    schedule: Schedule, steps: int, *, t_start: float | None = None, t_stop: float | None = None
) -> Tensor:
    """``steps + 1`` times uniform in model time from ``t_start`` (default ``t_max``) to
    ``t_stop`` (default clean): the rectified-flow Euler grid (Liu et al. 2023)."""
    if steps < 1:
        raise ValueError(f"need at least 1 step, got {steps}")
    t_start = schedule.t_max if t_start is None else t_start
    t_stop = schedule.t_clean if t_stop is None else t_stop
    return torch.linspace(t_start, t_stop, steps + 1, dtype=torch.float64)
