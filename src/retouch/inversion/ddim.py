"""Inversions built on one DDIM inversion pass: DDIM, negative-prompt, ReNoise, Direct Inversion.

All share :func:`ddim_trajectory` (DDIM run upwards, model at the target time, see
:mod:`retouch.inversion.core`) and are reconstructed by plain DDIM sampling with CFG ``w``;
they differ in the guidance of the pass and in what the reconstruction adds:

* ``ddim``: the pass at ``w`` itself (set ``invert_cfg=1`` for the classic "invert at w = 1,
  edit at w" baseline of null-text inversion). Approximate: errors grow with ``w``.
* ``negative_prompt``: the pass at ``w = 1`` with the source prompt; reconstruction uses the
  source prompt as the *unconditional* embedding, so ``x0(c) + w (x0(c) - x0(c))`` is the
  ``w = 1`` sampler whatever ``w`` (editing then guides from the source towards the target).
* ``renoise``: each inversion step is refined by fixed-point iterations
  ``z <- F^{-1}(x_{k+1}; eps(z, t_k))`` whose fixed point inverts the sampling step exactly;
  the last estimates are averaged.
* ``direct``: the pass at ``w = 1`` is the pivot ``x*``; the offsets
  ``o_k = x*_{k+1} - DDIM_w(x*_k)`` make the source branch reproduce ``x*`` exactly, while a
  target branch runs free. (Nothing but ``x*`` is stored: the reconstruction loop applies the
  paper's ``o_k`` in the drift-free form "source rows := ``x*_{k+1}``", see
  ``api._offset_callback``.)

References: Song et al. 2021 (DDIM); Miyake et al. 2023 ("Negative-prompt Inversion");
Garibi et al. 2024 ("ReNoise", Alg. 1; noise regularisation and correction not included);
Ju et al. 2023 ("Direct Inversion / PnP Inversion", Alg. 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from retouch.denoiser import Denoiser
from retouch.inversion.core import (
    DenoiserFactory,
    embeds_of,
    inverse_ddim_step,
    predict,
    record_inversion,
)
from retouch.inversion.result import Inversion

__all__ = [
    "DDIMConfig",
    "NegativePromptConfig",
    "ReNoiseConfig",
    "DirectConfig",
    "ddim_trajectory",
    "invert_ddim",
    "invert_negative_prompt",
    "invert_renoise",
    "invert_direct",
]


@dataclass(frozen=True)
class DDIMConfig:
    """Options of ``ddim``."""

    invert_cfg: float | None = None  # guidance of the inversion pass; None = the cfg asked for
    hold: str | None = None  # "eps", "x0" or "velocity" (core.HOLDS); None = default_hold


@dataclass(frozen=True)
class NegativePromptConfig:
    """``negative_prompt`` has no options (no optimisation)."""


@dataclass(frozen=True)
class ReNoiseConfig:
    """Options of ``renoise``."""

    renoise_steps: int = 4  # fixed-point iterations after the DDIM estimate (K in the paper)
    average_last: int = 2  # average the predictions of the last this-many iterations (1 = none)
    invert_cfg: float | None = None  # guidance of the inversion; None = the cfg asked for
    hold: str | None = None  # "eps", "x0" or "velocity" (core.HOLDS); None = default_hold


@dataclass(frozen=True)
class DirectConfig:
    """Options of ``direct``."""

    invert_cfg: float = 1.0  # guidance of the pivot pass (the paper: 1, the source prompt)


def _times(times: Tensor) -> list[float]:
    return [float(t) for t in times]


def ddim_trajectory(
    denoiser: Denoiser,
    x: Tensor,
    times: Tensor,
    *,
    hold: str | None = None,
    progress: bool = False,
    desc: str = "ddim",
) -> Tensor:
    """DDIM inversion of ``x`` (at ``times[-1]``) up the grid; (N+1, B, ...) in sampling order.

    Step ``k`` (from ``t_{k+1}`` to ``t_k``) evaluates the model at ``(x_{k+1}, t_k)``;
    ``hold`` as in :func:`~retouch.inversion.core.inverse_ddim_step`.
    """
    ts = _times(times)
    n = len(ts) - 1
    traj: list[Tensor] = [x] * (n + 1)
    for k in tqdm(range(n - 1, -1, -1), desc=desc, disable=not progress, leave=False):
        x0, eps = predict(denoiser, traj[k + 1], ts[k])
        traj[k] = inverse_ddim_step(denoiser, traj[k + 1], ts[k + 1], ts[k], x0, eps, hold=hold)
    return torch.stack(traj)


@torch.no_grad()
def invert_ddim(
    factory: DenoiserFactory,
    x: Tensor,
    times: Tensor,
    *,
    cfg: float,
    config: DDIMConfig,
    progress: bool = True,
) -> Inversion:
    """DDIM inversion at ``config.invert_cfg`` (default ``cfg``); N network calls."""
    calls0 = factory.calls
    den = factory.denoiser(cfg=cfg if config.invert_cfg is None else config.invert_cfg)
    traj = ddim_trajectory(den, x, times, hold=config.hold, progress=progress, desc="invert ddim")
    return record_inversion(factory, "ddim", times, traj, cfg, calls0, config)


@torch.no_grad()
def invert_negative_prompt(
    factory: DenoiserFactory,
    x: Tensor,
    times: Tensor,
    *,
    cfg: float,
    config: NegativePromptConfig,
    progress: bool = True,
) -> Inversion:
    """Negative-prompt inversion: the ``w = 1`` DDIM pass; ∅ := c for reconstruction."""
    factory.require_conditional("negative_prompt inversion")
    calls0 = factory.calls
    traj = ddim_trajectory(
        factory.denoiser(cfg=1.0), x, times, progress=progress, desc="invert negative_prompt"
    )
    c = embeds_of(factory.cond)
    uncond = c.expand(x.shape[0], *c.shape[1:])[None].clone()
    return record_inversion(
        factory, "negative_prompt", times, traj, cfg, calls0, config, uncond_embeddings=uncond
    )


@torch.no_grad()
def invert_renoise(
    factory: DenoiserFactory,
    x: Tensor,
    times: Tensor,
    *,
    cfg: float,
    config: ReNoiseConfig,
    progress: bool = True,
) -> Inversion:
    """ReNoise: per step, ``1 + renoise_steps`` network calls refine ``x_k`` by iterating the
    inversion step on the model's prediction at the current estimate of ``x_k``."""
    if config.renoise_steps < 0 or not 1 <= config.average_last <= config.renoise_steps + 1:
        raise ValueError(
            f"renoise needs renoise_steps >= 0 and 1 <= average_last <= renoise_steps + 1, "
            f"got {config.renoise_steps}, {config.average_last}"
        )
    calls0 = factory.calls
    den = factory.denoiser(cfg=cfg if config.invert_cfg is None else config.invert_cfg)
    ts = _times(times)
    n = len(ts) - 1
    traj: list[Tensor] = [x] * (n + 1)
    for k in tqdm(range(n - 1, -1, -1), desc="invert renoise", disable=not progress, leave=False):
        x_low, z = traj[k + 1], traj[k + 1]
        estimates = []
        for _ in range(config.renoise_steps + 1):
            x0, eps = predict(den, z, ts[k])  # iteration 0 is plain DDIM inversion
            estimates.append((x0, eps))
            z = inverse_ddim_step(den, x_low, ts[k + 1], ts[k], x0, eps, hold=config.hold)
        if config.average_last > 1:
            last = estimates[-config.average_last :]
            x0 = torch.stack([e[0] for e in last]).mean(0)
            eps = torch.stack([e[1] for e in last]).mean(0)
            z = inverse_ddim_step(den, x_low, ts[k + 1], ts[k], x0, eps, hold=config.hold)
        traj[k] = z
    return record_inversion(factory, "renoise", times, torch.stack(traj), cfg, calls0, config)


@torch.no_grad()
def invert_direct(
    factory: DenoiserFactory,
    x: Tensor,
    times: Tensor,
    *,
    cfg: float,
    config: DirectConfig,
    progress: bool = True,
) -> Inversion:
    """Direct Inversion: the pivot pass at ``invert_cfg`` (N network calls).

    The offsets ``o_k = x*_{k+1} - DDIM_w(x_k)`` are not computed here: the reconstruction or
    edit pass evaluates the source rows anyway, and adding ``o_k`` there is writing
    ``x*_{k+1}`` into them (as PnP Inversion's reference code does), so inversion plus
    reconstruction costs what DDIM's does.
    """
    calls0 = factory.calls
    pivot = ddim_trajectory(
        factory.denoiser(cfg=config.invert_cfg), x, times, progress=progress, desc="invert direct"
    )
    return record_inversion(
        factory, "direct", times, pivot, cfg, calls0, config, offset_rows="source"
    )
