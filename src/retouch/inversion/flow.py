"""Rectified-flow inversions: the RF-Solver and FireFlow midpoint steps run up the grid.

Both integrate the flow ODE ``dz/dtau = v`` (the flow view of :mod:`retouch.samplers.flow`, so
they serve VP models too) from the image to noise with the solver the reconstruction then runs
down the same grid; neither is exact, but both are second order where DDIM inversion
(``ddim``, which for a flow schedule holds the velocity: Euler) is first order.

Step ``k`` goes from ``t_{k+1}`` up to ``t_k``. Its start velocity is the model's at
``(x_{k+1}, t_{k+1})`` -- except on the first step, which starts at a clean time where the
velocity cannot be read from ``x0_hat`` and is read at the target time ``t_k`` instead (the
convention of :mod:`retouch.inversion.core`), and, for FireFlow, on every later step, which
reuses the previous step's midpoint velocity. Network calls: RF-Solver 2 per step; FireFlow
``N + 1``.

References: Wang et al. 2024, "Taming Rectified Flow for Inversion and Editing" (RF-Solver,
Alg. 1); Deng et al. 2024, "FireFlow: Fast Inversion of Rectified Flow for Image Semantic
Editing", Alg. 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from retouch.denoiser import Denoiser
from retouch.inversion.core import DenoiserFactory, corrections, record_inversion, rows
from retouch.inversion.result import Inversion
from retouch.samplers import FireFlowStep, flow_view, rf_solver_step
from retouch.samplers.flow import flow_velocity, midpoint_velocity

__all__ = ["RFSolverConfig", "FireFlowConfig", "flow_trajectory", "invert_rf_solver",
           "invert_fireflow", "replay_rf_solver", "replay_fireflow"]


@dataclass(frozen=True)
class RFSolverConfig:
    """Options of ``rf_solver``."""

    invert_cfg: float | None = None  # guidance of the inversion pass; None = the cfg asked for


@dataclass(frozen=True)
class FireFlowConfig:
    """Options of ``fireflow``."""

    invert_cfg: float | None = None  # guidance of the inversion pass; None = the cfg asked for


def flow_trajectory(
    denoiser: Denoiser, x: Tensor, times: Tensor, *, reuse: bool, progress: bool = False,
    desc: str = "invert",
) -> Tensor:
    """Midpoint-rule inversion of ``x`` (at ``times[-1]``) up the grid, (N+1, B, ...) in
    sampling order; ``reuse`` takes each half step's velocity from the previous midpoint
    (FireFlow) instead of a fresh call (RF-Solver)."""
    schedule = denoiser.schedule
    ts = [float(t) for t in times]
    n = len(ts) - 1
    traj: list[Tensor] = [x] * (n + 1)
    v_prev = None
    for k in tqdm(range(n - 1, -1, -1), desc=desc, disable=not progress, leave=False):
        (c, tau), (c_n, tau_n) = flow_view(schedule, ts[k + 1]), flow_view(schedule, ts[k])
        z = traj[k + 1] / c
        if reuse and v_prev is not None:
            v = v_prev
        else:
            v = flow_velocity(denoiser, z, ts[k + 1] if tau > 0 else ts[k])
        v_prev = midpoint_velocity(denoiser, z, tau, tau_n, v)
        traj[k] = c_n * (z + (tau_n - tau) * v_prev)
    return torch.stack(traj)


def _invert(name: str, reuse: bool, factory, x, times, *, cfg, config, progress) -> Inversion:
    calls0 = factory.calls
    den = factory.denoiser(cfg=cfg if config.invert_cfg is None else config.invert_cfg)
    traj = flow_trajectory(den, x, times, reuse=reuse, progress=progress, desc=f"invert {name}")
    return record_inversion(factory, name, times, traj, cfg, calls0, config)


@torch.no_grad()
def invert_rf_solver(factory: DenoiserFactory, x: Tensor, times: Tensor, *, cfg: float,
                     config: RFSolverConfig, progress: bool = True) -> Inversion:
    """RF-Solver inversion (2 network calls per step); reconstructed by RF-Solver sampling."""
    return _invert("rf_solver", False, factory, x, times, cfg=cfg, config=config,
                   progress=progress)


@torch.no_grad()
def invert_fireflow(factory: DenoiserFactory, x: Tensor, times: Tensor, *, cfg: float,
                    config: FireFlowConfig, progress: bool = True) -> Inversion:
    """FireFlow inversion (N + 1 network calls); reconstructed by FireFlow sampling."""
    return _invert("fireflow", True, factory, x, times, cfg=cfg, config=config,
                   progress=progress)


def _replay(step, inv: Inversion, den: Denoiser, *, copies: int, callbacks, progress: bool):
    from retouch.samplers import sample

    return sample(den, rows(inv.trajectory[0], inv.batch, copies), inv.times, step=step,
                  callbacks=[*corrections(inv, copies), *callbacks], progress=progress)


def replay_rf_solver(inv: Inversion, den: Denoiser, *, copies: int, callbacks, progress: bool):
    """Reconstruct by RF-Solver sampling along the inversion's grid."""
    return _replay(rf_solver_step, inv, den, copies=copies, callbacks=callbacks,
                   progress=progress)


def replay_fireflow(inv: Inversion, den: Denoiser, *, copies: int, callbacks, progress: bool):
    """Reconstruct by FireFlow sampling along the inversion's grid."""
    return _replay(FireFlowStep(), inv, den, copies=copies, callbacks=callbacks,
                   progress=progress)
