"""Appearance-transfer part of ``bench consistency``: cross-image attention on ToyWorld renders.

Each case renders two random one-object extended scenes: the structure (its shape, position and
size should stay) and the appearance (its colour, fill style and background should be taken),
drawn so that the two differ in colour and in style or background. The output prompt names only
the structure's size, shape and position, so the look must come from the appearance image.
Rows (25 steps):

* ``cross-image attention``: :func:`retouch.recipes.transfer.appearance_transfer` with the
  paper's contrast (1.67) and AdaIN of the latents, both images inverted by edit-friendly DDPM
  at CFG 5 and the output on the structure's noise maps, as in the reference code, with the
  settings :data:`TUNED` found on 24 other pairs (``scripts/transfer_variants.py``,
  ``benchmarks/consistency-transfer/tuning.md``): the output sampled unguided (CFG 1, as the
  reference samples), swap guidance 6, and no periodic injection of the structure's keys and
  values (which carry the structure's own colour and fill);
* ``cross-image attention, CFG 5``: the row before that tuning: the output sampled at CFG 5,
  swap guidance 3.5 and the reference's periodic structure injection;
* ``cross-image attention, DDIM``: the first row after DDIM inversion, the output sampled by
  DDIM;
* ``adain only``: the first row without cross-image attention (an ablation);
* ``p2p edit``: the plain-edit baseline, a Prompt-to-Prompt edit of the structure image (direct
  inversion, CFG 5) towards its caption with the appearance's colour, style and background
  words.

Per row: ``success`` (shape and position of the structure, colour and style of the appearance,
as the checker reads them), ``structure_kept``, ``appearance_taken`` (colour and style),
``background_taken``, seconds per transfer; ``colour_taken`` and ``style_taken`` split the
look. The output prompt names no fill style; a model trained on the older grammar (the shipped
one) draws solid for such a caption, so there a striped or outlined look must beat the text.
"""

from __future__ import annotations

import random
import time

import numpy as np

from ..recipes.edit import edit
from ..recipes.transfer import appearance_transfer
from ..toyworld.checker import read
from ..toyworld.render import render
from ..toyworld.scene import STYLES, caption, random_scene
from .common import paired_counts

__all__ = ["ROWS", "TUNED", "measure_transfer", "transfer_marks", "transfer_pair"]

ROWS = ("cross-image attention", "cross-image attention, CFG 5", "cross-image attention, DDIM",
        "adain only", "p2p edit")
LOOK = {"color": 1.0, "style": 1.0, "background": 1.0}
STEPS, CFG = 25, 5.0
#: Cross-image attention's settings on ToyWorld (module doc): unguided sampling after inversion
#: at CFG 5, swap guidance 6, no periodic structure injection.
TUNED = {"cfg": 1.0, "inversion_cfg": CFG, "swap_guidance": 6.0, "structure_every": 0}


def transfer_pair(rng: random.Random):
    while True:
        a = random_scene(rng, styles=STYLES, two_object_fraction=0.0)
        b = random_scene(rng, styles=STYLES, two_object_fraction=0.0)
        if a.objects[0].color != b.objects[0].color and (
                a.style != b.style or a.background != b.background):
            return a, b


def _run(model, row: str, a, b, rng: random.Random) -> np.ndarray:
    structure, look = render(a).image, render(b).image
    if row == "p2p edit":
        target = a.replace(0, color=b.objects[0].color).replace(style=b.style,
                                                                background=b.background)
        return edit(model, structure, caption(a).text, caption(target).text, inversion="direct",
                    editor="p2p", steps=STEPS, cfg=CFG).edited
    if row == "cross-image attention, CFG 5":
        settings = {"cfg": CFG, "swap_guidance": 3.5}
    elif row == "adain only":  # no attention, so no attention options
        settings = {k: v for k, v in TUNED.items() if k != "structure_every"} | {
            "swap_guidance": 1.0, "cross_image": False}
    else:
        settings = TUNED
    return appearance_transfer(model, structure, look, structure_prompt=caption(a).text,
                               appearance_prompt=caption(b).text,
                               output_prompt=caption(a, drop=LOOK, rng=rng).text, steps=STEPS,
                               inversion="ddim" if row.endswith("DDIM") else
                               "ddpm_edit_friendly", **settings).output


def transfer_marks(image: np.ndarray, a, b) -> dict[str, bool]:
    r = read(image)
    o = r.objects[0] if len(r.objects) == 1 else None
    kept = o is not None and o.shape == a.objects[0].shape and o.position == a.objects[0].position
    colour = o is not None and o.color == b.objects[0].color
    style = o is not None and r.style == b.style
    return {"success": kept and colour and style, "structure_kept": kept,
            "appearance_taken": colour and style, "colour_taken": colour, "style_taken": style,
            "background_taken": r.background == b.background}


def measure_transfer(model, *, cases: int, seed: int = 0):
    """Per-row means over ``cases`` transfers; the first two rows' successes paired case by case
    (:func:`~retouch.bench.common.paired_counts`); a sample grid (structure, appearance,
    rows)."""
    rng = random.Random(seed)
    pairs = [transfer_pair(rng) for _ in range(cases)]
    tally = {row: [] for row in ROWS}
    seconds = dict.fromkeys(ROWS, 0.0)
    grid = []
    for i, (a, b) in enumerate(pairs):
        outs = []
        for row in ROWS:
            t0 = time.perf_counter()
            out = _run(model, row, a, b, random.Random(seed * 1000 + i))
            seconds[row] += time.perf_counter() - t0
            tally[row].append(transfer_marks(out, a, b))
            outs.append(out)
        if i < 4:
            grid.append([render(a).image, render(b).image, *outs])
    means = {row: {k: float(np.mean([m[k] for m in v])) for k in v[0]}
             for row, v in tally.items()}
    for row in ROWS:
        means[row]["seconds_per_transfer"] = seconds[row] / cases
    first, second = ROWS[:2]
    paired = paired_counts([float(m["success"]) for m in tally[first]],
                           [float(m["success"]) for m in tally[second]], names=(first, second))
    return means, paired, grid
