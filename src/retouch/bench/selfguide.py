"""Self-guidance in the editing benchmark: the settings of its rows and the edit of a ToyBench
move or resize case (the renderer's exact offset or factor, the other objects held), or of a
colour case by a look taken from a donor image (:func:`donor_scene`: one object of the target
colour and another shape, on the source's background and fill style).

The weights are :class:`~retouch.recipes.guide.GuideWeights`' defaults, chosen on ToyBench
moves and resizes of another seed than the benchmark's; the inversion is the one that moves
objects with a caption edit on ToyWorld (Direct Inversion and BDIA were tried beside it).
"""

from __future__ import annotations

import random
from dataclasses import asdict, replace

from ..recipes.guide import DEFAULT_STEPS, GuideWeights, SelfGuidance
from ..toyworld.editbench import EditCase
from ..toyworld.scene import SHAPES, Scene, caption

__all__ = ["SELFGUIDE", "SELFGUIDE_FREE", "SELFGUIDE_INVERSION", "object_word", "selfguide_spec",
           "donor_scene", "free_caption"]

SELFGUIDE_INVERSION = "ddpm_edit_friendly"  # the inversion of the selfguide rows and the demo
SELFGUIDE = dict(weights=asdict(GuideWeights()), steps=DEFAULT_STEPS)  # the rows' settings
#: The ``caption free`` row's settings: the defaults with a 30x size weight. With a caption that
#: names the new size, the caption does most of a resize; guidance alone needs the size term
#: that much stronger (8 resizes of ToyBench seed 7 under a size-free caption, coverage
#: candidate model, shipped since session 21: right 1, 4, 4 and 8 of 8 at 1x, 3x, 10x and 30x;
#: on the model shipped before, whose maps are one cell per object, 0 and 1 of 8 at 1x and
#: 30x). Moves do not use it.
SELFGUIDE_FREE = dict(weights={**asdict(GuideWeights()), "size": 9000.0}, steps=DEFAULT_STEPS)


def object_word(case: EditCase, k: int | None = None) -> str:
    """The caption word naming object ``k`` (default: the edited one): its shape, or its
    colour when another object has that shape."""
    scene = case.source
    k = case.object_index if k is None else k
    shapes = [o.shape for o in scene.objects]
    obj = scene.objects[k]
    return obj.shape if shapes.count(obj.shape) == 1 else obj.color


def donor_scene(case: EditCase) -> tuple[Scene, str, str]:
    """``(scene, caption, word)`` of the donor of a colour case: the edited object in the
    target colour as a big centred object of the next shape, alone on the source's background
    and fill style; ``word`` (its shape) names it."""
    obj = case.source.objects[case.object_index]
    k = SHAPES.index(obj.shape) + 1 if obj.shape in SHAPES else 0
    shape = SHAPES[k % len(SHAPES)]
    donor = replace(case.source, objects=(replace(
        obj, shape=shape, color=case.target.objects[case.object_index].color, size="big",
        position="center", dx=0.0, dy=0.0, scale=1.0),))
    return donor, caption(donor).text, shape


#: The caption word a case's edit changes (dropped by :func:`free_caption`).
EDITED_WORD = {"position": "position", "size": "size", "color": "color"}


def free_caption(case: EditCase) -> str:
    """The source caption without the words of the attribute the case edits (every object's:
    the grammar drops an attribute for all objects), so that the caption neither pins the
    object where it is nor names what the edit changes: the setting of the self-guidance paper,
    whose captions do not say where objects are."""
    attr = EDITED_WORD.get(case.edit_type)
    if attr is None:
        raise ValueError(f"a caption free of the edit is defined for "
                         f"{', '.join(EDITED_WORD)} edits, not {case.edit_type!r} ones")
    return caption(case.source, drop={attr: 1.0}, rng=random.Random(0)).text


def selfguide_spec(case: EditCase, *, weights: dict, steps) -> SelfGuidance:
    """The self-guidance edit of a case: a move or resize case's object moved by its exact
    offset or scaled by its exact factor, a colour case's object taking the donor's look
    (:func:`donor_scene`); every other object held."""
    keep = [object_word(case, i) for i in range(len(case.source.objects))
            if i != case.object_index]
    word = object_word(case)
    if case.edit_type == "color":
        edit = {"transfer": {word: donor_scene(case)[2]}}
    elif case.edit_type == "position":
        edit = {"move": {word: case.offset}}
    elif case.edit_type == "size":
        edit = {"resize": {word: case.factor}}
    else:
        raise ValueError(f"self-guidance edits position, size and colour cases, not "
                         f"{case.edit_type!r} ones")
    return SelfGuidance(**edit, keep=keep, weights=GuideWeights(**weights), steps=steps)
