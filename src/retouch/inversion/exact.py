"""Exact inversions: EDICT, BDIA-DDIM and the edit-friendly DDPM noise space.

Each makes the sampler's step algebraically invertible, so reconstruction returns the input
latent up to floating-point round-off, at any guidance scale:

* ``edict``: two coupled chains ``(x, y)``; each is moved by an eps-held DDIM step whose
  ``eps`` comes from the *other* chain, then the pair is averaged with weight ``p``
  (``x <- p x + (1-p) y``, ``y <- p y + (1-p) x``). Every sub-step is affine in the chain it
  moves, so it runs backwards exactly. 2 network calls per step. **Needs many steps and
  moderate guidance for anything but reconstruction:** the second sub-step evaluates the
  network at ``t`` on a chain already moved to ``t_next``, and guidance amplifies that
  mismatch into a drift between ``x`` and ``y``. Sampling 8 ToyBench prompts from noise
  (``scripts/edict_steps.py``, shipped model) read all attributes right on 0/8 at 10 steps
  and CFG 5 (``x - y`` rms 3.2), 0/8 at 25 steps, 6/8 at 50 steps and CFG 5, 8/8 at 50 steps
  and CFG 3 (the paper's setting). Edits (a target prompt) leave the inverted pair and suffer
  the same: P2P colour edits (8 ToyBench cases, ``scripts/edict_edits.py``) succeed on 8/8 at
  50 steps and CFG 3 (31.4 dB outside the edit; Direct Inversion 37.1 dB), on 3/8 at CFG 5,
  and on about 1/8 at 10 steps.
* ``bdia``: ``x_{k+1} = gamma (x_{k-1} - DDIM(x_k; t_k -> t_{k-1})) + DDIM(x_k; t_k -> t_{k+1})``
  -- the forward DDIM step plus a correction of the previous interval by the backward DDIM step,
  both from one call at ``x_k``. Solved for ``x_{k-1}`` it is the inversion; the first interval
  is a DDIM inversion step and the pair ``(x_0, x_1)`` starts the reconstruction. 1 call per
  step, works for VP and rectified flow.
* ``ddpm_edit_friendly``: ``x_k = alpha_k x0 + sigma_k eps_k`` with *independent* ``eps_k``;
  the noise maps ``z_k = (x_{k+1} - mu_k(x_k)) / c_k`` make the stochastic DDIM/DDPM sampler
  (``ddim_step`` with ``eta``) land on each ``x_{k+1}``. A step with ``c_k = 0`` (to a clean
  time) keeps its residual as an offset applied to every branch. 1 call per step.

References: Wallace et al. 2023 ("EDICT", eq. 14-15, ``p = 0.93``); Zhang et al. 2024
("Exact Diffusion Inversion via Bi-directional Integration Approximation", eq. 13-16);
Huberman-Spiegelglas et al. 2024 ("An Edit Friendly DDPM Noise Space", eq. 5-6, Alg. 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from retouch.denoiser import Denoiser
from retouch.inversion.core import (
    DenoiserFactory,
    MethodRefused,
    corrections,
    ddim_eps_step,
    inverse_ddim_step,
    predict,
    record_inversion,
    rows,
    step_state,
)
from retouch.inversion.result import Inversion
from retouch.samplers import SamplerState, ddim_noise_scale, ddim_step

__all__ = [
    "EDICTConfig",
    "BDIAConfig",
    "EditFriendlyConfig",
    "BDIAStep",
    "edict_step",
    "edict_inverse_step",
    "invert_edict",
    "invert_bdia",
    "invert_ddpm_edit_friendly",
    "replay_edict",
    "replay_bdia",
    "replay_edit_friendly",
]


@dataclass(frozen=True)
class EDICTConfig:
    """Options of ``edict``."""

    p: float = 0.93  # mixing weight of the averaging layers (paper: 0.93)
    leapfrog: bool = True  # alternate which chain moves first each step (reference code)


@dataclass(frozen=True)
class BDIAConfig:
    """Options of ``bdia``."""

    gamma: float = 1.0  # weight of the backward correction; 1 = time-symmetric, 0 = DDIM


@dataclass(frozen=True)
class EditFriendlyConfig:
    """Options of ``ddpm_edit_friendly``."""

    eta: float = 1.0  # stochasticity of the sampler (1 = DDPM posterior, the paper)
    seed: int = 0  # seed of the independent noises eps_k of x_k = alpha x0 + sigma eps_k


# --- EDICT ------------------------------------------------------------------------------------


def _eps(den: Denoiser, z: Tensor, t: float) -> Tensor:
    return predict(den, z, t)[1]


def _order(x: Tensor, y: Tensor, k: int, leapfrog: bool) -> tuple[Tensor, Tensor, bool]:
    swap = leapfrog and k % 2 == 1
    return (y, x, swap) if swap else (x, y, swap)


def edict_step(
    den: Denoiser,
    x: Tensor,
    y: Tensor,
    t: float,
    t_next: float,
    *,
    k: int,
    p: float,
    leapfrog: bool = True,
) -> tuple[Tensor, Tensor]:
    """One EDICT sampling step ``t -> t_next`` of the pair; 2 network calls at ``t``."""
    first, second, swap = _order(x, y, k, leapfrog)
    first = ddim_eps_step(den, first, t, t_next, _eps(den, second, t))
    second = ddim_eps_step(den, second, t, t_next, _eps(den, first, t))
    x, y = (second, first) if swap else (first, second)
    x = p * x + (1 - p) * y
    y = p * y + (1 - p) * x
    return x, y


def edict_inverse_step(
    den: Denoiser,
    x: Tensor,
    y: Tensor,
    t: float,
    t_next: float,
    *,
    k: int,
    p: float,
    leapfrog: bool = True,
) -> tuple[Tensor, Tensor]:
    """Exact inverse of :func:`edict_step` (pair at ``t_next`` -> pair at ``t``)."""
    y = (y - (1 - p) * x) / p
    x = (x - (1 - p) * y) / p
    first, second, swap = _order(x, y, k, leapfrog)
    second = ddim_eps_step(den, second, t_next, t, _eps(den, first, t))
    first = ddim_eps_step(den, first, t_next, t, _eps(den, second, t))
    return (second, first) if swap else (first, second)


@torch.no_grad()
def invert_edict(
    factory: DenoiserFactory,
    x: Tensor,
    times: Tensor,
    *,
    cfg: float,
    config: EDICTConfig,
    progress: bool = True,
) -> Inversion:
    """EDICT inversion from ``x = y = x_N``; stores the x-chain and ``y_0``."""
    if not 0 < config.p <= 1:
        raise ValueError(f"edict needs 0 < p <= 1, got {config.p}")
    noise = [float(t) for t in times if factory.schedule.coeffs(float(t))[0] == 0]
    if noise:
        raise MethodRefused(
            f"edict's eps-held steps need alpha(t) > 0, and this grid starts at pure noise "
            f"(t={noise[0]:g}, as a rectified-flow model's does): use bdia or "
            "ddpm_edit_friendly (exact) or rf_solver instead")
    calls0 = factory.calls
    den = factory.denoiser(cfg=cfg)
    ts = [float(t) for t in times]
    n = len(ts) - 1
    xs, y = [x] * (n + 1), x
    for k in tqdm(range(n - 1, -1, -1), desc="invert edict", disable=not progress, leave=False):
        xs[k], y = edict_inverse_step(
            den, xs[k + 1], y, ts[k], ts[k + 1], k=k, p=config.p, leapfrog=config.leapfrog
        )
    return record_inversion(
        factory, "edict", times, torch.stack(xs), cfg, calls0, config, coupled=y
    )


# --- BDIA -------------------------------------------------------------------------------------


class BDIAStep:
    """BDIA-DDIM as a step function for :func:`retouch.samplers.sample` (it remembers ``x_{k-1}``).

    Start the loop at ``x_1`` on ``times[1:]`` with ``BDIAStep(x_prev=x_0, t_prev=times[0])``.

    Edits: with ``source_rows=B`` the batch is blocks of B rows (source, then target...) and
    every block takes the *source* block's backward correction ``gamma (x_{k-1} - up)`` on top
    of its own forward DDIM step. The source stays exact; a target row that leaves the inverted
    trajectory runs a one-step scheme. Its own correction would make it a leapfrog scheme
    whose parasitic mode never decays at gamma = 1: on ToyBench colour edits (12 cases, 10
    steps, CFG 5, no attention control) such target rows succeeded in 0.17 of the cases.
    Identical prompts still give identical rows.
    """

    def __init__(
        self, *, x_prev: Tensor, t_prev: float, gamma: float = 1.0, source_rows: int | None = None
    ):
        self.x_prev = x_prev  # x_{k-1}, (B, ...)
        self.t_prev = float(t_prev)  # t_{k-1}
        self.gamma = gamma  # weight of the backward correction
        self.source_rows = source_rows  # block size whose first block's correction all take

    def __call__(
        self,
        denoiser: Denoiser,
        x: Tensor,
        t: float,
        t_next: float,
        x0_hat: Tensor,
        state: SamplerState,
    ) -> Tensor:
        down = ddim_step(denoiser, x, t, t_next, x0_hat, state)  # DDIM(x_k; t_k -> t_{k+1})
        up = ddim_step(denoiser, x, t, self.t_prev, x0_hat, state)  # DDIM(x_k; t_k -> t_{k-1})
        correction = self.gamma * (self.x_prev - up)
        if self.source_rows is not None:
            blocks = len(x) // self.source_rows
            correction = correction[: self.source_rows].repeat(blocks, *[1] * (x.dim() - 1))
        out = correction + down
        self.x_prev, self.t_prev = x, t
        return out


@torch.no_grad()
def invert_bdia(
    factory: DenoiserFactory,
    x: Tensor,
    times: Tensor,
    *,
    cfg: float,
    config: BDIAConfig,
    progress: bool = True,
) -> Inversion:
    """BDIA-DDIM inversion; N network calls. Stores the chain and ``x_1`` (coupled)."""
    if not config.gamma > 0:
        raise ValueError(f"bdia needs gamma > 0 to be invertible, got {config.gamma}")
    if len(times) < 3:
        raise ValueError("bdia needs at least 2 steps")
    calls0 = factory.calls
    den = factory.denoiser(cfg=cfg)
    ts = [float(t) for t in times]
    n = len(ts) - 1
    xs = [x] * (n + 1)
    x0, eps = predict(den, x, ts[n - 1])  # the first interval is a DDIM inversion step
    xs[n - 1] = inverse_ddim_step(den, x, ts[n], ts[n - 1], x0, eps)
    state = step_state()
    for k in tqdm(range(n - 1, 0, -1), desc="invert bdia", disable=not progress, leave=False):
        x_k = xs[k]
        x0 = den(x_k, ts[k])
        down = ddim_step(den, x_k, ts[k], ts[k + 1], x0, state)
        up = ddim_step(den, x_k, ts[k], ts[k - 1], x0, state)
        xs[k - 1] = (xs[k + 1] - down) / config.gamma + up
    return record_inversion(
        factory, "bdia", times, torch.stack(xs), cfg, calls0, config, coupled=xs[1]
    )


# --- edit-friendly DDPM -----------------------------------------------------------------------


@torch.no_grad()
def invert_ddpm_edit_friendly(
    factory: DenoiserFactory,
    x: Tensor,
    times: Tensor,
    *,
    cfg: float,
    config: EditFriendlyConfig,
    progress: bool = True,
) -> Inversion:
    """Edit-friendly noise maps ``z_k`` (N, B, ...) for ``ddim_step(eta)``; N network calls."""
    calls0 = factory.calls
    den = factory.denoiser(cfg=cfg)
    ts = [float(t) for t in times]
    n = len(ts) - 1
    gen = torch.Generator().manual_seed(config.seed)
    xs = []
    for k in range(n):  # x_k = alpha_k x0 + sigma_k eps_k, eps_k independent across k
        alpha, sigma = den.schedule.coeffs(ts[k])
        eps = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
        xs.append(alpha * x + sigma * eps)
    xs.append(x)
    noises, offsets = [], []
    zero = torch.zeros_like(x)
    for k in tqdm(range(n), desc="invert ddpm_edit_friendly", disable=not progress, leave=False):
        mean = ddim_step(
            den, xs[k], ts[k], ts[k + 1], den(xs[k], ts[k]), step_state(zero), eta=config.eta
        )  # mu_k: the step with zero noise
        c = ddim_noise_scale(den.schedule, ts[k], ts[k + 1], config.eta)
        residual = xs[k + 1] - mean
        noises.append(residual / c if c > 0 else zero)
        offsets.append(zero if c > 0 else residual)
    return record_inversion(
        factory,
        "ddpm_edit_friendly",
        times,
        torch.stack(xs),
        cfg,
        calls0,
        config,
        noises=torch.stack(noises),
        offsets=torch.stack(offsets),
        offset_rows="all",
    )


# --- replays ----------------------------------------------------------------------------------


def replay_edict(inv: Inversion, den: Denoiser, *, copies: int, callbacks, progress: bool):
    """Reconstruct EDICT: its coupled two-chain loop from ``(x_0, y_0)`` (takes no callbacks)."""
    if callbacks:
        raise ValueError("edict's coupled two-chain loop does not take callbacks")
    x, y = rows(inv.trajectory[0], inv.batch, copies), rows(inv.coupled, inv.batch, copies)
    ts = [float(t) for t in inv.times]
    for k in tqdm(range(len(ts) - 1), desc="reconstruct edict", disable=not progress, leave=False):
        x, y = edict_step(den, x, y, ts[k], ts[k + 1], k=k, p=inv.options["p"],
                          leapfrog=inv.options["leapfrog"])
    return x


def replay_bdia(inv: Inversion, den: Denoiser, *, copies: int, callbacks, progress: bool):
    """Reconstruct BDIA from the stored pair ``(x_0, x_1)``: its loop starts at step 1, so a
    callback's ``ctx.i`` is ``k - 1``."""
    from retouch.samplers import sample

    x0 = rows(inv.trajectory[0], inv.batch, copies)
    step = BDIAStep(x_prev=x0, t_prev=float(inv.times[0]), gamma=inv.options["gamma"],
                    source_rows=inv.batch if copies > 1 else None)
    return sample(den, rows(inv.coupled, inv.batch, copies), inv.times[1:], step=step,
                  callbacks=[*corrections(inv, copies, shift=1), *callbacks], progress=progress)


def replay_edit_friendly(inv: Inversion, den: Denoiser, *, copies: int, callbacks,
                         progress: bool):
    """Reconstruct the edit-friendly DDPM inversion: stochastic DDIM with the stored noise maps
    ``z_k`` (and the offsets of steps to a clean time)."""
    from functools import partial

    from retouch.samplers import sample

    noises = [rows(z, inv.batch, copies) for z in inv.noises]
    return sample(den, rows(inv.trajectory[0], inv.batch, copies), inv.times,
                  step=partial(ddim_step, eta=inv.options["eta"]),
                  callbacks=[*corrections(inv, copies), *callbacks], progress=progress,
                  noises=noises)
