"""What a model call is conditioned on, as one typed structure that batches itself.

A :class:`Conditioning` holds the token embeddings cross-attention reads (``embeds``, the part
null-text inversion tunes and Prompt-to-Prompt's token positions index), the added conditions
some families need (SDXL's pooled text embedding and size ids), and room for further inputs
(ControlNet residuals, image tokens) in ``extra``. It expands a shared prompt to B rows,
concatenates along the batch (guidance branches, edit rows) and slices, so techniques never
touch a family's keyword arguments: the model adapter turns it into them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

__all__ = ["Conditioning"]


def _rows(v: Any, index) -> Any:
    if isinstance(v, Tensor):
        return v[index]
    if isinstance(v, Mapping):
        return {k: _rows(x, index) for k, x in v.items()}
    return v


def _expand(v: Any, batch: int) -> Any:
    if isinstance(v, Tensor):
        return v.expand(batch, *v.shape[1:]) if v.shape[0] == 1 and batch > 1 else v
    if isinstance(v, Mapping):
        return {k: _expand(x, batch) for k, x in v.items()}
    return v


def _cat(values: Sequence[Any]) -> Any:
    first = values[0]
    if isinstance(first, Tensor):
        return torch.cat(list(values))
    if isinstance(first, Mapping):
        return {k: _cat([v[k] for v in values]) for k in first}
    if any(v != first for v in values[1:]):
        raise ValueError(f"cannot stack conditionings whose extra inputs differ: {values!r}")
    return first


@dataclass(frozen=True)
class Conditioning:
    """The conditioning of B rows (or of 1 row shared by all)."""

    embeds: Tensor  # (B, L, D) token embeddings (encoder_hidden_states)
    added: Mapping[str, Tensor] = field(default_factory=dict)  # SDXL: text_embeds, time_ids
    extra: Mapping[str, Any] = field(default_factory=dict)  # further inputs, batched per row

    @property
    def rows(self) -> int:
        return self.embeds.shape[0]

    def expand(self, batch: int) -> Conditioning:
        """A 1-row conditioning as ``batch`` rows (others unchanged)."""
        if self.rows == batch:
            return self
        if self.rows != 1:
            raise ValueError(f"cannot expand a conditioning of {self.rows} rows to {batch}")
        return Conditioning(_expand(self.embeds, batch), _expand(dict(self.added), batch),
                            _expand(dict(self.extra), batch))

    @staticmethod
    def cat(conds: Sequence[Conditioning]) -> Conditioning:
        """Rows of ``conds`` stacked in order (all with the same fields)."""
        keys = {(tuple(sorted(c.added)), tuple(sorted(c.extra))) for c in conds}
        if len(keys) != 1:
            raise ValueError("cannot stack conditionings with different added or extra inputs")
        return Conditioning(_cat([c.embeds for c in conds]),
                            _cat([dict(c.added) for c in conds]) if conds[0].added else {},
                            _cat([dict(c.extra) for c in conds]) if conds[0].extra else {})

    def repeat(self, copies: int) -> Conditioning:
        """``copies`` stacked blocks of these rows."""
        return self if copies == 1 else Conditioning.cat([self] * copies)

    def __getitem__(self, index) -> Conditioning:
        """The rows ``index`` (an int keeps the batch axis)."""
        index = slice(index, index + 1 or None) if isinstance(index, int) else index
        return Conditioning(self.embeds[index], _rows(dict(self.added), index),
                            _rows(dict(self.extra), index))

    def with_embeds(self, embeds: Tensor) -> Conditioning:
        """The same conditioning with other token embeddings (null-text's tuned ∅)."""
        if embeds.shape[0] not in (self.rows, 1) and self.rows != 1:
            raise ValueError(f"cannot put {embeds.shape[0]} rows of embeddings into a "
                             f"conditioning of {self.rows} rows")
        base = self.expand(embeds.shape[0]) if self.rows == 1 else self
        if embeds.shape[0] == 1 and self.rows > 1:
            embeds = embeds.expand(self.rows, *embeds.shape[1:])
        return replace(base, embeds=embeds)

    def to(self, like: Tensor) -> Conditioning:
        """On ``like``'s device, floating tensors in its dtype."""
        def move(v):
            if isinstance(v, Tensor):
                return v.to(device=like.device, dtype=like.dtype if v.is_floating_point()
                            else v.dtype)
            if isinstance(v, Mapping):
                return {k: move(x) for k, x in v.items()}
            return v

        return Conditioning(move(self.embeds), move(dict(self.added)), move(dict(self.extra)))

    def detach(self) -> Conditioning:
        def cut(v):
            if isinstance(v, Tensor):
                return v.detach()
            if isinstance(v, Mapping):
                return {k: cut(x) for k, x in v.items()}
            return v

        return Conditioning(self.embeds.detach(), cut(dict(self.added)), cut(dict(self.extra)))
