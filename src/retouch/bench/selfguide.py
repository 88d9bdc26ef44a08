"""Self-guidance in the editing benchmark: the settings of its rows and the edit of a ToyBench
move or resize case (the renderer's exact offset or factor, the other objects held).

The weights are :class:`~retouch.recipes.guide.GuideWeights`' defaults, chosen on ToyBench
moves and resizes of another seed than the benchmark's; the inversion is the one that moves
objects with a caption edit on ToyWorld (Direct Inversion and BDIA were tried beside it).
"""

from __future__ import annotations

from dataclasses import asdict

from ..recipes.guide import DEFAULT_STEPS, GuideWeights, SelfGuidance
from ..toyworld.editbench import EditCase

__all__ = ["SELFGUIDE", "SELFGUIDE_INVERSION", "object_word", "selfguide_spec"]

SELFGUIDE_INVERSION = "ddpm_edit_friendly"  # the inversion of the selfguide rows and the demo
SELFGUIDE = dict(weights=asdict(GuideWeights()), steps=DEFAULT_STEPS)  # the rows' settings


def object_word(case: EditCase, k: int | None = None) -> str:
    """The caption word naming object ``k`` (default: the edited one): its shape, or its
    colour when another object has that shape."""
    scene = case.source
    k = case.object_index if k is None else k
    shapes = [o.shape for o in scene.objects]
    obj = scene.objects[k]
    return obj.shape if shapes.count(obj.shape) == 1 else obj.color


def selfguide_spec(case: EditCase, *, weights: dict, steps) -> SelfGuidance:
    """The self-guidance edit of a move or resize case: the edited object moved by the case's
    exact offset or scaled by its exact factor, every other object held."""
    keep = [object_word(case, i) for i in range(len(case.source.objects))
            if i != case.object_index]
    word = object_word(case)
    edit = ({"move": {word: case.offset}} if case.edit_type == "position"
            else {"resize": {word: case.factor}})
    return SelfGuidance(**edit, keep=keep, weights=GuideWeights(**weights), steps=steps)
