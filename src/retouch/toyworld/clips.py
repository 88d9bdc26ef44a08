"""ToyWorld clips: scenes whose objects move along a path, with exact per-frame masks and flow.

A :class:`Clip` is a sequence of :class:`~retouch.toyworld.scene.Scene` frames; :func:`moving_clip`
moves one object by a total offset in equal steps (translation; the other objects stay). Each
frame's scene names the object's position by the nearest region word, so every frame has a
caption of the grammar (:meth:`Clip.captions`) and a clip can be edited word by word. The flow is
known exactly: the moving object's pixels move by the step, every other pixel stays
(:meth:`Clip.flows`, at any resolution, e.g. the latents').

Striped fills are drawn in image coordinates (the stripes do not move with the object), so the
pixel flow of a striped object is exact only for its silhouette.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .render import Rendering, render
from .scene import POSITIONS, Caption, Scene, caption

__all__ = ["Clip", "moving_clip"]


@dataclass(frozen=True)
class Clip:
    """Frames of a moving scene: ``scenes[i]`` is frame ``i``; ``moving`` the moving object's
    index and ``step`` its displacement per frame (fractions of the image side, x then y)."""

    scenes: tuple[Scene, ...]
    moving: int
    step: tuple[float, float]

    def __len__(self) -> int:
        return len(self.scenes)

    def captions(self, **options) -> list[Caption]:
        """Each frame's caption (``options`` as :func:`~retouch.toyworld.scene.caption`)."""
        return [caption(s, **options) for s in self.scenes]

    def render(self, size: int = 64) -> list[Rendering]:
        return [render(s, size) for s in self.scenes]

    def flows(self, size: int) -> Tensor:
        """Forward flow (F - 1, 2, size, size) in pixels of a ``size``-pixel grid, x then y:
        pixels (cell centres) inside the moving object in frame ``i`` move by the step to frame
        ``i + 1``; all others stay."""
        out = torch.zeros(len(self) - 1, 2, size, size)
        for i, scene in enumerate(self.scenes[:-1]):
            mask = render(scene, size).masks[self.moving] >= 0.5
            out[i, 0][torch.from_numpy(mask)] = self.step[0] * size
            out[i, 1][torch.from_numpy(mask)] = self.step[1] * size
        return out

    def moving_masks(self, size: int = 64) -> np.ndarray:
        """(F, size, size) silhouettes of the moving object per frame."""
        return np.stack([render(s, size).masks[self.moving] for s in self.scenes])


def _nearest_region(center: tuple[float, float]) -> str:
    return min(POSITIONS, key=lambda k: math.dist(center, POSITIONS[k]))


def moving_clip(scene: Scene, offset: tuple[float, float], frames: int = 8,
                index: int = 0) -> Clip:
    """Object ``index`` of ``scene`` moves by ``offset`` (fractions of the image side, x then y)
    over ``frames`` frames in equal steps; each frame names its position by the nearest region."""
    if frames < 2:
        raise ValueError(f"a clip needs at least 2 frames, got {frames}")
    if not 0 <= index < len(scene.objects):
        raise ValueError(f"object index {index} is outside the scene's {len(scene.objects)} "
                         f"object(s); use 0..{len(scene.objects) - 1}")
    if not all(math.isfinite(v) for v in offset):
        raise ValueError(f"offset must be finite fractions of the image side, got {offset}")
    obj = scene.objects[index]
    x0, y0 = obj.center
    step = (offset[0] / (frames - 1), offset[1] / (frames - 1))
    scenes = []
    for i in range(frames):
        c = (x0 + i * step[0], y0 + i * step[1])
        if not (obj.radius <= c[0] <= 1 - obj.radius and obj.radius <= c[1] <= 1 - obj.radius):
            raise ValueError(f"frame {i} puts the object at {c[0]:.2f}, {c[1]:.2f}, partly "
                             f"outside the image; use a smaller offset")
        region = _nearest_region(c)
        cx, cy = POSITIONS[region]
        moved = dataclasses.replace(obj, position=region, dx=c[0] - cx, dy=c[1] - cy)
        try:
            scenes.append(scene.replace(index, position=moved.position, dx=moved.dx, dy=moved.dy))
        except ValueError as err:
            raise ValueError(f"frame {i} moves object {index} into another object's region "
                             f"({region}): {err}; choose another offset") from None
    return Clip(scenes=tuple(scenes), moving=index, step=step)
