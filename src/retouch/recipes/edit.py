"""Edit an image by changing its prompt: two branches, one batch, attention control.

The source row (``source_prompt``) and the target row (``target_prompt``) start from the same
latent; an *editor* (a list of attention controllers, :data:`.editors.EDITORS`: none, p2p,
masactrl, pnp) makes the target keep what it should of the source.

* :func:`edit_generated`: both rows from the same noise (a generated source).
* :func:`edit` (a real image): any inversion of :data:`retouch.inversion.METHODS` with any
  editor. The inversion's reconstruction runs as the source row and a target row beside it in
  one batch (:func:`retouch.inversion.reconstruct` with a target): the controllers sit inside
  the network (a controlled denoiser under the inversion's own guidance, per-step null
  embeddings, EDICT / BDIA coupling, edit-friendly noise maps) and local blending is a callback
  of the inversion's own loop. :func:`edit_inverted` edits a ready :class:`Inversion`.
  ``editor="none"`` is re-generation from the inverted noise with the target prompt.
  One combination is refused: EDICT's two-chain loop takes no per-step callbacks, so no
  local blending with ``inversion="edict"`` (p2p without ``blend_*``, masactrl, pnp and none
  run; every other inversion takes every editor). BDIA's loop starts at step 1 (its ``x_1``
  is stored): a controller whose window holds step 0 only never runs, and is reported.
  **Identical prompts** give back the source reconstruction (target row = source row) for
  every inversion whose corrections act on both rows -- all but ``direct``, whose offsets pin
  the source row only and leave the target free, as the paper does; with ``edict``, ``bdia``
  and ``ddpm_edit_friendly`` that reconstruction is the input latent to round-off.
* :func:`sdedit`: the no-inversion baseline (noise to strength ``s``, denoise with the target).

References: Hertz et al. 2022 (Prompt-to-Prompt); Cao et al. 2023 (MasaCtrl); Tumanyan et al.
2023 (Plug-and-Play); Ju et al. 2023 (Direct Inversion); Meng et al. 2022 (SDEdit).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from ..attention import (
    AttentionStore,
    BatchLayout,
    Controller,
    LocalBlend,
    attention_control,
    guidance_halves,
)
from ..attention.session import controlled_network
from ..checks import count, finite
from ..samplers import StepContext, ddim_step, get_step, sample, start_latents
from ..samplers.callbacks import pin_row
from .editors import EDITORS, check_editor

__all__ = [
    "EditResult",
    "EditPlugin",
    "EDITORS",
    "edit",
    "edit_inverted",
    "edit_generated",
    "sdedit",
]

ROLES = ("source", "target")  # latent rows of an edit


class EditPlugin(Protocol):
    """What a technique adds to an edit beside its editor: controllers installed with the
    editor's, and a wrapper of the guided denoiser for rows [source, target] (e.g. a
    :class:`~retouch.guidance.LossGuidance`), given the sampling grid."""

    controllers: Sequence[Controller]

    def wrap(self, denoiser, times: Tensor): ...


@dataclass
class EditResult:
    """What :func:`edit_generated`, :func:`edit` and :func:`sdedit` return."""

    source: np.ndarray  # uint8 (H, W, 3): source prompt's image / the source's reconstruction
    edited: np.ndarray  # uint8 (H, W, 3), the target prompt's image under the editor
    latents: Tensor  # (2, C, h, w) final latents, rows [source, target]
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. "local_blend": (h, w)
    controllers: list[Controller] = field(default_factory=list)  # what ran (stores keep maps)
    store: AttentionStore | None = None  # cross-attention maps, if ``maps=True``


def _start_latents(model, start: Tensor | None, seed: int, times) -> Tensor:
    if start is not None:
        if start.shape[0] not in (1, 2):
            raise ValueError(f"start latents need 1 or 2 rows, got {start.shape[0]}")
        return start.expand(2, *start.shape[1:]).clone().to(model.device)
    noise = torch.randn(model.latent_shape(1), generator=torch.Generator().manual_seed(seed))
    x = start_latents(model.schedule, float(times[0]), noise)
    return x.expand(2, *noise.shape[1:]).to(model.device)


def edit_generated(
    model,
    source_prompt: str,
    target_prompt: str,
    *,
    editor: str = "p2p",
    steps: int = 25,
    cfg: float = 5.0,
    seed: int = 0,
    sampler: str = "ddim",
    negative: str = "",
    maps: bool = False,
    start: Tensor | None = None,
    source_trajectory: Sequence[Tensor] | None = None,
    callbacks: Sequence[Callable[[StepContext], Tensor | None]] = (),
    denoiser=None,
    plugin: EditPlugin | None = None,
    progress: bool = False,
    **editor_options,
) -> EditResult:
    """Generate ``source_prompt``'s image and its edit towards ``target_prompt``.

    ``model`` is a :class:`~retouch.models.pipeline.PipelineModel` (or anything with its
    ``unet``, ``tokenizer``, ``schedule``, ``denoiser``, ``time_grid``, ``latent_shape``,
    ``decode``, ``device``). ``editor_options`` go to the editor (see :data:`EDITORS`).
    ``maps=True`` also stores the cross-attention maps (``result.store``). Inversion hooks:
    ``start`` (1 or 2 rows), ``source_trajectory`` (``steps + 1`` latents on the time grid,
    pinning the source row), ``callbacks`` (run first each step), ``denoiser`` (for rows
    [source, target], replacing ``model.denoiser``). ``plugin``: more controllers and a wrapper
    of the guided denoiser (:class:`EditPlugin`, e.g. self-guidance).
    """
    count("steps", steps)
    finite("cfg", cfg)
    step = get_step(sampler)
    controllers, store = _controllers(model, source_prompt, target_prompt, editor, maps,
                                      editor_options, plugin)
    times = model.time_grid(steps)
    if source_trajectory is not None:
        if len(source_trajectory) != len(times):
            raise ValueError(f"source_trajectory has {len(source_trajectory)} latents for a "
                             f"grid of {len(times)} times")
        if start is None:
            start = source_trajectory[0]
    x = _start_latents(model, start, seed, times)
    den = denoiser if denoiser is not None else model.denoiser(
        [source_prompt, target_prompt], cfg=cfg, negative=negative)
    if plugin is not None:
        den = plugin.wrap(den, times)
    layout = BatchLayout(ROLES, guidance_halves(den))
    # One noise per step shared by both rows, so stochastic samplers keep the branches paired.
    gen = torch.Generator().manual_seed(seed + 1)
    noises = [torch.randn(model.latent_shape(1), generator=gen).expand_as(x).to(x)
              for _ in range(len(times) - 1)]
    extra = [*callbacks]
    if source_trajectory is not None:
        extra.append(pin_row(source_trajectory))
    with torch.no_grad(), attention_control(model.network, controllers, layout=layout) as session:
        latents = sample(session.denoiser(den, times), x, times, step=step, noises=noises,
                         callbacks=[*extra, session.callback], progress=progress)
    return _result(model, latents, controllers, store)


def _controllers(model, source: str, target: str, editor: str, maps: bool, options,
                 plugin: EditPlugin | None = None):
    """The editor's controllers, after the plugin's and an AttentionStore (if ``maps``), and
    the store. Readers come first: they see each row's own maps, before an editor rewrites
    them (Prompt-to-Prompt holds the target's cross-attention to the source's in its
    window)."""
    check_editor(editor, options)
    controlled_network(model, "editing through attention (every editor but flowedit and sdedit)")
    controllers = EDITORS[editor](model.text_tokens, source, target, **options)
    store = AttentionStore() if maps else None
    extra = [] if plugin is None else list(plugin.controllers)
    return ([] if store is None else [store]) + extra + controllers, store


def _result(model, latents: Tensor, controllers, store) -> EditResult:
    images = model.decode(latents)
    masks = {}
    for c in controllers:
        if isinstance(c, LocalBlend) and c.mask is not None:
            masks["local_blend"] = c.mask.cpu().numpy()  # (h, w), 1 = edited region
            images = c.blend_images(images)  # with space="pixels"
    return EditResult(images[0], images[1], latents, masks, list(controllers), store)


# --- real images: an inversion's reconstruction as the source branch ------------------------


def stepwise_controllers(controllers: Sequence[Controller]) -> list[Controller]:
    """Controllers acting through the loop's per-step callback (local blending)."""
    return [c for c in controllers if type(c).after_step is not Controller.after_step]


#: EDICT edits below this many steps drift apart (see :mod:`retouch.inversion.exact`).
EDICT_MIN_STEPS = 50


def check_loop(method: str, controllers: Sequence[Controller], steps: int) -> None:
    if method == "edict" and steps < EDICT_MIN_STEPS:
        warnings.warn(
            f"EDICT edits with {steps} < {EDICT_MIN_STEPS} steps usually fail: the two chains "
            "drift apart under guidance (ToyBench colour edits: 1 of 8 right at 10 steps, "
            "8 of 8 at 50 steps and CFG 3). Use steps=50 and cfg of about 3, as the paper "
            "does, or another inversion",
            stacklevel=3,
        )
    if method == "edict" and stepwise_controllers(controllers):
        names = ", ".join(type(c).__name__ for c in stepwise_controllers(controllers))
        raise ValueError(
            f"inversion 'edict' cannot run {names}: EDICT's coupled two-chain loop takes no "
            "per-step callbacks, so no local blending (blend_words / blend_positions). Valid: "
            "edict with p2p without local blending, masactrl, pnp or none; local blending with "
            "any other inversion (direct, bdia, ddpm_edit_friendly, null_text, ...)"
        )


def edit_inverted(
    model,
    inversion,
    target_prompt: str,
    *,
    editor: str = "p2p",
    maps: bool = False,
    plugin: EditPlugin | None = None,
    progress: bool = False,
    **editor_options,
) -> EditResult:
    """Edit the image of ``inversion`` (one image, made from ``model`` with its source prompt)
    towards ``target_prompt``: its reconstruction is the source row (see the module doc).

    Steps and guidance are the inversion's. ``editor_options`` go to the editor; ``plugin``
    as in :func:`edit_generated`.
    """
    source = inversion.prompt
    if not isinstance(source, str) or inversion.batch != 1:
        raise ValueError("edit_inverted needs the inversion of one image made from a pipeline "
                         "model with its source prompt (invert(model, image, prompt, ...))")
    model.check_prompt(target_prompt)
    controllers, store = _controllers(model, source, target_prompt, editor, maps,
                                      editor_options, plugin)
    check_loop(inversion.method, controllers, len(inversion.times) - 1)
    return _run_inverted(model, inversion, target_prompt, controllers, store, progress, plugin)


def guided_halves(model, cfg: float) -> tuple[str, ...]:
    """The guidance halves of a model call at ``cfg``: one for ``cfg = 1`` or a
    guidance-distilled model (``embed_guidance``), else [uncond; cond]."""
    one = cfg == 1.0 or getattr(model, "embed_guidance", None) is not None
    return ("cond",) if one else ("uncond", "cond")


def _run_inverted(model, inv, target: str, controllers, store, progress: bool,
                  plugin: EditPlugin | None = None) -> EditResult:
    from ..inversion import DenoiserFactory, fingerprint_of, reconstruct

    # The inversion's denoisers batch [uncond rows; cond rows] of [source, target] in one call
    # (one half for a guidance-distilled model, which reads cfg as an input).
    layout = BatchLayout(ROLES, guided_halves(model, inv.cfg))
    inner = model.unet_denoiser()
    stepwise = bool(stepwise_controllers(controllers))
    cond, uncond = inv.conditioning or (model.encode([inv.prompt]), model.encode_negative([""]))
    with torch.no_grad(), attention_control(model.network, controllers, layout=layout) as session:
        factory = DenoiserFactory(
            session.denoiser(inner, inv.times),  # the controllers learn step and time here
            cond=cond,
            uncond=uncond,
            fingerprint=fingerprint_of(model),
            embed_guidance=model.embed_guidance,
        )
        latents = reconstruct(inv, factory, target=model.encode([target]),
                              callbacks=[session.callback] if stepwise else (),
                              guide=None if plugin is None else (
                                  lambda den: plugin.wrap(den, inv.times)),
                              progress=progress)
    return _result(model, latents, controllers, store)


def edit(
    model,
    image,
    source_prompt: str,
    target_prompt: str,
    *,
    inversion: str = "direct",
    editor: str = "p2p",
    steps: int = 25,
    cfg: float = 5.0,
    seed: int = 0,
    inversion_options: Mapping | None = None,
    maps: bool = False,
    plugin: EditPlugin | None = None,
    progress: bool = False,
    **editor_options,
) -> EditResult:
    """Edit a real ``image`` (PIL / uint8 array, or a latent tensor (1, C, h, w)) captioned
    ``source_prompt`` towards ``target_prompt``: invert with ``inversion`` (one of
    :data:`retouch.inversion.METHODS`, options ``inversion_options``), then
    :func:`edit_inverted` with ``editor``. ``seed`` seeds the inversion's randomness
    (``ddpm_edit_friendly``'s noises; the other methods are deterministic). Combinations are
    checked before the inversion is paid for (see the module doc).
    """
    from ..inversion import invert, method_config

    count("steps", steps)
    finite("cfg", cfg)
    model.check_prompt(source_prompt)
    model.check_prompt(target_prompt)
    options = dict(inversion_options or {})
    if inversion == "ddpm_edit_friendly":
        options.setdefault("seed", seed)
    config = method_config(inversion, options)
    controllers, store = _controllers(model, source_prompt, target_prompt, editor, maps,
                                      editor_options, plugin)
    check_loop(inversion, controllers, steps)
    inv = invert(model, image, source_prompt, method=inversion, steps=steps, cfg=cfg,
                 config=config, progress=progress)
    return _run_inverted(model, inv, target_prompt, controllers, store, progress, plugin)


def sdedit(
    model,
    image,
    target_prompt: str,
    *,
    strength: float = 0.6,
    steps: int = 25,
    cfg: float = 5.0,
    seed: int = 0,
    progress: bool = False,
) -> EditResult:
    """SDEdit: noise the image's latent ``x0`` to ``x_t = alpha_t x0 + sigma_t eps`` at the
    time ``strength`` of the way up the ``steps``-step grid, and denoise it (DDIM) with the
    target prompt. ``result.source`` is the VAE round trip; ``strength=0`` returns it as the
    edit. No attention control. References: Meng et al. 2022 (SDEdit), diffusers img2img.
    """
    finite("strength", strength, low=0.0, high=1.0)
    count("steps", steps)
    finite("cfg", cfg)
    model.check_prompt(target_prompt)
    z = (model.check_latent(image).to(model.device) if isinstance(image, Tensor)
         else model.encode_image(image))
    run = min(int(steps * strength), steps)  # steps actually run, as diffusers' img2img
    x = z
    if run > 0:
        times = model.time_grid(steps)[steps - run:]
        alpha, sigma = model.schedule.coeffs(float(times[0]))
        eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed)).to(z)
        with torch.no_grad():
            x = sample(model.denoiser([target_prompt], cfg=cfg), alpha * z + sigma * eps, times,
                       step=ddim_step, progress=progress)
    return _result(model, torch.cat([z, x]), [], None)
