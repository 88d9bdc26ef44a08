"""Prompt-to-Prompt: edit a generated image by injecting the source branch's attention maps.

The source row (prompt P) and target row (prompt P*) are sampled together from the same noise.
During the injection windows the target's attention probabilities are replaced:

* cross-attention, :class:`CrossAttentionInjection`: ``M*_t[j] <- alpha_t[j] M_t[mapper[j]]
  + (1 - alpha_t[j]) M*_t[j]``, with ``alpha_t[j] = mask[j] * 1[t in window(j)]``. Word swap
  maps every token to itself; refinement aligns tokens (:mod:`retouch.attention.tokens`);
* attention re-weighting, :class:`Reweight`: ``M*_t[j] <- c_j M*_t[j]`` (stacked after an
  injection, as Prompt-to-Prompt's re-weighting of the injected maps);
* self-attention, :class:`SelfAttentionInjection`: ``M*_t <- M_t`` at coarse sites only;
* local blending is in :mod:`retouch.attention.blend`.

As the reference code, maps are edited in the conditional half of CFG only.

References: Hertz et al. 2022, "Prompt-to-Prompt Image Editing with Cross Attention Control",
Sec. 3.2 (Edit(M_t, M*_t, t), eq. for word swap, refinement, re-weighting) and App. (self-
attention injection, per-word injection schedules); google/prompt-to-prompt.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
from torch import Tensor

from retouch.attention.control import AttnCall, Controller
from retouch.attention.sites import Site, Window, coarse_resolution, in_window
from retouch.attention.tokens import (
    refinement_map,
    sequence_length,
    swap_map,
    word_positions,
)

__all__ = [
    "CrossAttentionInjection",
    "Reweight",
    "SelfAttentionInjection",
    "word_swap",
    "refinement",
    "reweight",
]


class CrossAttentionInjection(Controller):
    """Target cross-attention maps from the source's, through a token map (see module doc)."""

    uses_probs = True

    def __init__(
        self,
        mapper: Tensor,
        mask: Tensor,
        *,
        steps: Window = 0.8,
        token_steps: Mapping[int, Window] | None = None,
        source: str = "source",
        target: str = "target",
        halves: Collection[str] = ("cond",),
    ):
        if mapper.shape != mask.shape or mapper.ndim != 1:
            raise ValueError(f"mapper {tuple(mapper.shape)} and mask {tuple(mask.shape)} must be "
                             "vectors of the encoder length T")
        self.mapper = mapper.long()  # (T,) source token feeding each target token
        self.mask = mask.float()  # (T,) 1 where the target token takes the source's map
        self.steps = steps  # default injection window (fractions of the steps)
        self.token_steps = dict(token_steps or {})  # target position -> its own window
        self.source, self.target = source, target  # row roles in the batch layout
        self.halves = tuple(halves)  # CFG halves edited
        self._alpha: dict[tuple[int, int], Tensor] = {}

    def select(self, site: Site) -> bool:
        return site.kind == "cross"

    def alpha(self, step: int, num_steps: int) -> Tensor:
        """``alpha_t`` (T,): which target tokens take the source's maps at this step."""
        key = (step, num_steps)
        if key not in self._alpha:
            on = [in_window(step, num_steps, self.token_steps.get(j, self.steps))
                  for j in range(len(self.mask))]
            self._alpha[key] = self.mask * torch.tensor(on, dtype=torch.float32)
        return self._alpha[key]

    def active(self, call: AttnCall) -> bool:
        return bool(self.alpha(call.step, call.num_steps).any())

    def probs(self, call: AttnCall, p: Tensor) -> Tensor:
        if p.shape[-1] != len(self.mapper):
            raise ValueError(f"token map is for {len(self.mapper)} tokens, attention has "
                             f"{p.shape[-1]} (a different text encoder length)")
        src, tgt = call.pair_rows(self.source, self.target, self.halves, p.device)
        a = self.alpha(call.step, call.num_steps).to(p)
        base = p[src][..., self.mapper.to(p.device)]  # M_t[mapper]: (B', H, N, T)
        return p.index_copy(0, tgt, a * base + (1 - a) * p[tgt])


class Reweight(Controller):
    """Scale the target's cross-attention to chosen tokens: ``M*[..., j] <- c_j M*[..., j]``."""

    uses_probs = True

    def __init__(
        self,
        scales: Tensor,
        *,
        steps: Window = 0.8,
        target: str = "target",
        halves: Collection[str] = ("cond",),
    ):
        self.scales = scales.float()  # (T,) c_j, 1 for tokens left alone
        self.steps = steps  # window where the scales apply (Prompt-to-Prompt: the cross window)
        self.target = target
        self.halves = tuple(halves)

    def select(self, site: Site) -> bool:
        return site.kind == "cross"

    def active(self, call: AttnCall) -> bool:
        return in_window(call.step, call.num_steps, self.steps)

    def probs(self, call: AttnCall, p: Tensor) -> Tensor:
        tgt = torch.tensor([r for h in self.halves if h in call.layout.halves
                            for r in call.layout.rows(self.target, h)], device=p.device)
        return p.index_copy(0, tgt, p[tgt] * self.scales.to(p))


class SelfAttentionInjection(Controller):
    """Target self-attention maps <- the source's, at sites of resolution <= ``max_resolution``.

    ``max_resolution`` defaults to the coarsest down/up cross-attention level (SD1.x: 16, as
    the reference code's ``<= 16**2`` queries).
    """

    uses_probs = True

    def __init__(
        self,
        *,
        steps: Window = 0.4,
        max_resolution: int | None = None,
        source: str = "source",
        target: str = "target",
        halves: Collection[str] = ("cond",),
    ):
        self.steps = steps  # injection window (fractions of the steps)
        self.max_resolution = max_resolution  # sites at or below this resolution
        self.source, self.target = source, target
        self.halves = tuple(halves)

    def bind(self, sites: list[Site]) -> list[Site]:
        if self.max_resolution is None:
            self.max_resolution = coarse_resolution(sites)
        return [s for s in sites if s.kind == "self" and s.resolution <= self.max_resolution]

    def missing_sites_message(self) -> str:
        return f"self-attention injection wants resolutions <= {self.max_resolution}"

    def active(self, call: AttnCall) -> bool:
        return in_window(call.step, call.num_steps, self.steps)

    def probs(self, call: AttnCall, p: Tensor) -> Tensor:
        src, tgt = call.pair_rows(self.source, self.target, self.halves, p.device)
        return p.index_copy(0, tgt, p[src])


def _token_steps(tokenizer, target: str, word_steps: Mapping[str, Window] | None):
    return {pos: w for word, w in (word_steps or {}).items()
            for pos in word_positions(tokenizer, target, word)}


def word_swap(
    tokenizer,
    source: str,
    target: str,
    *,
    steps: Window = 0.8,
    word_steps: Mapping[str, Window] | None = None,
    **options,
) -> CrossAttentionInjection:
    """Cross-attention injection for prompts that swap words ("a cat" -> "a dog").

    ``word_steps`` gives target words their own window (e.g. ``{"dog": 0.3}`` lets the new
    word's shape drift sooner). Refuses prompts whose swapped words differ in token count.
    """
    mapper, mask = swap_map(tokenizer, source, target)
    return CrossAttentionInjection(mapper, mask, steps=steps,
                                   token_steps=_token_steps(tokenizer, target, word_steps),
                                   **options)


def refinement(
    tokenizer,
    source: str,
    target: str,
    *,
    steps: Window = 0.8,
    word_steps: Mapping[str, Window] | None = None,
    **options,
) -> CrossAttentionInjection:
    """Cross-attention injection on the tokens common to both prompts (words added/removed)."""
    mapper, mask = refinement_map(tokenizer, source, target)
    return CrossAttentionInjection(mapper, mask, steps=steps,
                                   token_steps=_token_steps(tokenizer, target, word_steps),
                                   **options)


def reweight(
    tokenizer, prompt: str, weights: Mapping[str, float], *, steps: Window = 0.8, **options
) -> Reweight:
    """Re-weighting of words of ``prompt`` (the target's): ``{"fluffy": 2.0}``.

    Refuses words that are not in the prompt.
    """
    if not weights:
        raise ValueError("reweight needs at least one word")
    scales = torch.ones(sequence_length(tokenizer))
    for word, c in weights.items():
        try:
            scales[word_positions(tokenizer, prompt, word)] = float(c)
        except ValueError as exc:
            raise ValueError(f"cannot re-weight {word!r}: it is not in the prompt "
                             f"{prompt!r}") from exc
    return Reweight(scales, steps=steps, **options)
