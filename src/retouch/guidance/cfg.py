"""Classifier-free guidance and its relatives, each a denoiser that wraps a conditional one.

* :class:`CFGDenoiser`: ``x0 = x0_u + w (x0_c - x0_u)``, both branches in one batched call.
* :class:`NullTextGuidance`: CFG whose unconditional embedding changes per step (null-text
  inversion's ``∅_k``).
* :class:`DualGuidance`: InstructPix2Pix's two scales over an image and a text condition.

Guiding ``x0`` equals guiding ``eps`` or ``v``: each is affine in the other with the same
``x``, and the weights sum to one. Unconditional rows come FIRST in a batched call (as in
diffusers' SD pipelines); each class names its row blocks in ``halves``.

References: Ho & Salimans 2022 (CFG, eq. 6); Mokady et al. 2023 (null-text inversion);
Brooks et al. 2023 (InstructPix2Pix, eq. 3).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["combine", "batch_tree", "expand_tree", "as_kwargs", "CFGDenoiser",
           "NullTextGuidance", "DualGuidance"]


def combine(x0_u: Tensor, x0_c: Tensor, scale: float) -> Tensor:
    """``x0_u + w (x0_c - x0_u)``: the guided prediction (``w = 1``: conditional only)."""
    return x0_u + scale * (x0_c - x0_u)


def batch_tree(trees: Sequence[Any]) -> Any:
    """Concatenate conditioning trees (tensors, dicts of them, or objects with a ``cat``
    such as :class:`~retouch.models.Conditioning`) along the batch axis."""
    first = trees[0]
    if isinstance(first, Tensor):
        return torch.cat(list(trees))
    if isinstance(first, Mapping):
        return {k: batch_tree([t[k] for t in trees]) for k in first}
    if hasattr(type(first), "cat"):
        return type(first).cat(list(trees))
    raise TypeError(f"cannot batch conditioning of type {type(first).__name__}")


def expand_tree(c: Any, batch: int) -> Any:
    """Repeat a batch-1 conditioning tree to ``batch`` rows (a prompt shared by all latents)."""
    if isinstance(c, Tensor):
        return c.expand(batch, *c.shape[1:]) if c.shape[0] == 1 and batch > 1 else c
    if isinstance(c, Mapping):
        return {k: expand_tree(v, batch) for k, v in c.items()}
    if hasattr(c, "expand"):
        return c.expand(batch)
    return c


def as_kwargs(c: Any) -> dict[str, Any]:
    """A branch's keyword arguments to the inner denoiser: a mapping as it is, a tensor as the
    token embeddings (``encoder_hidden_states``), a typed conditioning as ``cond``."""
    if isinstance(c, Mapping):
        return dict(c)
    if isinstance(c, Tensor):
        return {"encoder_hidden_states": c}
    return {"cond": c}


def _branches(inner, x: Tensor, t: float, conds: Sequence[Mapping[str, Any]],
              batched: bool) -> list[Tensor]:
    """``inner(x, t, **c)`` for every ``c`` in ``conds``: one stacked call, or one each."""
    b = x.shape[0]
    conds = [{k: expand_tree(v, b) for k, v in c.items()} for c in conds]
    if batched:
        both = {k: batch_tree([c[k] for c in conds]) for k in conds[0]}
        return list(inner(torch.cat([x] * len(conds)), t, **both).chunk(len(conds)))
    return [inner(x, t, **c) for c in conds]


class CFGDenoiser:
    """Classifier-free guidance: ``x0 = x0_u + w (x0_c - x0_u)``, one batched inner call.

    ``inner(x, t, **cond)`` is a conditional denoiser (e.g. :class:`~retouch.models.UNetDenoiser`
    called with ``encoder_hidden_states=``).
    """

    def __init__(
        self,
        inner: Callable[..., Tensor],
        *,
        cond: Any,
        uncond: Any,
        scale: float,
        batched: bool = True,
    ):
        cond, uncond = as_kwargs(cond), as_kwargs(uncond)
        if set(cond) != set(uncond):
            raise ValueError(f"cond keys {sorted(cond)} differ from uncond keys {sorted(uncond)}")
        self.inner = inner
        self.schedule = inner.schedule
        self.cond = cond  # keyword arguments of the conditional branch (see as_kwargs)
        self.uncond = uncond  # keyword arguments of the unconditional branch
        self.scale = scale  # guidance weight w; 1 = conditional only, 0 = unconditional only
        self.batched = batched  # one inner call on [uncond; cond] rows (what SD does)

    @property
    def halves(self) -> tuple[str, ...] | None:
        """Row blocks of the model call (None: two calls, no fixed layout)."""
        return ("uncond", "cond") if self.batched else None

    def __call__(self, x: Tensor, t: float) -> Tensor:
        x0_u, x0_c = _branches(self.inner, x, t, [self.uncond, self.cond], self.batched)
        return combine(x0_u, x0_c, self.scale)


class NullTextGuidance:
    """CFG with the current step's null embedding: ``x0(∅_k) + w (x0(c) - x0(∅_k))``.

    ``embeddings[k]`` is the unconditional conditioning of sampling step ``k`` (the step from
    ``times[k]``): a (B, L, D) text embedding or a typed conditioning (see :func:`as_kwargs`).
    """

    halves = ("uncond", "cond")

    def __init__(self, inner: Callable[..., Tensor], *, cond: Any,
                 embeddings: Sequence[Any], times: Sequence[float] | Tensor, scale: float):
        ts = [float(t) for t in (times.tolist() if isinstance(times, Tensor) else times)]
        if len(embeddings) != len(ts) - 1:
            raise ValueError(f"{len(embeddings)} null embeddings for {len(ts) - 1} steps")
        self.inner, self.schedule = inner, inner.schedule
        self.cond, self.embeddings, self.scale = cond, list(embeddings), scale
        self._step = {t: k for k, t in enumerate(ts[:-1])}  # t_k -> k

    def __call__(self, x: Tensor, t: float) -> Tensor:
        k = self._step.get(float(t))
        if k is None:
            raise ValueError(f"time {t} is not a step of this null-text guidance's grid")
        branches = [as_kwargs(self.embeddings[k]), as_kwargs(self.cond)]
        x0_u, x0_c = _branches(self.inner, x, t, branches, True)
        return combine(x0_u, x0_c, self.scale)


class DualGuidance:
    """Two guidance scales over an image condition and a text condition (InstructPix2Pix):

    ``x0 = x0(∅, ∅) + s_I (x0(c_I, ∅) - x0(∅, ∅)) + s_T (x0(c_I, c_T) - x0(c_I, ∅))``,
    the three branches in one batched call. ``uncond``, ``image`` and ``full`` are the
    conditionings of the three branches (see :func:`as_kwargs`) for an inner denoiser that
    takes the image condition as one of them; retouch's adapters do not load InstructPix2Pix's
    8-channel UNet yet.
    """

    halves = ("uncond", "image", "cond")

    def __init__(self, inner: Callable[..., Tensor], *, uncond: Any, image: Any, full: Any,
                 image_scale: float, text_scale: float):
        uncond, image, full = as_kwargs(uncond), as_kwargs(image), as_kwargs(full)
        if not set(uncond) == set(image) == set(full):
            raise ValueError("the three branches need the same conditioning keys, got "
                             f"{sorted(uncond)}, {sorted(image)}, {sorted(full)}")
        self.inner, self.schedule = inner, inner.schedule
        self.branches = [uncond, image, full]
        self.image_scale, self.text_scale = image_scale, text_scale

    def __call__(self, x: Tensor, t: float) -> Tensor:
        x0_u, x0_i, x0_f = _branches(self.inner, x, t, self.branches, True)
        return x0_u + self.image_scale * (x0_i - x0_u) + self.text_scale * (x0_f - x0_i)
