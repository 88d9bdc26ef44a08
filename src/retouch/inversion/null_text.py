"""Null-text inversion: per-step unconditional embeddings tuned around a DDIM pivot.

1. Pivot: DDIM inversion at ``w = 1`` gives ``x*_0 ... x*_N`` (accurate, since the ``w = 1``
   ODE is what was inverted).
2. Pivotal tuning: from ``x̄_0 = x*_0``, for each sampling step ``k`` optimise ``∅_k``
   (initialised from ``∅_{k-1}``, the first from the empty prompt's embedding) with Adam on
   ``|| x*_{k+1} - DDIM(x̄_k, x0_∅_k + w (x0_c - x0_∅_k)) ||^2``, stopping early once the loss
   is below a threshold; then take that step with the tuned ``∅_k``.

Reconstruction is DDIM with CFG ``w`` and ``∅_k`` at step ``k`` (an editor uses the same ``∅_k``
for its target rows). At ``w = 1`` the unconditional branch has no effect and no tuning is done.

Hyper-parameters follow the reference code of the paper (50 steps): 10 Adam iterations,
``lr = 1e-2 (1 - k / 100)``, stop when the loss ``< 1e-5 + 2e-5 k``; here written as fractions
of the run so they mean the same for any step count. The optimisation evaluates only the
unconditional branch (``x0_c`` is computed once per step) and differentiates with respect to
``∅_k`` only (``torch.autograd.grad``), never the network's weights.

References: Mokady et al. 2023, "Null-text Inversion for Editing Real Images using Guided
Diffusion Models", Alg. 1 and sec. 4.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from retouch.guidance import combine
from retouch.inversion.core import DenoiserFactory, embeds_of, record_inversion, step_state
from retouch.inversion.ddim import ddim_trajectory
from retouch.inversion.result import Inversion
from retouch.samplers import ddim_step

__all__ = ["NullTextConfig", "invert_null_text"]


@dataclass(frozen=True)
class NullTextConfig:
    """Options of ``null_text``."""

    inner_steps: int = 10  # Adam iterations per sampling step at most (paper: 10)
    lr: float = 1e-2  # Adam learning rate at the first step (paper: 1e-2)
    lr_decay: float = 0.5  # lr falls linearly to lr * (1 - lr_decay) at the last step
    early_stop: float = 1e-5  # stop once the MSE < early_stop + early_stop_growth * k / N
    early_stop_growth: float = 1e-3  # (paper: 2e-5 per step over 50 steps)


def invert_null_text(
    factory: DenoiserFactory,
    x: Tensor,
    times: Tensor,
    *,
    cfg: float,
    config: NullTextConfig,
    progress: bool = True,
) -> Inversion:
    """Null-text inversion of ``x`` (B, C, H, W); returns per-step ``∅_k`` (N, B, L, D)."""
    factory.require_conditional("null_text inversion")
    calls0 = factory.calls
    with torch.no_grad():
        pivot = ddim_trajectory(
            factory.denoiser(cfg=1.0), x, times, progress=progress, desc="invert null_text (pivot)"
        )
    ts = [float(t) for t in times]
    n, b = len(ts) - 1, x.shape[0]
    cond = factory.branch(factory.cond)
    null = embeds_of(factory.uncond)
    emb = null.expand(b, *null.shape[1:]).detach().clone()
    x_bar, embeddings = pivot[0], []
    bar = tqdm(range(n), desc="invert null_text (tuning)", disable=not progress, leave=False)
    for k in bar:
        t, t_next = ts[k], ts[k + 1]
        with torch.no_grad():
            x0_c = cond(x_bar, t)
        if cfg != 1.0:
            emb = _tune(
                factory,
                emb,
                x_bar,
                x0_c,
                pivot[k + 1],
                t,
                t_next,
                cfg=cfg,
                lr=config.lr * (1 - config.lr_decay * k / n),
                threshold=config.early_stop + config.early_stop_growth * k / n,
                iterations=config.inner_steps,
            )
        embeddings.append(emb)
        with torch.no_grad():
            x0_u = factory.branch(factory.uncond_with(emb))(x_bar, t) if cfg != 1.0 else x0_c
            x0 = combine(x0_u, x0_c, cfg)
            x_bar = ddim_step(cond, x_bar, t, t_next, x0, step_state())
    return record_inversion(factory, "null_text", times, pivot, cfg, calls0, config,
                            uncond_embeddings=torch.stack(embeddings))


def _tune(factory, emb, x_bar, x0_c, target, t, t_next, *, cfg, lr, threshold, iterations):
    """Adam on ``∅`` for one step; returns the tuned (detached) embedding."""
    emb = emb.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([emb], lr=lr)
    for _ in range(iterations):
        with torch.enable_grad():
            x0_u = factory.branch(factory.uncond_with(emb))(x_bar, t)
            x0 = combine(x0_u, x0_c, cfg)
            x_next = ddim_step(factory.inner, x_bar, t, t_next, x0, step_state())
            loss = F.mse_loss(x_next, target)
            (grad,) = torch.autograd.grad(loss, [emb])
        emb.grad = grad
        opt.step()
        if loss.item() < threshold:
            break
    return emb.detach()
