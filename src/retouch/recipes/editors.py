"""Editors: the attention controllers that make an edit's target row keep what it should of
the source row, built by name from the two prompts.

``EDITORS[name](tokenizer, source, target, **options)`` returns a list of controllers for
:func:`retouch.recipes.edit.edit` and its siblings: ``"none"`` (the baseline), ``"p2p"``
(Prompt-to-Prompt word swap / refinement / re-weighting / local blending), ``"masactrl"``
(mutual self-attention), ``"pnp"`` (Plug-and-Play feature and self-attention injection),
``"rf_solver"`` (RF-Solver's feature sharing: the source's self-attention values).

References: Hertz et al. 2022 (Prompt-to-Prompt); Cao et al. 2023 (MasaCtrl); Tumanyan et al.
2023 (Plug-and-Play); Wang et al. 2024 (RF-Solver).
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping, Sequence

from ..attention import (
    Controller,
    LocalBlend,
    MutualSelfAttention,
    PlugAndPlay,
    SelfAttentionInjection,
    SharedValues,
    local_blend,
    refinement,
    reweight,
    word_swap,
)
from ..attention.sites import Window, check_window
from ..attention.tokens import prompt_positions, refinement_map
from ..checks import count, finite, note

__all__ = ["EDITORS", "check_editor", "changed_tokens", "p2p_editor", "masactrl_editor",
           "pnp_editor", "rf_solver_editor", "no_editor"]


def changed_tokens(tokenizer, source: str, target: str) -> tuple[list[int], list[int]]:
    """Encoder positions of the tokens one prompt has and the other lacks (the edited words):
    (source positions, target positions), from the refinement alignment."""
    mapper, mask = refinement_map(tokenizer, source, target)
    src, tgt = prompt_positions(tokenizer, source), prompt_positions(tokenizer, target)
    kept = {int(mapper[j]) for j in tgt if mask[j] > 0}
    return [i for i in src if i not in kept], [j for j in tgt if mask[j] == 0]


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
    blend_words: tuple[str | Sequence[str], str | Sequence[str]] | str | None = None,
    blend_positions: tuple[Sequence[int], Sequence[int]] | None = None,
    blend_threshold: float = 0.3,
    blend_start: float = 0.2,
    blend_dilation: int = 1,
    blend_resolutions: Sequence[int] | None = None,
    blend_space: str = "latents",
) -> list[Controller]:
    """Prompt-to-Prompt controllers.

    ``mode``: "swap" (word swap; refused unless words swap one for one with equal token
    counts), "refine" (aligned tokens; words added or removed), "auto" (swap when allowed,
    else refine). ``cross_steps`` / ``self_steps``: injection windows (fractions of the steps);
    ``word_steps``: per-target-word cross windows; ``weights``: re-weighting of target words.
    Local blending: ``blend_words`` = (source words, target words), or ``"changed"`` for the
    tokens that differ (:func:`changed_tokens`; none for identical prompts), or
    ``blend_positions`` = (source, target) encoder positions; with its ``blend_threshold``,
    first step ``blend_start`` (fraction), max-pool radius ``blend_dilation`` and the
    cross-attention resolutions whose maps make the mask, ``blend_resolutions`` (default: the
    coarsest down/up level, as the paper's 16 x 16 on SD1.x); ``blend_space`` "latents" (each
    step, the paper) or "pixels" (the decoded images, once: :class:`LocalBlend`).
    """
    kw = dict(steps=cross_steps, word_steps=word_steps)
    if mode == "swap":
        cross = word_swap(tokenizer, source, target, **kw)
    elif mode == "refine":
        cross = refinement(tokenizer, source, target, **kw)
    elif mode == "auto":
        try:
            cross = word_swap(tokenizer, source, target, **kw)
        except ValueError as why:
            note(f"Prompt-to-Prompt runs as a refinement, not a word swap: {why}".split("; use")[0])
            cross = refinement(tokenizer, source, target, **kw)
    else:
        raise ValueError(f"unknown Prompt-to-Prompt mode {mode!r}; valid: auto, swap, refine")
    controllers: list[Controller] = [cross]
    if weights:
        controllers.append(reweight(tokenizer, target, weights, steps=cross_steps))
    controllers.append(SelfAttentionInjection(steps=self_steps))
    blend = dict(threshold=blend_threshold, start=blend_start, dilation=blend_dilation,
                 resolutions=blend_resolutions, space=blend_space)
    if blend_words is not None and blend_positions is not None:
        raise ValueError("give blend_words or blend_positions, not both")
    if blend_words == "changed":
        blend_positions = changed_tokens(tokenizer, source, target)
        blend_positions = blend_positions if any(blend_positions) else None
    elif isinstance(blend_words, str):
        raise ValueError(f"blend_words is 'changed' or a (source words, target words) pair, "
                         f"got {blend_words!r}")
    elif blend_words is not None:
        controllers.append(local_blend(tokenizer, source, target, *blend_words, **blend))
    if blend_positions is not None:
        controllers.append(LocalBlend(*blend_positions, **blend))
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


def rf_solver_editor(
    tokenizer, source: str, target: str, *, share_steps: Window = 0.2,
    places: tuple[str, ...] = ("up",),
) -> list[Controller]:
    """RF-Solver's feature sharing: the target's self-attention values are the source's during
    the first ``share_steps`` (fractions of the steps; pair it with the ``rf_solver`` or
    ``fireflow`` inversion)."""
    places = (places,) if isinstance(places, str) else places  # --option places=up
    bad = sorted(set(places) - {"down", "mid", "up"}) if isinstance(places, tuple | list) else [
        places]
    if bad or not places:
        raise ValueError(f"rf_solver option places must name some of down, mid, up; got "
                         f"{places!r}")
    return [SharedValues(steps=share_steps, places=tuple(places))]


def no_editor(tokenizer, source: str, target: str) -> list[Controller]:
    """No control: both prompts from the same noise (the baseline edits are compared to)."""
    return []


#: Editors by name: ``(tokenizer, source, target, **options) -> controllers``.
EDITORS: dict[str, Callable[..., list[Controller]]] = {
    "none": no_editor,
    "p2p": p2p_editor,
    "masactrl": masactrl_editor,
    "pnp": pnp_editor,
    "rf_solver": rf_solver_editor,
}


def check_editor(editor: str, options: Mapping) -> None:
    """Refuse an unknown editor, or options ``EDITORS[editor]`` does not take, naming the valid
    ones (before any model is loaded or step is run)."""
    if editor not in EDITORS:
        raise ValueError(f"unknown editor {editor!r}; valid: {', '.join(EDITORS)}")
    params = list(inspect.signature(EDITORS[editor]).parameters)[3:]  # after the two prompts
    unknown = sorted(set(options) - set(params))
    if unknown:
        valid = ", ".join(params) if params else "none"
        raise ValueError(f"editor {editor!r} takes no option {', '.join(unknown)}; its options: "
                         f"{valid}")
    hints = typing.get_type_hints(EDITORS[editor])
    for key, value in options.items():
        _check_option(f"{editor} option {key}", value, hints.get(key))


def _check_option(name: str, value, hint) -> None:
    """Check an option whose annotation is a window, a bool, an int or a float (or one of
    them or None); other types are the editor's to check."""
    args = set(typing.get_args(hint)) or {hint}
    if value is None and type(None) in args:
        return
    args.discard(type(None))
    if args == set(typing.get_args(Window)):
        check_window(value, name)
    elif args == {bool} and not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    elif args == {int}:
        count(name, value, minimum=0)
    elif args == {float}:
        finite(name, value)
