"""Frame sequences from an image model: keyframe attention and correlated noise.

* :func:`generate_clip` (text to video): the frames are the rows of one batch; their
  self-attention reads keyframes (:class:`~retouch.attention.FrameAttention`: ``first`` as
  Text2Video-Zero, ``first+previous`` as Pix2Video, ``none``) and their start noise follows a
  noise model (:mod:`retouch.noise`: independent, shared, mixed, or warped along a known motion
  as Chang et al. do). ``dynamics`` adds Text2Video-Zero's motion dynamics: the first frame is
  denoised alone from ``T`` to ``T'`` (the second fraction of the steps), its latent is warped
  along the flows to every later frame and noised forward (DDPM) to ``T1`` (the first
  fraction), and all frames are sampled together from ``T1``; the reference's 50-step defaults
  ``t1 = 47, t0 = 44`` are :data:`T2V_ZERO_DYNAMICS`. ``pull`` adds Pix2Video's latent update
  guidance: in the steps of ``pull_steps`` each frame's clean estimate is pulled towards the
  previous frame's, ``E = 1/2 sum_j ||x0_j - sg(x0_{j-1})||^2`` through
  :class:`~retouch.guidance.LossGuidance`, weighted ``pull * alpha^2 / sigma^2`` so that
  ``pull`` is about the share of the gap one step closes.
* :func:`edit_clip` (video editing of a real clip): every frame is inverted (any method of
  :data:`retouch.inversion.METHODS`, all frames in one batch) and its reconstruction runs as the
  source row of its frame; the target rows follow the target prompts under an editor
  (:data:`.editors.EDITORS`, each target paired with its own frame's source) and keyframe
  attention among the target frames. With the ``p2p`` editor this is close to FateZero's
  scheme: the source's attention maps are fused into the edit and local blending
  (``blend_words``) blends with masks from the cross-attention; the maps come from the source's
  reconstruction running beside the edit (the inversion's trajectory for the exact methods),
  where FateZero stores them during the DDIM inversion itself.

All frames go through the model as one call (``chunk``: at most that many frames per call with
the ``first`` scheme, each chunk with the first frame beside it, which is exact since the first
frame attends only to itself; the other schemes chain frame to frame and are refused in chunks).

References: Khachatryan et al. 2023 (Text2Video-Zero, ICCV), Sec. 3.2-3.3; Ceylan et al. 2023
(Pix2Video, ICCV), Sec. 3.2; Qi et al. 2023 (FateZero, ICCV), Sec. 3 (attention fusion during
inversion, blend masks from cross-attention); Ge et al. 2023; Chang et al. 2024 (noise).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..attention import BatchLayout, FrameAttention, attention_control, guidance_halves
from ..attention.frames import check_scheme
from ..attention.sites import check_window, in_window
from ..checks import count, finite, prompt_list
from ..noise import NOISE_MODELS, frame_noise
from ..samplers import get_step, sample, start_latents
from ..schedules import Schedule
from .edit import check_loop, guided_halves, stepwise_controllers
from .editors import EDITORS, check_editor

__all__ = ["generate_clip", "edit_clip", "ClipEdit", "KEYFRAMES", "T2V_ZERO_DYNAMICS",
           "warp_latents", "renoise", "dynamics_window", "PULL_STEPS"]

KEYFRAMES = ("none", "first", "first+previous", "previous")
#: Text2Video-Zero's motion dynamics window as fractions of the steps: ``T1`` after 2 and ``T'``
#: after 5 of its 50 DDIM steps (``t1 = 47``, ``t0 = 44`` counted from the clean end).
T2V_ZERO_DYNAMICS = (0.04, 0.1)
#: The steps (fractions) in which ``pull`` guides by default: the first half.
PULL_STEPS = (0.0, 0.5)


def _reflect(index: Tensor, size: int) -> Tensor:
    """Indices outside ``[0, size)`` mirrored at the border (``-1 -> 0``, ``size -> size - 1``)."""
    m = index % (2 * size)
    return torch.where(m >= size, 2 * size - 1 - m, m)


def warp_latents(x: Tensor, flow: Tensor) -> Tensor:
    """``x`` (B, C, h, w) moved along ``flow`` (B or 1, 2, h, w; x then y, latent pixels): each
    pixel takes the value at ``p - flow(p)``, the flow rounded to whole pixels (halves up: a
    flow of 0.5 moves by 1), mirrored at the border, as the reference's nearest
    ``grid_sample`` warp with reflection does."""
    b, c, h, w = x.shape
    flow = flow.to(torch.float64).expand(b, 2, h, w)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    src_x = _reflect(xs - torch.floor(flow[:, 0] + 0.5).long(), w)
    src_y = _reflect(ys - torch.floor(flow[:, 1] + 0.5).long(), h)
    flat = (src_y * w + src_x).to(x.device).view(b, 1, h * w).expand(b, c, h * w)
    return x.reshape(b, c, h * w).gather(2, flat).view(b, c, h, w)


def renoise(schedule: Schedule, x: Tensor, t: float, t_up: float, eps: Tensor) -> Tensor:
    """The forward process from ``x_t`` to the noisier ``x_{t_up}``: ``a x + sqrt(sigma_up^2 -
    a^2 sigma^2) eps`` with ``a = alpha_up / alpha``, so ``x0``'s coefficient becomes
    ``alpha_up`` and the noise's variance ``sigma_up^2`` (the exact forward marginal)."""
    alpha, sigma = schedule.coeffs(t)
    alpha_up, sigma_up = schedule.coeffs(t_up)
    a = alpha_up / alpha
    return a * x + max(sigma_up**2 - a**2 * sigma**2, 0.0) ** 0.5 * eps


def _pull_guidance(den, pull: float, window, num_steps: int, times: Tensor):
    """Pix2Video's latent update guidance around ``den`` (module doc)."""
    from ..guidance import LossGuidance

    grid = [float(t) for t in times]

    def energy(x0: Tensor, x: Tensor, t: float) -> Tensor:
        return 0.5 * (x0[1:] - x0[:-1].detach()).pow(2).sum()

    def scale(t: float) -> float:
        i = min(range(num_steps), key=lambda k: abs(grid[k] - t))
        if not in_window(i, num_steps, window):
            return 0.0
        alpha, sigma = den.schedule.coeffs(t)
        return pull * alpha**2 / sigma**2

    return LossGuidance(den, energy, scale=scale)


def dynamics_window(dynamics, steps: int) -> tuple[int, int]:
    """Grid indices ``(k1, k0)`` of ``T1`` and ``T'``, ``0 < k1 < k0 < steps``."""
    try:
        f1, f0 = (float(v) for v in dynamics)
    except (TypeError, ValueError):
        raise ValueError(f"dynamics must be two fractions of the steps (T1, T'), e.g. "
                         f"{T2V_ZERO_DYNAMICS}, got {dynamics!r}") from None
    if not 0 < f1 < f0 < 1:
        raise ValueError(f"dynamics {dynamics!r}: need 0 < T1 < T' < 1 as fractions of the "
                         f"steps, e.g. {T2V_ZERO_DYNAMICS}")
    k1 = max(1, math.floor(f1 * steps + 0.5))  # halves up: 0.1 of 25 steps is step 3
    k0 = max(k1 + 1, math.floor(f0 * steps + 0.5))
    if k0 >= steps:
        raise ValueError(f"dynamics {dynamics!r} at {steps} steps leaves no step after T'; "
                         f"use more steps or smaller fractions")
    return k1, k0


def _motion_start(model, prompt: str, x: Tensor, times: Tensor, flows: Tensor, window,
                  step, cfg: float, seed: int, noises) -> tuple[Tensor, int]:
    """Text2Video-Zero's start: every frame's latent at ``T1`` (module doc) and ``k1``."""
    k1, k0 = dynamics_window(window, len(times) - 1)
    den = model.denoiser([prompt], cfg=cfg)
    with torch.no_grad():
        first_t1 = sample(den, x[:1], times[:k1 + 1], step=step,
                          noises=[n[:1] for n in noises[:k1]], progress=False)
        first_t0 = sample(den, first_t1, times[k1:k0 + 1], step=step,
                          noises=[n[:1] for n in noises[k1:k0]], progress=False)
    # Frame i from frame 1 in one warp by the flows summed up to it: exact for a translation
    # (the reference's motion field k * delta), an approximation for other flows; rounding
    # once keeps sub-pixel steps adding up.
    later = warp_latents(first_t0.expand(len(flows), *first_t0.shape[1:]), flows.cumsum(0))
    eps = torch.randn(later.shape, generator=torch.Generator().manual_seed(seed + 2)).to(x)
    moved = renoise(model.schedule, later, float(times[k0]), float(times[k1]), eps)
    return torch.cat([first_t1, moved]), k1


def _frame_prompts(prompts: str | Sequence[str], frames: int | None) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else prompt_list(prompts)
    if frames is None:
        frames = len(prompts)
    count("frames", frames)
    if len(prompts) == 1:
        return prompts * frames
    if len(prompts) != frames:
        raise ValueError(f"{len(prompts)} prompts for {frames} frames; give one prompt or one "
                         f"per frame")
    return prompts


def _check_keyframes(keyframes: str) -> list:
    if keyframes == "none":
        return []
    check_scheme(keyframes)
    return [keyframes]


def _chunks(frames: int, chunk: int | None, keyframes: str) -> list[list[int]]:
    """Frame indices of each model batch (each with frame 0 first)."""
    if chunk is None or chunk >= frames:
        return [list(range(frames))]
    count("chunk", chunk, minimum=2)
    if keyframes not in ("none", "first"):
        raise ValueError(f"the {keyframes!r} scheme chains each frame to the previous one and "
                         f"cannot run in chunks of {chunk} frames; use keyframes='first' or "
                         f"chunk=None (all {frames} frames in one call)")
    rest = list(range(1, frames))
    return [[0] + rest[i:i + chunk - 1] for i in range(0, len(rest), chunk - 1)]


def generate_clip(
    model,
    prompts: str | Sequence[str],
    *,
    frames: int | None = None,
    keyframes: str = "first",
    noise: str = "independent",
    mix: float = 1.0,
    flows: Tensor | None = None,
    steps: int = 25,
    cfg: float = 5.0,
    seed: int = 0,
    sampler: str = "ddim",
    chunk: int | None = None,
    dynamics: tuple[float, float] | None = None,
    pull: float = 0.0,
    pull_steps: tuple[float, float] = PULL_STEPS,
    progress: bool = False,
    **options,
) -> np.ndarray:
    """Frames (F, H, W, 3) uint8 for ``prompts`` (one, or one per frame). ``keyframes``: one
    of :data:`KEYFRAMES`; ``noise``: one of :data:`retouch.noise.NOISE_MODELS` (``mix`` for
    ``mixed``; ``flows`` (F - 1, 2, h, w) in latent pixels for ``warped``, e.g.
    ``Clip.flows(h)``). ``dynamics``: Text2Video-Zero's motion dynamics along ``flows`` (module
    doc; e.g. :data:`T2V_ZERO_DYNAMICS`), with independent noise for the first frame.
    ``pull``: Pix2Video's latent update guidance in ``pull_steps`` (module doc; 0 is off).
    ``options`` go to :class:`FrameAttention` (``start_layer``, ``steps``).
    """
    prompts = _frame_prompts(prompts, frames)
    for p in set(prompts):
        model.check_prompt(p)
    count("steps", steps)
    finite("cfg", cfg)
    if noise not in NOISE_MODELS:
        raise ValueError(f"unknown noise model {noise!r}; choose one of {', '.join(NOISE_MODELS)}")
    schemes = _check_keyframes(keyframes)
    batches = _chunks(len(prompts), chunk, keyframes)
    step = get_step(sampler)
    if dynamics is not None:
        dynamics_window(dynamics, steps)
        if noise != "independent":
            raise ValueError(f"dynamics start every later frame from the first frame's latent, "
                             f"so the noise model {noise!r} has nothing to act on; use "
                             f"noise='independent' with dynamics")
        want = (len(prompts) - 1, 2, *model.latent_shape(1)[-2:])
        if flows is None or tuple(flows.shape) != want:
            got = "none" if flows is None else tuple(flows.shape)
            raise ValueError(f"dynamics warp the first frame's latent along flows: pass flows "
                             f"of shape {want} (frames - 1, x and y, the latent's size) in "
                             f"latent pixels, e.g. Clip.flows({want[-1]}); got {got}")
    finite("pull", pull, low=0.0)
    check_window(pull_steps, "pull_steps")
    if pull and len(batches) > 1:
        raise ValueError(f"pull guides each frame towards the previous one, which a chunk of "
                         f"{chunk} frames may not hold; use chunk=None or pull=0")
    times = model.time_grid(steps)
    eps = frame_noise(noise, model.latent_shape(len(prompts)), seed, mix=mix, flows=flows)
    x = start_latents(model.schedule, float(times[0]), eps).to(model.device)
    # Step noises of stochastic samplers drawn once for all frames, so chunks equal one call.
    gen = torch.Generator().manual_seed(seed + 1)
    noises = [torch.randn(x.shape, generator=gen).to(x) for _ in range(steps)]
    if dynamics is not None:
        x, k1 = _motion_start(model, prompts[0], x, times, flows, dynamics, step, cfg, seed,
                              noises)
        times, noises = times[k1:], noises[k1:]
    out = [None] * len(prompts)
    for rows in batches:
        den = model.denoiser([prompts[i] for i in rows], cfg=cfg)
        controllers = [FrameAttention(s, **options) for s in schemes]
        layout = BatchLayout(("frame",) * len(rows), guidance_halves(den))
        with torch.no_grad(), attention_control(model.network, controllers, layout=layout) as s:
            guided = s.denoiser(den, times)
            if pull:
                guided = _pull_guidance(guided, pull, pull_steps, len(times) - 1, times)
            latents = sample(guided, x[rows], times, step=step,
                             progress=progress, noises=[n[rows] for n in noises])
        for j, i in enumerate(rows):
            out[i] = latents[j : j + 1]
    return model.decode(torch.cat(out))


@dataclass
class ClipEdit:
    """What :func:`edit_clip` returns: uint8 (F, H, W, 3) frames."""

    source: np.ndarray  # the inversion's reconstruction of each frame
    edited: np.ndarray  # the edited frames
    latents: Tensor  # (2F, C, h, w): [source frames; edited frames]


def edit_clip(
    model,
    images,
    source_prompts: str | Sequence[str],
    target_prompts: str | Sequence[str],
    *,
    inversion: str = "ddim",
    editor: str = "p2p",
    keyframes: str = "first",
    steps: int = 25,
    cfg: float = 5.0,
    inversion_options: Mapping | None = None,
    progress: bool = False,
    **editor_options,
) -> ClipEdit:
    """Edit a clip ``images`` (F frames: a list of images or an (F, H, W, 3) array) captioned
    ``source_prompts`` towards ``target_prompts`` (one each, or one per frame; see the module
    doc). The editor is built from the first frame's prompt pair and applied to every frame, so
    per-frame prompts must tokenise like the first frame's (words the edit touches at the same
    places: e.g. captions that differ only in a position word)."""
    from ..inversion import DenoiserFactory, fingerprint_of, invert, method_config, reconstruct

    frames = len(images)
    sources = _frame_prompts(source_prompts, frames)
    targets = _frame_prompts(target_prompts, frames)
    for p in set(sources + targets):
        model.check_prompt(p)
    count("steps", steps)
    finite("cfg", cfg)
    check_editor(editor, editor_options)
    for name, prompts in (("source", sources), ("target", targets)):
        lengths = {len(model.tokenizer(p).input_ids) for p in prompts}
        if editor != "none" and len(lengths) > 1:
            raise ValueError(f"the frames' {name} prompts tokenise to different lengths "
                             f"({sorted(lengths)}); an editor built from the first frame's pair "
                             f"needs captions that differ only in words of one token each")
    schemes = _check_keyframes(keyframes)
    sizes = {np.asarray(im).shape for im in images}
    if len(sizes) != 1:
        raise ValueError(f"the clip's frames differ in size ({sorted(sizes)}); resize them to "
                         f"one size first")
    controllers = EDITORS[editor](model.text_tokens, sources[0], targets[0], **editor_options)
    controllers += [FrameAttention(s, role="target") for s in schemes]
    check_loop(inversion, controllers, steps)
    inv = invert(model, np.stack([np.asarray(im) for im in images]), sources, method=inversion,
                 steps=steps, cfg=cfg, config=method_config(inversion, inversion_options or {}),
                 progress=progress)
    layout = BatchLayout(("source",) * frames + ("target",) * frames,
                         guided_halves(model, inv.cfg))
    cond, uncond = inv.conditioning or (model.encode(sources), model.encode_negative([""]))
    stepwise = bool(stepwise_controllers(controllers))
    with torch.no_grad(), attention_control(model.network, controllers, layout=layout) as session:
        factory = DenoiserFactory(session.denoiser(model.unet_denoiser(), inv.times), cond=cond,
                                  uncond=uncond, fingerprint=fingerprint_of(model),
                                  embed_guidance=model.embed_guidance)
        latents = reconstruct(inv, factory, target=model.encode(targets),
                              callbacks=[session.callback] if stepwise else (),
                              progress=progress)
    images_out = model.decode(latents)
    return ClipEdit(source=images_out[:frames], edited=images_out[frames:], latents=latents)
