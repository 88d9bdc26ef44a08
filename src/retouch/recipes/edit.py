"""Edit a generated image by changing its prompt: two branches, one batch, attention control.

The source row (``source_prompt``) and the target row (``target_prompt``) start from the same
noise and share every sampler noise; an *editor* (a list of attention controllers) makes the
target keep what it should of the source. Editors: ``"none"`` (the baseline), ``"p2p"``
(Prompt-to-Prompt word swap / refinement / re-weighting / local blending), ``"masactrl"``
(mutual self-attention), ``"pnp"`` (Plug-and-Play feature and self-attention injection).

Real images later reuse this with an inversion: ``start`` gives the start latents and
``source_trajectory`` (the inversion's latents on the same grid) pins the source row at every
step; ``callbacks`` run first each step (per-step corrections of the source branch), and
``denoiser`` replaces the default CFG denoiser (e.g. per-step null-text embeddings).

References: Hertz et al. 2022 (Prompt-to-Prompt); Cao et al. 2023 (MasaCtrl); Tumanyan et al.
2023 (Plug-and-Play).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..attention import (
    AttentionStore,
    BatchLayout,
    Controller,
    LocalBlend,
    MutualSelfAttention,
    PlugAndPlay,
    SelfAttentionInjection,
    attention_control,
    guidance_halves,
    local_blend,
    refinement,
    reweight,
    word_swap,
)
from ..attention.sites import Window
from ..samplers import StepContext, get_step, sample

__all__ = [
    "EditResult",
    "EDITORS",
    "edit_generated",
    "p2p_editor",
    "masactrl_editor",
    "pnp_editor",
    "no_editor",
]

ROLES = ("source", "target")  # latent rows of an edit


@dataclass
class EditResult:
    """What :func:`edit_generated` returns."""

    source: np.ndarray  # uint8 (H, W, 3), the source prompt's image
    edited: np.ndarray  # uint8 (H, W, 3), the target prompt's image under the editor
    latents: Tensor  # (2, C, h, w) final latents, rows [source, target]
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. "local_blend": (h, w)
    controllers: list[Controller] = field(default_factory=list)  # what ran (stores keep maps)
    store: AttentionStore | None = None  # cross-attention maps, if ``maps=True``


def p2p_editor(
    tokenizer,
    source: str,
    target: str,
    *,
    mode: str = "auto",
    cross_steps: Window = 0.8,
    self_steps: Window = 0.4,
    word_steps: Mapping[str, Window] | None = None,
    weights: Mapping[str, float] | None = None,
    blend_words: tuple[str | Sequence[str], str | Sequence[str]] | None = None,
    blend_threshold: float = 0.3,
    blend_start: float = 0.2,
    blend_dilation: int = 1,
) -> list[Controller]:
    """Prompt-to-Prompt controllers.

    ``mode``: "swap" (word swap; refused unless words swap one for one with equal token
    counts), "refine" (aligned tokens; words added or removed), "auto" (swap when allowed,
    else refine). ``cross_steps`` / ``self_steps``: injection windows (fractions of the steps);
    ``word_steps``: per-target-word cross windows; ``weights``: re-weighting of target words;
    ``blend_words``: (source words, target words) for local blending, with its
    ``blend_threshold``, first step ``blend_start`` (fraction) and max-pool radius
    ``blend_dilation``.
    """
    kw = dict(steps=cross_steps, word_steps=word_steps)
    if mode == "swap":
        cross = word_swap(tokenizer, source, target, **kw)
    elif mode == "refine":
        cross = refinement(tokenizer, source, target, **kw)
    elif mode == "auto":
        try:
            cross = word_swap(tokenizer, source, target, **kw)
        except ValueError:
            cross = refinement(tokenizer, source, target, **kw)
    else:
        raise ValueError(f"unknown Prompt-to-Prompt mode {mode!r}; valid: auto, swap, refine")
    controllers: list[Controller] = [cross]
    if weights:
        controllers.append(reweight(tokenizer, target, weights, steps=cross_steps))
    controllers.append(SelfAttentionInjection(steps=self_steps))
    if blend_words is not None:
        controllers.append(local_blend(tokenizer, source, target, *blend_words,
                                       threshold=blend_threshold, start=blend_start,
                                       dilation=blend_dilation))
    return controllers


def masactrl_editor(
    tokenizer, source: str, target: str, *, start_step: int = 4, start_layer: int = 10,
    end_step: int | None = None,
) -> list[Controller]:
    """MasaCtrl: target self-attention reads the source's keys/values from step S, layer L."""
    return [MutualSelfAttention(start_step=start_step, start_layer=start_layer,
                                end_step=end_step)]


def pnp_editor(
    tokenizer, source: str, target: str, *, attention_steps: Window = 0.5,
    feature_steps: Window = 0.8, feature_module: str | None = "up_blocks.1.resnets.1.conv2",
    first_layer: int = 1, source_half: str | None = None,
) -> list[Controller]:
    """Plug-and-Play: source features and decoder self-attention injected into the target."""
    return [PlugAndPlay(attention_steps=attention_steps, feature_steps=feature_steps,
                        feature_module=feature_module, first_layer=first_layer,
                        source_half=source_half)]


def no_editor(tokenizer, source: str, target: str) -> list[Controller]:
    """No control: both prompts from the same noise (the baseline edits are compared to)."""
    return []


#: Editors by name: ``(tokenizer, source, target, **options) -> controllers``.
EDITORS: dict[str, Callable[..., list[Controller]]] = {
    "none": no_editor,
    "p2p": p2p_editor,
    "masactrl": masactrl_editor,
    "pnp": pnp_editor,
}


def _start_latents(model, start: Tensor | None, seed: int, times) -> Tensor:
    if start is not None:
        if start.shape[0] not in (1, 2):
            raise ValueError(f"start latents need 1 or 2 rows, got {start.shape[0]}")
        return start.expand(2, *start.shape[1:]).clone().to(model.device)
    alpha, sigma = model.schedule.coeffs(float(times[0]))
    noise = torch.randn(model.latent_shape(1), generator=torch.Generator().manual_seed(seed))
    # x_T ~ N(0, alpha^2 + sigma^2): N(0, 1) for VP, sigma alone for flow at t = 1.
    return (noise * (alpha**2 + sigma**2) ** 0.5).expand(2, *noise.shape[1:]).to(model.device)


def _pin_source(trajectory: Sequence[Tensor]) -> Callable[[StepContext], Tensor]:
    """Callback: after step i, the source row is the given trajectory's latent at t_{i+1}."""

    def pin(ctx: StepContext) -> Tensor:
        x = ctx.x.clone()
        x[0] = trajectory[ctx.i + 1].reshape(x.shape[1:]).to(x)
        return x

    return pin


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
    [source, target], replacing ``model.denoiser``).
    """
    if editor not in EDITORS:
        raise ValueError(f"unknown editor {editor!r}; valid: {', '.join(EDITORS)}")
    step = get_step(sampler)
    controllers = EDITORS[editor](model.tokenizer, source_prompt, target_prompt,
                                  **editor_options)
    store = AttentionStore() if maps else None
    if store is not None:
        controllers = [store, *controllers]
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
    layout = BatchLayout(ROLES, guidance_halves(den))
    # One noise per step shared by both rows, so stochastic samplers keep the branches paired.
    gen = torch.Generator().manual_seed(seed + 1)
    noises = [torch.randn(model.latent_shape(1), generator=gen).expand_as(x).to(x)
              for _ in range(len(times) - 1)]
    extra = [*callbacks] + ([_pin_source(source_trajectory)] if source_trajectory else [])
    with torch.no_grad(), attention_control(model.unet, controllers, layout=layout) as session:
        latents = sample(session.denoiser(den, times), x, times, step=step, noises=noises,
                         callbacks=[*extra, session.callback], progress=progress)
    images = model.decode(latents)
    masks = {}
    for c in controllers:
        if isinstance(c, LocalBlend) and c.mask is not None:
            masks["local_blend"] = c.mask.cpu().numpy()  # (h, w), 1 = edited region
    return EditResult(images[0], images[1], latents, masks, list(controllers), store)
