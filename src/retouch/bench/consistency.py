"""Consistency benchmark: does a StyleAligned batch take the reference's style on ToyWorld?

ToyWorld scenes have one global fill style (solid, outlined, striped) that the checker reads
from pixels. A batch's reference prompt names a non-solid style (``a big red striped circle
...``); the other prompts name shapes, colours and positions but no style, which the model
reads as solid. With shared attention the other images should take the reference's fill
while keeping their own content; without it (the same noises) they stay solid. Scored by the
checker over ``cases`` batches of 1 reference + 3 images (25 DDIM steps, CFG 5):

* ``style_match``: the share of the non-reference images whose style reads as the reference's;
* ``content_right``: the share whose colour, shape, size, position and object count read as
  their own prompt says;
* ``reference_max_pixel_change``: the largest pixel difference of the reference between the
  shared and the unshared batch (it should not change);
* ``reference_style_right``: the share of references whose own style reads as their prompt's.

Needs a model trained on the extended vocabulary (the shipped one). Outputs:
``consistency.json`` (headline ``style_match_shared``, ``style_match_baseline``,
``content_right_shared``, ``content_right_baseline``, ``reference_max_pixel_change``,
``reference_style_right``),
``consistency.md``, ``consistency.png`` (per style: reference | shared images, then the
baseline's).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from ..models.pipeline import PipelineModel
from ..recipes.consistency import style_aligned
from ..toyworld.checker import read, score
from ..toyworld.folder import toyworld_extended
from ..toyworld.scene import caption, parse_caption, random_scene
from .common import atomic_write_text, image_grid, write_markdown_table, write_result

__all__ = ["run"]

STYLES = ("striped", "outlined")
CONTENT = ("color", "shape", "size", "position", "count")


def _batch(rng: random.Random, style: str) -> list[str]:
    ref = random_scene(rng, styles=(style,), two_object_fraction=0.0)
    others = [random_scene(rng, two_object_fraction=0.0) for _ in range(3)]
    return [caption(ref).text] + [caption(s).text for s in others]


def run(*, quick: bool, out: Path, model: str | None = None) -> dict:
    tw = PipelineModel.load(model)
    if not toyworld_extended(tw.folder):
        raise ValueError("bench consistency needs a ToyWorld model trained on the extended "
                         "vocabulary (striped, outlined); the shipped model is one")
    cases = 4 if quick else 12
    rng = random.Random(0)
    tallies = {k: {"style": [], "content": []} for k in ("shared", "baseline")}
    ref_change, rows, grid, ref_right = 0, [], [], []
    for style in STYLES:
        for case in range(cases):
            prompts = _batch(rng, style)
            images = {}
            for mode in ("shared", "baseline"):
                images[mode] = style_aligned(tw, prompts, steps=25, cfg=5.0, seed=case,
                                             share=mode == "shared")
                for img, prompt in zip(images[mode][1:], prompts[1:], strict=True):
                    tallies[mode]["style"].append(read(img).style == style)
                    marks = score(img, parse_caption(prompt))
                    tallies[mode]["content"].append(all(marks[k] is not False for k in CONTENT))
            ref_right.append(read(images["shared"][0]).style == style)
            ref_change = max(ref_change, int(np.abs(images["shared"][0].astype(int)
                                                    - images["baseline"][0].astype(int)).max()))
            if case == 0:
                grid.append(list(images["shared"]) + list(images["baseline"][1:]))
        for mode in ("shared", "baseline"):
            n = 3 * cases
            rows.append({"reference style": style, "mode": mode,
                         "style_match": float(np.mean(tallies[mode]["style"][-n:])),
                         "content_right": float(np.mean(tallies[mode]["content"][-n:]))})
    summary = {m: {k: float(np.mean(v)) for k, v in t.items()} for m, t in tallies.items()}
    result = {
        "headline": {
            "style_match_shared": summary["shared"]["style"],
            "style_match_baseline": summary["baseline"]["style"],
            "content_right_shared": summary["shared"]["content"],
            "content_right_baseline": summary["baseline"]["content"],
            "reference_max_pixel_change": ref_change,
            "reference_style_right": float(np.mean(ref_right)),
        },
        "rows": rows,
        "settings": {"cases_per_style": cases, "images_per_batch": 4, "steps": 25, "cfg": 5.0,
                     "model": model or "shipped ToyWorld"},
    }
    write_result(out / "consistency.json", result)
    h = result["headline"]
    atomic_write_text(out / "consistency.md", (
        "# Consistency: StyleAligned batches on ToyWorld\n\n"
        f"{2 * cases} batches (1 reference naming a fill style + 3 prompts naming none), "
        "25 DDIM steps, CFG 5. Images that take the reference's style: "
        f"{h['style_match_shared']:.2f} shared vs {h['style_match_baseline']:.2f} without "
        f"sharing; own content right: {h['content_right_shared']:.2f} vs "
        f"{h['content_right_baseline']:.2f}; the reference changed by at most "
        f"{h['reference_max_pixel_change']} (of 255); the references themselves read as their "
        f"style in {h['reference_style_right']:.2f}.\n\n"
        + write_markdown_table(rows, ["reference style", "mode", "style_match",
                                      "content_right"])))
    names = ["reference", "shared 1", "shared 2", "shared 3", "none 1", "none 2", "none 3"]
    image_grid([im for r in grid for im in r], out / "consistency.png", columns=len(names),
               labels=names * len(grid), scale=2)
    return result
