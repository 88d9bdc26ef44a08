"""Views of a canvas: the windows and weights MultiDiffusion fuses.

A :class:`View` is a window of the canvas latent (top, left, height, width in latent pixels)
that the model denoises under one prompt, with a weight map over the window (1 everywhere for a
panorama window; a region's mask for region-based generation). :func:`window_boxes` tiles a
canvas with windows of the model's native size: every ``stride`` latent pixels, plus a last
window flush with the far edge, so any canvas at least one window large is covered.

References: Bar-Tal et al. 2023 (MultiDiffusion, ICML; eq. 5, the per-pixel weighted average
of the windows' predictions).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["View", "window_boxes", "check_canvas", "coverage"]


@dataclass(frozen=True)
class View:
    """One window of the canvas latent, denoised under ``prompt`` (an index into the prompts
    of the fusion), weighted by ``weight`` (h, w) or uniformly when None."""

    top: int
    left: int
    height: int
    width: int
    prompt: int = 0
    weight: Tensor | None = None  # (height, width) non-negative weights of this view's pixels
    bootstrap: bool = False  # early steps see a random constant colour outside ``weight``

    @property
    def box(self) -> tuple[slice, slice]:
        return slice(self.top, self.top + self.height), slice(self.left, self.left + self.width)

    def weights(self, device=None, dtype=torch.float32) -> Tensor:
        if self.weight is None:
            return torch.ones(self.height, self.width, device=device, dtype=dtype)
        return self.weight.to(device=device, dtype=dtype)


def _starts(size: int, window: int, stride: int) -> list[int]:
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)  # a last window flush with the edge
    return starts


def check_canvas(canvas_hw: Sequence[int], window_hw: Sequence[int], stride: int,
                 unit: str = "latent pixels") -> None:
    """Refuse a canvas smaller than one window, or a stride of 0 or larger than a window."""
    (ch, cw), (wh, ww) = canvas_hw, window_hw
    if ch < wh or cw < ww:
        raise ValueError(f"the canvas is {cw}x{ch} {unit}, smaller than one {ww}x{wh} window: "
                         f"make it at least {ww} wide and {wh} high")
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= min(wh, ww):
        raise ValueError(f"stride {stride!r} must be a whole number in [1, {min(wh, ww)}] "
                         f"{unit} (at most a window's side, so windows overlap or touch)")


def window_boxes(canvas_hw: Sequence[int], window_hw: Sequence[int],
                 stride: int) -> list[tuple[int, int]]:
    """``(top, left)`` of the windows tiling the canvas row by row (see the module doc)."""
    check_canvas(canvas_hw, window_hw, stride)
    (ch, cw), (wh, ww) = canvas_hw, window_hw
    return [(top, left) for top in _starts(ch, wh, stride) for left in _starts(cw, ww, stride)]


def coverage(views: Sequence[View], canvas_hw: Sequence[int], device=None) -> Tensor:
    """The summed weight of ``views`` at each canvas pixel (h, w); refuses views outside the
    canvas and canvas pixels no view weighs (they would have no prediction)."""
    h, w = canvas_hw
    total = torch.zeros(h, w, device=device)
    for v in views:
        if v.top < 0 or v.left < 0 or v.top + v.height > h or v.left + v.width > w:
            raise ValueError(f"a view at ({v.top}, {v.left}) of {v.width}x{v.height} lies outside "
                             f"the {w}x{h} canvas; keep every window inside it")
        if v.weight is not None:
            if tuple(v.weight.shape) != (v.height, v.width):
                raise ValueError(f"a view's weight is {tuple(v.weight.shape)}, its window "
                                 f"{(v.height, v.width)}; give one weight per window pixel")
            if not bool(torch.isfinite(v.weight).all()) or bool((v.weight < 0).any()):
                raise ValueError(f"the weights of the view at ({v.top}, {v.left}) must be finite "
                                 "and non-negative")
        total[v.box] += v.weights(device)
    empty = int((total <= 0).sum())
    if empty:
        raise ValueError(f"{empty} of {h * w} canvas latent pixels are covered by no view (or only "
                         "by zero weight): add a background prompt or regions that cover them")
    return total
