"""Consistency benchmark: does a StyleAligned batch share the reference's style on ToyWorld, and do
keyframe attention and correlated noise make a clip's frames agree?

ToyWorld scenes have a global fill style (solid, outlined, striped) and a background colour that
the checker reads from pixels. In each batch the reference prompt names both (``a big red striped
circle on the left on a gray background``); the three other prompts name their own shape,
colour, size and position but neither style nor background, so without sharing the model picks
those itself (any background; any fill style on a model trained with ``--free-style``, solid on
one trained on the older grammar, such as the shipped one). Over ``cases`` batches (25 DDIM
steps, CFG 5), for StyleAligned (``shared``), plain batch generation (``plain``: the same
noises, no sharing) and shared noise alone (``shared_noise``: every row from the reference's
noise, no sharing):

* ``style_agreement``: the share of non-reference images whose fill style *and* background read
  as the reference's (each alone too);
* ``content_leakage``: the share that copies the reference's shape or colour where their own
  prompt names another;
* ``batch_adherence``: the share whose shape, colour, size, position and object count read as
  their own prompt says;
* ``reference_max_pixel_change``: the reference's largest pixel change between the shared and
  the plain batch (it should not change), and ``reference_right``: references read as their
  prompt (style and background).

Needs a model trained on the extended vocabulary (the shipped one). Outputs:
``consistency.json`` (headline ``style_agreement``, ``content_leakage``, ``batch_adherence`` for
StyleAligned, with the baselines' beside them; ``video_inconsistency_ratio``,
``video_adherence``, ``warped_flicker_ratio`` for clips, :mod:`retouch.bench.video`;
``transfer_success`` for appearance transfer, :mod:`retouch.bench.transfer`),
``consistency.md``, ``consistency.png``, ``consistency_video.png``, ``consistency_transfer.png``.
``parts`` (:data:`PARTS`; ``retouch bench consistency --parts transfer``) runs some parts alone:
each draws its own cases, so a part run alone gives the figures it gives in a full run.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from ..models.pipeline import PipelineModel
from ..recipes.consistency import style_aligned
from ..toyworld.checker import read, score
from ..toyworld.folder import toyworld_extended
from ..toyworld.scene import Scene, caption, parse_caption, random_scene
from .common import (
    atomic_write_text,
    chosen_parts,
    image_grid,
    model_label,
    versions,
    write_markdown_table,
    write_result,
)
from .transfer import ROWS as TRANSFER_ROWS
from .transfer import TUNED as TRANSFER_TUNED
from .transfer import measure_transfer
from .video import METHODS as VIDEO_METHODS
from .video import MIN_ADHERENCE, measure_video
from .video import headline as video_headline

__all__ = ["run", "PARTS", "STYLES", "style_batch", "batch_marks"]

STYLES = ("striped", "outlined")
MODES = {"shared": dict(share=True), "plain": dict(share=False),
         "shared_noise": dict(share=False, shared_noise=True)}
CONTENT = ("color", "shape", "size", "position", "count")
NO_STYLE_OR_BACKGROUND = {"background": 1.0, "style": 1.0}


def style_batch(rng: random.Random, style: str) -> tuple[Scene, list[str]]:
    """A reference scene of fill ``style`` and the batch's prompts: the reference's full
    caption, then 3 prompts of other shapes and colours naming no style or background."""
    ref = random_scene(rng, styles=(style,), two_object_fraction=0.0)
    others = []
    while len(others) < 3:  # other shapes and colours than the reference's (to see leakage)
        s = random_scene(rng, two_object_fraction=0.0)
        if s.objects[0].shape != ref.objects[0].shape and s.objects[0].color != \
                ref.objects[0].color:
            others.append(s)
    prompts = [caption(ref).text] + [caption(s, drop=NO_STYLE_OR_BACKGROUND, rng=rng).text
                                     for s in others]
    return ref, prompts


def batch_marks(images: np.ndarray, prompts: list[str], ref: Scene) -> dict[str, list[bool]]:
    """Per image after the first (the reference ``ref``'s): ``style`` and ``background``
    (taken from the reference), ``agree`` (both), ``solid`` (read solid), ``leak`` (the
    reference's shape or colour where the image's own prompt names another) and ``adhere``
    (the prompt's content, :data:`CONTENT`, not read wrong)."""
    want = ref.objects[0]
    marks = {k: [] for k in ("agree", "style", "background", "leak", "adhere", "solid")}
    for img, prompt in zip(images[1:], prompts[1:], strict=True):
        reading = read(img)
        same_style = reading.style == ref.style
        same_bg = reading.background == ref.background
        obj = reading.objects[0] if reading.objects else None
        own = parse_caption(prompt)["objects"][0]
        checked = score(img, parse_caption(prompt))
        marks["agree"].append(same_style and same_bg)
        marks["style"].append(same_style)
        marks["background"].append(same_bg)
        marks["solid"].append(reading.style == "solid")
        marks["leak"].append(obj is not None and (
            (obj.shape == want.shape and own["shape"] != want.shape)
            or (obj.color == want.color and own["color"] != want.color)))
        marks["adhere"].append(all(checked[k] is not False for k in CONTENT))
    return marks


#: The benchmark's parts (``retouch bench consistency --parts video`` runs one alone).
PARTS = ("style", "video", "transfer")


def run(*, quick: bool, out: Path, model: str | None = None,
        parts: tuple[str, ...] | None = None) -> dict:
    """Run the benchmark (``parts``: some of :data:`PARTS`, default all; the headline then
    holds only the parts run); writes ``consistency.{json,md}`` and the parts' figures."""
    started = versions()  # the commit and versions this run starts from
    parts = chosen_parts("consistency", parts, PARTS)
    tw = PipelineModel.load(model)
    if not toyworld_extended(tw.folder):
        raise ValueError("bench consistency needs a ToyWorld model trained on the extended "
                         "vocabulary (striped, outlined); the shipped model is one")
    result = {"headline": {}, "parts": list(parts),
              "settings": {"steps": 25, "cfg": 5.0, "model": model_label(model)}}
    sections, figures = [], {}
    for part, fn in (("style", _style_part), ("video", _video_part),
                     ("transfer", _transfer_part)):
        if part in parts:
            fields, text, part_figures = fn(tw, quick)
            result["headline"].update(fields.pop("headline"))
            result["settings"].update(fields.pop("settings"))
            result.update(fields)
            sections.append(text)
            figures.update(part_figures)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_result(out / "consistency.json", result, started=started)
    only = "" if set(parts) == set(PARTS) else f"Parts run: {', '.join(parts)}.\n\n"
    atomic_write_text(out / "consistency.md", "# Consistency on ToyWorld\n\n"
                      f"Model: `{result['settings']['model']}`.\n\n" + only
                      + "\n\n".join(sections))
    for name, (images, columns, labels) in figures.items():
        image_grid(images, out / name, columns=columns, labels=labels, scale=2)
    return result


def _style_part(tw, quick: bool):
    cases = 4 if quick else 12
    rng = random.Random(0)
    tally = {m: {} for m in MODES}  # mode -> batch_marks' keys -> marks over all batches
    ref_change, ref_right, grid = 0, [], []
    for style in STYLES:
        for case in range(cases):
            ref, prompts = style_batch(rng, style)
            images = {m: style_aligned(tw, prompts, steps=25, cfg=5.0, seed=case, **kw)
                      for m, kw in MODES.items()}
            for mode, imgs in images.items():
                for key, marks in batch_marks(imgs, prompts, ref).items():
                    tally[mode].setdefault(key, []).extend(marks)
            r = read(images["shared"][0])
            ref_right.append(r.style == style and r.background == ref.background)
            ref_change = max(ref_change, int(np.abs(images["shared"][0].astype(int)
                                                    - images["plain"][0].astype(int)).max()))
            if case < 2:
                grid.append([*images["shared"], *images["plain"][1:]])
    means = {m: {k: float(np.mean(v)) for k, v in t.items()} for m, t in tally.items()}
    fields = {
        "headline": {
            "style_agreement": means["shared"]["agree"],
            "content_leakage": means["shared"]["leak"],
            "batch_adherence": means["shared"]["adhere"],
            "style_agreement_plain": means["plain"]["agree"],
            "style_agreement_shared_noise": means["shared_noise"]["agree"],
            "reference_max_pixel_change": ref_change,
        },
        "modes": means,
        "reference_right": float(np.mean(ref_right)),
        "settings": {"cases_per_style": cases, "styles": list(STYLES), "images_per_batch": 4},
    }
    rows = [{"mode": m, "style and background": v["agree"], "style": v["style"],
             "background": v["background"], "content leakage": v["leak"],
             "batch adherence": v["adhere"], "read solid": v["solid"]}
            for m, v in means.items()]
    text = (
        "## StyleAligned batches\n\n"
        f"{len(STYLES) * cases} batches: a reference naming its fill style and background, and 3 "
        "prompts naming neither (25 DDIM steps, CFG 5). Shares of the 3 other images per batch. "
        f"The reference changed by at most {ref_change}/255 between the shared and the plain "
        f"batch; references read right (style and background) in {np.mean(ref_right):.2f}. "
        "`read solid`: the share of the other images the checker reads as solid: a model "
        "trained on the older grammar (the shipped one, unlike those trained with `retouch "
        "toyworld train --free-style`) draws solid for a caption without a style word, so there "
        "the text pulls towards solid while the shared attention carries the reference's striped "
        "or outlined fill.\n\n"
        + write_markdown_table(rows, ["mode", "style and background", "style", "background",
                                      "content leakage", "batch adherence", "read solid"]))
    names = ["reference", "shared 1", "shared 2", "shared 3", "plain 1", "plain 2", "plain 3"]
    figures = {"consistency.png": ([im for r in grid for im in r], len(names),
                                   names * len(grid))}
    return fields, text, figures


def _video_part(tw, quick: bool):
    clips, frames = (2, 4) if quick else (12, 8)
    video, video_grid, clip_prompts = measure_video(tw, clips=clips, frames=frames)
    fields = {"headline": video_headline(video), "video": video,
              "settings": {"clips": clips, "frames_per_clip": frames,
                           "clip_prompts": clip_prompts}}
    figures = {"consistency_video.png": (
        [f for row in video_grid for f in row], frames,
        [m for m in VIDEO_METHODS for _ in range(frames)])}
    return fields, _video_section(video, clips, frames), figures


def _transfer_part(tw, quick: bool):
    cases = 2 if quick else 64  # enough pairs for a paired test between the first two rows
    transfer, paired, transfer_grid = measure_transfer(tw, cases=cases)
    fields = {
        "headline": {
            "transfer_success": transfer["cross-image attention"]["success"],
            "transfer_success_cfg5": transfer["cross-image attention, CFG 5"]["success"],
            "transfer_success_ddim": transfer["cross-image attention, DDIM"]["success"],
            "transfer_success_adain_only": transfer["adain only"]["success"],
            "transfer_success_p2p_edit": transfer["p2p edit"]["success"],
        },
        "transfer": transfer,
        "transfer_paired": paired,
        "settings": {"transfer_cases": cases, "transfer_tuned": TRANSFER_TUNED},
    }
    figures = {"consistency_transfer.png": (
        [im for row in transfer_grid for im in row], 2 + len(TRANSFER_ROWS),
        ["structure", "appearance", *TRANSFER_ROWS] * len(transfer_grid))}
    return fields, _transfer_section(transfer, paired, cases), figures


def _transfer_section(transfer: dict, paired: dict, cases: int) -> str:
    rows = [{"method": m, **v} for m, v in transfer.items()]
    first, second = TRANSFER_ROWS[:2]
    return (
        f"## Appearance transfer: cross-image attention on ToyWorld renders\n\n{cases} pairs "
        "of one-object scenes; the output prompt names only the structure's size, shape and "
        "position (see `retouch.bench.transfer`). Success: the structure's shape and position "
        "with the appearance's colour and fill style. The first row's settings "
        f"(`{TRANSFER_TUNED}`) were chosen on other pairs; against the second row, pair by "
        f"pair: {paired[first]} right only with them, {paired[second]} only without, "
        f"McNemar's exact p = {paired['p']:.3g}.\n\n"
        + write_markdown_table(rows, ["method", "success", "structure_kept", "appearance_taken",
                                      "colour_taken", "style_taken", "background_taken",
                                      "seconds_per_transfer"]))


def _video_section(video: dict, clips: int, frames: int) -> str:
    rows = [{"method": m, **v} for m, v in video.items()]
    head = video_headline(video)
    return (
        f"## Video: keyframe attention and noise models on ToyWorld clips\n\n{clips} clips of "
        f"{frames} frames, one object moving 0.12 of the image across its region; every frame's "
        "prompt names only the shape and position (see `retouch.bench.video`). Inconsistency: "
        "frames whose colour, shape, size, style or background differ from frame 1's. Best "
        f"keyframe scheme (the least inconsistent with adherence ≥ {MIN_ADHERENCE}): "
        f"{head['video_best_keyframe_scheme']} "
        f"(inconsistency ÷ independent frames: {_fmt(head['video_inconsistency_ratio'])}); "
        f"warped ÷ independent noise flicker: {_fmt(head['warped_flicker_ratio'])}.\n\n"
        + write_markdown_table(rows, ["method", "adherence", "inconsistency", "changed_color",
                                      "changed_size", "changed_style", "changed_background",
                                      "flicker", "warp_error", "motion", "seconds_per_frame",
                                      "nfe_per_frame"]))


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"
