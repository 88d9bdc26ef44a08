"""ToyBench: ground-truth edit cases built from ToyWorld, and their scoring by the checker.

A case is a source scene and a target scene that differ in exactly one attribute (an object's
colour, shape, size or position, or the background colour), with both canonical captions, the
renderer's images of both, and the edit mask (where pixels may change). Because the target is
rendered, the *correct* edit is known, so an editor is scored on:

* ``success``: the checker reads the target attribute on the edited object (or background);
* ``preserved``: every other attribute of every object, the background and the object count
  read as in the target scene (which equals the source there);
* ``bg_psnr`` / ``bg_ssim``: fidelity to the source outside the edit mask; ``gt_psnr``: to the
  rendered target.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy import ndimage

from . import checker
from .render import render
from .scene import COLORS, SHAPES, SIZES, Scene, caption, random_scene

__all__ = ["EDIT_TYPES", "EditCase", "make_cases", "score_edit"]

EDIT_TYPES = ("color", "shape", "size", "background", "position")
MASK_DILATION = 2  # pixels the edit mask grows by (anti-aliased edges and VAE blur)
_ALTERNATIVES = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "size": tuple(SIZES),
    "background": ("white", "gray", "black"),
    "position": ("left", "right", "center"),
}


@dataclass(frozen=True)
class EditCase:
    """One ground-truth edit: ``source`` → ``target`` changing ``edit_type`` only."""

    source: Scene
    target: Scene
    edit_type: str
    object_index: int | None  # the edited object; None for a background edit

    @property
    def source_prompt(self) -> str:
        return caption(self.source).text

    @property
    def target_prompt(self) -> str:
        return caption(self.target).text

    @property
    def words(self) -> tuple[str, str]:
        """(source word, target word) of the edit."""
        if self.edit_type == "background":
            return self.source.background, self.target.background
        k = self.object_index
        return (getattr(self.source.objects[k], self.edit_type),
                getattr(self.target.objects[k], self.edit_type))

    @property
    def offset(self) -> tuple[float, float]:
        """How far the edited object moves, (dx, dy) in image fractions (a move-by-offset: the
        renderer draws the exact target; (0, 0) for edits that do not move it)."""
        if self.object_index is None:
            return (0.0, 0.0)
        (x0, y0), (x1, y1) = (s.objects[self.object_index].center
                              for s in (self.source, self.target))
        return (x1 - x0, y1 - y0)

    @property
    def factor(self) -> float:
        """How much the edited object's side scales (a resize-by-factor; 1 for other edits)."""
        if self.object_index is None:
            return 1.0
        k = self.object_index
        return self.target.objects[k].radius / self.source.objects[k].radius

    @cached_property
    def source_image(self) -> np.ndarray:
        return render(self.source).image

    @cached_property
    def target_image(self) -> np.ndarray:
        return render(self.target).image

    @cached_property
    def edit_mask(self) -> np.ndarray:
        """(H, W) bool: where an edit may change pixels."""
        src, dst = render(self.source), render(self.target)
        if self.edit_type == "background":
            mask = np.maximum(src.background_mask, dst.background_mask) > 0.02
            # the objects stay; only their anti-aliased rims may change colour
            return mask | ndimage.binary_dilation(src.edges > 0.05, iterations=1)
        k = self.object_index
        mask = np.maximum(src.masks[k], dst.masks[k]) > 0.02
        return ndimage.binary_dilation(mask, iterations=MASK_DILATION)


def _edit(scene: Scene, edit_type: str, rng: random.Random) -> tuple[Scene, int | None]:
    if edit_type == "background":
        new = rng.choice([b for b in _ALTERNATIVES["background"] if b != scene.background])
        return scene.replace(background=new), None
    k = rng.randrange(len(scene.objects))
    old = getattr(scene.objects[k], edit_type)
    if edit_type == "position":
        new = rng.choice([p for p in ("left", "right") if p != old])
        return scene.replace(k, position=new), k
    new = rng.choice([v for v in _ALTERNATIVES[edit_type] if v != old])
    return scene.replace(k, **{edit_type: new}), k


def make_cases(n: int, *, seed: int = 2024, edit_types: tuple[str, ...] = EDIT_TYPES):
    """``n`` cases cycling through ``edit_types`` (deterministic in ``seed``).

    Position edits use one-object scenes (left, right or centre moved left or right); the other
    edits use one- and two-object scenes in the training distribution.
    """
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        edit_type = edit_types[i % len(edit_types)]
        if edit_type == "position":
            scene = random_scene(rng, two_object_fraction=0.0)
        else:
            scene = random_scene(rng)
        target, k = _edit(scene, edit_type, rng)
        cases.append(EditCase(source=scene, target=target, edit_type=edit_type, object_index=k))
    return cases


def score_edit(image: np.ndarray, case: EditCase) -> dict[str, bool]:
    """``success`` and ``preserved`` of an edited image (see the module doc), and for a move
    or a resize ``identity``: the object read where the target puts it has the source
    object's colour, shape and style (it was moved or resized, not replaced)."""
    reading = checker.read(image)
    centers = [o.center for o in case.target.objects]
    matched = checker.match_objects(reading.objects, centers)
    if case.edit_type == "background":
        success = reading.background == case.target.background
    else:
        m = matched[case.object_index]
        want = getattr(case.target.objects[case.object_index], case.edit_type)
        success = m is not None and getattr(m, case.edit_type) == want
    scores = {"success": bool(success)}
    if case.edit_type in ("position", "size"):
        m, src = matched[case.object_index], case.source.objects[case.object_index]
        scores["identity"] = bool(m is not None and (m.color, m.shape, m.style)
                                  == (src.color, src.shape, case.source.style))
    preserved = len(reading.objects) == len(case.target.objects)
    if case.edit_type != "background":
        preserved &= reading.background == case.target.background
    for k, (obj, m) in enumerate(zip(case.target.objects, matched)):
        for attr in ("color", "shape", "size", "position"):
            if k == case.object_index and attr == case.edit_type:
                continue
            preserved &= m is not None and getattr(m, attr) == getattr(obj, attr)
    return {**scores, "preserved": bool(preserved)}
