"""Region layouts: boxes on a canvas, each with its own prompt (a ``retouch regions`` file).

A layout is a canvas size in image pixels and regions, each a box ``[left, top, right, bottom]``
in fractions of the canvas with a prompt; or a ``split`` of the canvas into complementary
regions, RPG's way: without ``;`` the numbers are the width ratios of columns (``1,1,1``: three
columns); with ``;`` each ``;``-separated part is a row ``h,w1,w2,...`` (its height ratio, then
the width ratios of its regions; a row of one number is one region). One prompt per region, in
reading order. ``background`` prompts the pixels outside every region (MultiDiffusion);
``base`` is regional prompting's whole-canvas prompt, mixed in by ``base_ratio``.

JSON::

    {"width": 128, "height": 64, "split": "1,1",
     "prompts": ["a red circle on a gray background", "a blue square on a gray background"],
     "base": "a red circle on the left and a blue square on the right on a gray background"}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..checks import finite

__all__ = ["Region", "RegionLayout", "split_boxes", "LAYOUT_KEYS"]

Box = tuple[float, float, float, float]  # left, top, right, bottom: fractions of the canvas

#: The keys a layout file may hold.
LAYOUT_KEYS = ("width", "height", "regions", "split", "prompts", "background", "base",
               "base_ratio")


@dataclass(frozen=True)
class Region:
    prompt: str
    box: Box


def _ratios(text: str, where: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{where} {text!r} must be comma-separated numbers, e.g. 1,1,2") from None
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"{where} {text!r}: every ratio must be a positive number")
    return values


def split_boxes(spec: str) -> list[Box]:
    """The boxes of an RPG split (see the module doc), in reading order."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a split must be a string such as '1,1' (two columns) or '1;1' (two "
                         f"rows) or '1,1,1;1' (a row of two regions over a row of one), got "
                         f"{spec!r}")
    if ";" not in spec:
        rows = [[1.0, *_ratios(spec, "the split")]]
    else:
        rows = [_ratios(r, "the split row") for r in spec.split(";")]
    heights = [r[0] for r in rows]
    boxes = []
    for i, row in enumerate(rows):
        top, bottom = _edges(heights, i)
        widths = row[1:] or [1.0]
        for j in range(len(widths)):
            left, right = _edges(widths, j)
            boxes.append((left, top, right, bottom))
    return boxes


def _edges(ratios: list[float], i: int) -> tuple[float, float]:
    """The start and end of part ``i`` of [0, 1] split by ``ratios`` (the last ends at 1)."""
    total = sum(ratios)
    start = sum(ratios[:i]) / total
    return start, 1.0 if i == len(ratios) - 1 else sum(ratios[: i + 1]) / total


@dataclass(frozen=True)
class RegionLayout:
    """A canvas (image pixels) and its regions (see the module doc)."""

    width: int
    height: int
    regions: tuple[Region, ...]
    background: str | None = None
    base: str | None = None
    base_ratio: float = 0.3

    def __post_init__(self):
        for name in ("width", "height"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"the layout's {name} must be a positive whole number of "
                                 f"pixels, got {v!r}")
        if not self.regions:
            raise ValueError("a layout needs at least one region")
        for k, r in enumerate(self.regions):
            if not isinstance(r.prompt, str) or not r.prompt.strip():
                raise ValueError(f"region {k} needs a prompt (a non-empty string)")
            if not isinstance(r.box, (tuple, list)) or len(r.box) != 4 or not all(
                    isinstance(c, (int, float)) and not isinstance(c, bool) for c in r.box):
                raise ValueError(f"region {k}'s box {r.box!r} must be [left, top, right, bottom]")
            left, top, right, bottom = r.box
            if not (0 <= left < right <= 1 and 0 <= top < bottom <= 1):
                raise ValueError(f"region {k}'s box {list(r.box)} lies outside the canvas or is "
                                 "empty: give 0 <= left < right <= 1 and 0 <= top < bottom <= 1 "
                                 "(fractions of the canvas)")
        finite("base_ratio", self.base_ratio, low=0, high=1)

    @property
    def prompts(self) -> list[str]:
        return [r.prompt for r in self.regions]

    @classmethod
    def from_dict(cls, d: Any, *, source: str = "the layout") -> RegionLayout:
        if not isinstance(d, dict):
            raise ValueError(f"{source} must be a JSON object with keys {', '.join(LAYOUT_KEYS)}")
        unknown = sorted(set(d) - set(LAYOUT_KEYS))
        if unknown:
            raise ValueError(f"{source} has unknown key(s) {', '.join(unknown)}; valid keys: "
                             f"{', '.join(LAYOUT_KEYS)}")
        for key in ("width", "height"):
            if key not in d:
                raise ValueError(f"{source} needs {key!r} (the canvas size in image pixels)")
        if ("regions" in d) == ("split" in d):
            raise ValueError(f"{source} needs either 'regions' (boxes with prompts) or 'split' "
                             "with 'prompts', not both or neither")
        if "split" in d:
            boxes, prompts = split_boxes(d["split"]), d.get("prompts")
            if not isinstance(prompts, list) or len(prompts) != len(boxes):
                raise ValueError(f"the split {d['split']!r} has {len(boxes)} regions: give "
                                 f"'prompts' as a list of {len(boxes)} prompts")
            regions = tuple(Region(p, b) for p, b in zip(prompts, boxes, strict=True))
        else:
            if not isinstance(d["regions"], list) or not all(
                    isinstance(r, dict) and set(r) == {"prompt", "box"} for r in d["regions"]):
                raise ValueError(f"{source}'s 'regions' must be a list of "
                                 "{\"prompt\": ..., \"box\": [left, top, right, bottom]}")
            regions = tuple(Region(r["prompt"], tuple(r["box"]) if isinstance(r["box"], list)
                                   else r["box"]) for r in d["regions"])
        return cls(d["width"], d["height"], regions, d.get("background"), d.get("base"),
                   d.get("base_ratio", 0.3))

    @classmethod
    def read(cls, path: str | Path) -> RegionLayout:
        from ..files import read_json

        return cls.from_dict(read_json(path, "layout file"), source=f"the layout file {path}")

    def masks(self, latent_hw: tuple[int, int]) -> Tensor:
        """(R, h, w) 0/1 masks at latent resolution (a pixel belongs to a box when its centre
        does); refuses a region that covers no latent pixel."""
        h, w = latent_hw
        ys = (torch.arange(h) + 0.5) / h
        xs = (torch.arange(w) + 0.5) / w
        out = []
        for k, r in enumerate(self.regions):
            left, top, right, bottom = r.box
            m = ((ys >= top) & (ys < bottom))[:, None] & ((xs >= left) & (xs < right))[None, :]
            if not bool(m.any()):
                raise ValueError(f"region {k}'s box {list(r.box)} covers no latent pixel of the "
                                 f"{w}x{h} latent: make it larger")
            out.append(m.float())
        return torch.stack(out)
