"""Attention maps: a bounded-memory store, per-token heatmaps and a PNG writer.

:class:`AttentionStore` keeps, per kind (cross / self), one running sum of head-averaged maps
resized to a common grid ``S x S`` and a count — never every map of every step. Cross maps are
``(R, S, S, T)`` (R latent rows, T text tokens); self maps ``(R, S^2, S^2)`` (query, key).
Self maps at high resolution are large to materialise (``N^2`` per head): select them with
``resolutions`` (Prompt-to-Prompt keeps maps up to 32x32 of SD's 64x64 latents).

References: Hertz et al. 2022 (Prompt-to-Prompt, ``AttentionStore`` and cross-attention
visualisation); SIGGRAPH 2024 course "The power of attention layers".
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch.nn.functional as F
from torch import Tensor

from retouch.attention.control import AttnCall, Controller
from retouch.attention.sites import Site, Window, in_window

__all__ = [
    "MapRecorder","AttentionStore", "resize_maps", "token_heatmaps", "save_heatmaps", "colorize"]


def resize_maps(maps: Tensor, hw: tuple[int, int], size: int) -> Tensor:
    """Resize maps over an ``h x w`` grid (last-but-one axis ``h*w``) to ``size x size``.

    Shapes: maps (..., h*w, C) -> (..., size*size, C). Area averaging when shrinking (keeps
    each map's mass per area, not its total), bilinear when growing.
    """
    h, w = hw
    if (h, w) == (size, size):
        return maps
    lead, c = maps.shape[:-2], maps.shape[-1]
    img = maps.reshape(-1, h, w, c).permute(0, 3, 1, 2)
    if h >= size and w >= size:
        img = F.adaptive_avg_pool2d(img, size)
    else:
        img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False)
    return img.permute(0, 2, 3, 1).reshape(*lead, size * size, c)


class AttentionStore(Controller):
    """Average attention maps over chosen sites and steps, at one common resolution.

    Reads the ``half`` ("cond" by default) of each call, so rows are the latent rows of the
    batch layout. ``size`` defaults to the smallest selected resolution (the coarse grid where
    Prompt-to-Prompt aggregates).
    """

    uses_probs = True
    rewrites = False  # reads the maps only

    def __init__(
        self,
        *,
        kinds: Collection[str] = ("cross",),
        resolutions: Collection[int] | None = None,
        places: Collection[str] = ("down", "up"),
        steps: Window = (0.0, 1.0),
        half: str = "cond",
        size: int | None = None,
    ):
        unknown = set(kinds) - {"cross", "self"}
        if unknown or not kinds:
            raise ValueError(f"kinds must be 'cross' and/or 'self', got {sorted(kinds)}")
        self.kinds = tuple(kinds)  # which attention maps to keep
        self.resolutions = None if resolutions is None else set(resolutions)  # site resolutions
        self.places = tuple(places)  # UNet parts to read ("down", "mid", "up")
        self.steps = steps  # step window (fractions) to aggregate over
        self.half = half  # guidance half whose rows are read
        self.size = size  # common grid side S (None: smallest selected resolution)
        self.sums: dict[str, Tensor] = {}  # kind -> running sum of resized maps
        self.counts: dict[str, int] = {k: 0 for k in self.kinds}  # kind -> maps summed

    def select(self, site: Site) -> bool:
        return (
            site.kind in self.kinds
            and site.place in self.places
            and (self.resolutions is None or site.resolution in self.resolutions)
        )

    def missing_sites_message(self) -> str:
        res = "any resolution" if self.resolutions is None else (
            "resolution " + ", ".join(map(str, sorted(self.resolutions))))
        return (f"{type(self).__name__} wants {'/'.join(self.kinds)}-attention maps at {res} "
                f"in {'/'.join(self.places)} blocks, which this model lacks")

    def bind(self, sites: list[Site]) -> list[Site]:
        chosen = super().bind(sites)
        if self.size is None and chosen:
            self.size = min(s.resolution for s in chosen)
        return chosen

    def active(self, call: AttnCall) -> bool:
        return in_window(call.step, call.num_steps, self.steps)

    def probs(self, call: AttnCall, p: Tensor) -> Tensor:
        maps = p[call.layout.half_rows(self.half)].mean(1).detach()  # (R, N, M), mean over heads
        s = self.size
        if call.site.kind == "cross":
            maps = resize_maps(maps, call.hw, s)  # (R, S*S, T)
        else:  # resize the key axis, then the query axis
            maps = resize_maps(maps.transpose(1, 2), call.hw, s).transpose(1, 2)
            # A row is a distribution over keys: pooling h*w keys to S*S scales its mass by
            # S^2 / (h w); renormalise so that sites of every resolution weigh alike.
            maps = maps / maps.sum(-1, keepdim=True).clamp_min(1e-12)
            maps = resize_maps(maps, call.hw, s)  # (R, S*S, S*S)
        kind = call.site.kind
        self.sums[kind] = self.sums[kind] + maps if kind in self.sums else maps.float().clone()
        self.counts[kind] += 1
        return p

    def _mean(self, kind: str) -> Tensor:
        if not self.counts.get(kind):
            raise ValueError(f"no {kind}-attention maps were stored (kinds: {self.kinds})")
        return self.sums[kind] / self.counts[kind]

    def cross(self) -> Tensor:
        """Mean cross-attention maps (R, S, S, T) over the stored sites and steps."""
        m = self._mean("cross")
        return m.reshape(m.shape[0], self.size, self.size, m.shape[-1])

    def self_attention(self) -> Tensor:
        """Mean self-attention maps (R, S*S, S*S): row q is where pixel q looks."""
        return self._mean("self")

    def reset(self) -> None:
        """Forget the stored maps."""
        self.sums.clear()
        self.counts = {k: 0 for k in self.kinds}


class MapRecorder(Controller):
    """Keeps every selected call's head-averaged attention probabilities (B, N, M) in ``maps``,
    with their gradients when the call has them (training losses on attention, self-guidance).
    Nothing is pooled or resized; :meth:`clear` before each model call."""

    uses_probs = True
    rewrites = False  # reads the maps only

    def __init__(self, *, kinds: Collection[str] = ("cross",),
                 resolutions: Collection[int] | None = None,
                 places: Collection[str] = ("down", "mid", "up")):
        self.kinds = tuple(kinds)  # which attention maps to keep
        self.resolutions = None if resolutions is None else set(resolutions)  # site resolutions
        self.places = tuple(places)  # UNet parts to read
        self.maps: list[Tensor] = []  # (B, N, M) per selected call, in forward order

    def select(self, site: Site) -> bool:
        return (site.kind in self.kinds and site.place in self.places
                and (self.resolutions is None or site.resolution in self.resolutions))

    def missing_sites_message(self) -> str:
        res = "any resolution" if self.resolutions is None else (
            "resolution " + ", ".join(map(str, sorted(self.resolutions))))
        return (f"MapRecorder wants {'/'.join(self.kinds)}-attention at {res}, which this model "
                "lacks")

    def probs(self, call: AttnCall, p: Tensor) -> Tensor:
        self.maps.append(p.mean(1))
        return p

    def clear(self) -> None:
        self.maps.clear()


def token_heatmaps(
    cross: Tensor, positions: Mapping[str, Sequence[int]], *, normalize: bool = True
) -> dict[str, np.ndarray]:
    """Per-word heatmaps from cross maps ``cross`` (S, S, T): the sum over the word's tokens.

    Returns float32 arrays (S, S), scaled to [0, 1] by their maximum if ``normalize``.
    """
    out = {}
    for word, pos in positions.items():
        if not pos:
            raise ValueError(f"word {word!r} has no token positions")
        m = cross[..., list(pos)].sum(-1).float()
        if normalize:
            m = m / m.max().clamp_min(1e-12)
        out[word] = m.cpu().numpy().astype(np.float32)
    return out


def colorize(m: np.ndarray) -> np.ndarray:
    """A [0, 1] map as RGB uint8 (black -> red -> yellow -> white)."""
    m = np.clip(m, 0, 1)
    rgb = np.stack([np.clip(3 * m, 0, 1), np.clip(3 * m - 1, 0, 1), np.clip(3 * m - 2, 0, 1)], -1)
    return (rgb * 255).round().astype(np.uint8)


def save_heatmaps(
    path: str | Path,
    heatmaps: Mapping[str, np.ndarray],
    *,
    image: np.ndarray | None = None,
    cell: int = 128,
) -> Path:
    """Write heatmaps side by side (after ``image``, if given) as one PNG, captioned by word.

    ``heatmaps``: word -> (S, S) in [0, 1]; ``image``: uint8 (H, W, 3).
    """
    from PIL import Image, ImageDraw

    tiles = [] if image is None else [("", Image.fromarray(image))]
    tiles += [(w, Image.fromarray(colorize(m))) for w, m in heatmaps.items()]
    caption = 14
    sheet = Image.new("RGB", (cell * len(tiles), cell + caption), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (word, tile) in enumerate(tiles):
        sheet.paste(tile.resize((cell, cell), Image.NEAREST), (i * cell, 0))
        draw.text((i * cell + 2, cell), word, fill="black")
    from retouch.files import save_image

    return save_image(sheet, path)
