"""Appearance transfer by cross-image attention: the structure of one image, the look of another.

Both inputs are inverted (any method of :data:`retouch.inversion.METHODS`, one batch; by default
edit-friendly DDPM, which ``bench consistency`` found best: success 0.47 against 0.11 after DDIM
inversion, structure kept 0.88 against 0.56, on 64 pairs, with the settings of
:data:`retouch.bench.transfer.TUNED`: ``cfg=1, inversion_cfg=5, swap_guidance=6,
structure_every=0``, against 0.23 with the defaults below) and held on
their trajectories as the ``appearance`` and ``structure`` rows; the ``output`` row starts from
the structure's inverted noise and, through :class:`~retouch.attention.CrossImageAttention`,
reads the appearance's keys and values in the decoder's finest self-attention layers. Two more
pieces of the paper act on the output row:

* **AdaIN on the latents** in ``adain_steps``: each channel of the output latent takes the
  appearance latent's mean and standard deviation over the image (the unmasked variant of the
  reference code's ``adain``);
* **swap guidance** on the steps where cross-image attention runs: ``x0 = x0_plain +
  s (x0_swap - x0_plain)``, with ``s`` falling linearly from ``swap_guidance`` to
  ``max(swap_guidance / 2, 1)`` over those steps (a second network pass per step; 1 turns it off).

The inputs may be inverted with any method: their rows follow the stored trajectories. The
output row starts from the structure's inverted noise (or, with ``skip``, from the structure's
latent that many steps in). After ``ddpm_edit_friendly`` it follows the structure's noise maps
``z_k`` (and offsets) on that inversion's stochastic step, as the reference code does; after
any other inversion it is sampled with ``sampler``. ``seed`` seeds the randomness of both (the
edit-friendly noises, a stochastic sampler).

References: Alaluf, Garibi et al. 2024 (SIGGRAPH), Sec. 4 and garibida/cross-image-attention
(``swap_guidance_scale`` 3.5, ``adain_range`` 20-100 and ``skip_steps`` 32 of 100 steps, the
inversion at CFG 3.5 and sampling at 1, one generic prompt for all three rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import Tensor

from ..attention import BatchLayout, attention_control, guidance_halves, in_window
from ..attention.cross_image import CrossImageAttention
from ..attention.sites import check_window
from ..checks import count, finite
from ..denoiser import halves_of
from ..samplers import ddim_step, get_step, sample
from ..samplers.callbacks import pin_row

__all__ = ["appearance_transfer", "Transfer", "adain_latents"]

ROLES = ("appearance", "structure", "output")
APPEARANCE, STRUCTURE, OUTPUT = range(3)  # latent rows


@dataclass
class Transfer:
    """uint8 (H, W, 3) images: the output and the two inputs as their inversions reconstruct
    them (what the output's attention saw)."""

    output: np.ndarray
    structure: np.ndarray
    appearance: np.ndarray


def adain_latents(x: Tensor, ref: Tensor, eps: float = 1e-5) -> Tensor:
    """Each channel of ``x`` (C, h, w) with the mean and std of ``ref``'s channel."""
    mean, std = x.mean((-2, -1), keepdim=True), (x.var((-2, -1), keepdim=True) + eps).sqrt()
    rmean, rstd = ref.mean((-2, -1), keepdim=True), (ref.var((-2, -1), keepdim=True) + eps).sqrt()
    return (x - mean) / std * rstd + rmean


def _adain_callback(window, num_steps: int):
    def callback(ctx):
        if not in_window(ctx.i, num_steps, window):
            return None
        x = ctx.x.clone()
        x[OUTPUT] = adain_latents(x[OUTPUT], x[APPEARANCE])
        return x

    return callback


def _structure_noise(inv, start: int):
    """``(step, noises, offset callbacks)`` that move the output row along the structure's
    edit-friendly noise maps from grid step ``start`` (the inputs' rows take their own, which
    their pinning overrides)."""
    order = [APPEARANCE, STRUCTURE, STRUCTURE]  # inversion rows [appearance, structure]
    noises = [z[order] for z in inv.noises[start:]]

    def add_offset(ctx):
        x = ctx.x.clone()
        x[OUTPUT] += inv.offsets[start + ctx.i][STRUCTURE].to(x)
        return x

    return partial(ddim_step, eta=inv.options["eta"]), noises, [add_offset]


def _swap_guided(den, ctrl: CrossImageAttention, times: Tensor, scale: float):
    """``den`` with swap guidance on the output row at cross-image steps (module doc)."""
    n = len(times) - 1
    steps = [i for i in range(n) if any(in_window(i, n, w) for w in ctrl.windows.values())]
    strengths = dict(zip(steps, np.linspace(scale, max(scale / 2, 1.0), len(steps)),
                         strict=True))
    grid = [float(t) for t in times]

    def guided(x: Tensor, t: float) -> Tensor:
        swapped = den(x, t)
        if not isinstance(swapped, Tensor):
            raise ValueError(f"swap guidance extrapolates x0 predictions; this denoiser returns "
                             f"{type(swapped).__name__} (e.g. CFG++): use swap_guidance=1")
        i = min(range(n), key=lambda k: abs(grid[k] - float(t)))
        s = strengths.get(i, 1.0)
        if s == 1.0:
            return swapped
        ctrl.enabled = False
        try:
            plain = den(x, t)
        finally:
            ctrl.enabled = True
        out = swapped.clone()
        out[OUTPUT] = plain[OUTPUT] + s * (swapped[OUTPUT] - plain[OUTPUT])
        return out

    guided.schedule, guided.halves = den.schedule, halves_of(den)
    return guided


def appearance_transfer(
    model,
    structure,
    appearance,
    *,
    structure_prompt: str,
    appearance_prompt: str,
    output_prompt: str | None = None,
    inversion: str = "ddpm_edit_friendly",
    steps: int = 25,
    cfg: float = 5.0,
    inversion_cfg: float | None = None,
    skip: float = 0.0,
    swap_guidance: float = 3.5,
    adain_steps: tuple[float, float] = (0.2, 1.0),
    sampler: str | None = None,
    seed: int = 0,
    cross_image: bool = True,
    progress: bool = False,
    **options,
) -> Transfer:
    """The ``structure`` image (PIL / uint8 array) in the look of ``appearance`` (module doc).
    ``output_prompt`` defaults to the structure's; ``options`` go to
    :class:`CrossImageAttention` (``contrast``, ``windows``, ``structure_every``,
    ``structure_until``). ``sampler`` (default DDIM) samples the output row after an inversion
    without noise maps; ``ddpm_edit_friendly`` brings its own. ``inversion_cfg`` (default
    ``cfg``) inverts both images at another guidance (the reference: 3.5, sampling at 1).
    ``skip``: the share of the steps the output skips, starting from the structure's latent on
    its trajectory at that step (the reference: 32 of 100); the step windows (``adain_steps``,
    ``windows``) then count over the steps that run."""
    from ..inversion import invert, method_config

    output_prompt = structure_prompt if output_prompt is None else output_prompt  # "" stays ""
    prompts = [appearance_prompt, structure_prompt, output_prompt]
    for p in prompts:
        model.check_prompt(p)
    count("steps", steps)
    finite("cfg", cfg)
    inversion_cfg = cfg if inversion_cfg is None else inversion_cfg
    finite("inversion_cfg", inversion_cfg)
    if not (math.isfinite(skip) and 0 <= skip < 1):
        raise ValueError(f"skip must be a share of the steps in [0, 1), got {skip}; the "
                         f"reference skips 0.32")
    start = math.floor(skip * steps + 0.5)
    if start >= steps:
        raise ValueError(f"skip={skip} of {steps} steps leaves no step to run; lower it")
    finite("swap_guidance", swap_guidance, low=1.0)
    check_window(adain_steps, "adain_steps")
    if not cross_image and (swap_guidance != 1.0 or options):
        raise ValueError("cross_image=False runs no cross-image attention, so swap guidance and "
                         f"{', '.join(options) or 'its options'} do nothing: pass "
                         "swap_guidance=1.0 and no attention options")
    if inversion == "ddpm_edit_friendly" and sampler is not None:
        raise ValueError(f"sampler={sampler!r}: after ddpm_edit_friendly the output follows the "
                         "structure's noise maps on that inversion's own step; leave sampler "
                         "unset, or pick another inversion")
    ctrl = CrossImageAttention(**options)
    step = get_step(sampler or "ddim")
    images = [np.asarray(appearance), np.asarray(structure)]
    if images[0].shape != images[1].shape:
        raise ValueError(f"the structure ({images[1].shape}) and appearance ({images[0].shape}) "
                         f"images differ in size; resize one to the other")
    config = method_config(inversion, {"seed": seed} if inversion == "ddpm_edit_friendly" else {})
    inv = invert(model, np.stack(images), prompts[:2], method=inversion, steps=steps,
                 cfg=inversion_cfg, config=config, progress=progress)
    traj: Tensor = inv.trajectory[start:]  # (steps - start + 1, 2, C, h, w) on the grid
    times = inv.times[start:]
    x = torch.cat([traj[0], traj[0][1:2]]).to(model.device)  # output from the structure's noise
    noises, offsets = None, []
    if inv.noises is not None:
        step, noises, offsets = _structure_noise(inv, start)
    callbacks = [*offsets, pin_row(traj[:, 0], 0), pin_row(traj[:, 1], 1),
                 _adain_callback(adain_steps, steps - start)]
    den = model.denoiser(prompts, cfg=cfg)
    layout = BatchLayout(ROLES, guidance_halves(den))
    controllers = [ctrl] if cross_image else []
    with torch.no_grad(), attention_control(model.network, controllers, layout=layout) as session:
        guided = session.denoiser(den, times)
        if cross_image:
            guided = _swap_guided(guided, ctrl, times, swap_guidance)
        latents = sample(guided, x, times, step=step, callbacks=callbacks, progress=progress,
                         noises=noises, generator=torch.Generator().manual_seed(seed))
    out = model.decode(latents)
    return Transfer(output=out[2], structure=out[1], appearance=out[0])
