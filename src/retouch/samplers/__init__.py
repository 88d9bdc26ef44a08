"""Solver steps as plain functions over the denoiser contract, and the one sampling loop.

Modules: :mod:`.state` (what the loop owns and shows), :mod:`.steps` (DDIM ... DPM-Solver++),
:mod:`.unipc`, :mod:`.flow` (RF-Solver, FireFlow), :mod:`.loop` (``sample``, ``get_step``).

A step maps ``(denoiser, x, t, t_next, x0_hat, state) -> x_next``: ``x0_hat = denoiser(x, t)``
was computed by the loop; ``state`` (:class:`SamplerState`, owned by the loop) holds the grid,
the step index, the recent ``(t, x0_hat)`` history of multistep solvers and the noise source
of stochastic ones. Steps are written on ``alpha``, ``sigma`` and ``lambda = log(alpha/sigma)``
so one formula serves VP and rectified-flow schedules, and deterministic steps work with time
running either way (``t_next > t`` is inversion). Heun calls the denoiser again (at
``t_next``) and RF-Solver / FireFlow (:mod:`.flow`) at the step's midpoint; these calls are not
shown to callbacks. A step with a ``predict`` method supplies its own ``x0_hat`` (FireFlow).

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

from retouch.samplers.flow import FireFlowStep, flow_view, rf_solver_step, time_at_tau
from retouch.samplers.loop import SAMPLERS, check_grid, get_step, sample
from retouch.samplers.state import HISTORY_LEN, SamplerState, Step, StepContext, step_at
from retouch.samplers.steps import (
    ddim_noise_scale,
    ddim_step,
    ddpm_step,
    dpmpp_2m_step,
    dpmpp_3m_step,
    euler_step,
    heun_step,
    start_latents,
)

__all__ = [
    "SAMPLERS",
    "HISTORY_LEN",
    "ddim_noise_scale",
    "start_latents",
    "SamplerState",
    "StepContext",
    "step_at",
    "Step",
    "ddim_step",
    "ddpm_step",
    "euler_step",
    "heun_step",
    "dpmpp_2m_step",
    "dpmpp_3m_step",
    "rf_solver_step",
    "FireFlowStep",
    "flow_view",
    "time_at_tau",
    "get_step",
    "check_grid",
    "sample",
]
