"""Editing benchmark: real (rendered, then inverted) ToyBench images edited by each method.

Setup: ToyBench cases (:mod:`retouch.toyworld.editbench`: a rendered source scene, a one-word
edit of its caption, and the rendered correct result) cycle through the edit types colour,
shape, size, background and position. The source *render* is VAE-encoded, inverted under its
caption and edited towards the target caption with CFG 5 on the scheduler's DDIM grid (10
steps quick, 25 full). Methods (:func:`methods`):

* ``p2p`` with Direct Inversion and BDIA (exact inversions); with EDICT (2 calls a step, the
  dearest exact one; at its own 50 steps and CFG 3, where its chains hold) and null-text (its
  per-step Adam tuning alone takes ~6 s an image at 10 steps, more than all quick methods
  together) in the full run only, which keeps --quick at
  a few minutes (the full run takes ~3 hours on 2 cores); word swap, cross window 0.8,
  self-attention window 0.4, and local blending on the edited word (the token that differs,
  threshold 0.3 of the max-normalised map, from 20 % of the steps, 3x3 max-pool), as the paper
  does -- except with EDICT, whose loop takes no callbacks; ``p2p (no blend)`` with Direct
  Inversion is the ablation that shows where blending helps, and with edit-friendly DDPM
  inversion (full run) the most successful P2P on ToyWorld; ``p2p (pixel blend)`` (full run)
  blends the decoded images with the same mask instead of the latents, which keeps the most
  outside colour and shape edits after edit-friendly DDPM inversion (the headline's P2P;
  the ToyWorld VAE is not local: :mod:`retouch.attention.blend`);
* ``masactrl`` with Direct Inversion, on position and size edits only (what it is for); its
  S and L are the paper's scaled to this model: S = 8 % of the steps, L = the first decoder
  self-attention layer finer than the coarsest level;
* ``selfguide`` with edit-friendly DDPM inversion (position, size and colour edits): self-guidance
  (:mod:`retouch.recipes.guide`) towards the target caption, the edited object moved by the
  case's exact offset or resized by its exact factor (the renderer's ground truth), every other
  object's shape and every object's look held (:data:`SELFGUIDE`; the look is read from a
  UNet's last decoder block, a transformer's ``norm_out``); ``selfguide (caption
  kept)`` the same with the source caption (the paper's setting: guidance alone must move the
  object); on colour edits ``selfguide look`` (target caption) and ``selfguide (caption
  kept)`` take the edited object's look from a rendered donor (one object of the target colour
  and another shape: :func:`~retouch.bench.selfguide.donor_scene`), the paper's appearance
  transfer from a real image; ``selfguide (caption free)`` inverts and edits under the source
  caption without the edited attribute's words (:func:`~retouch.bench.selfguide.free_caption`),
  so guidance alone must make the edit and the caption does not pin the object where it was
  (the paper's captions do not say where objects are; ToyBench's do); ``none`` with the same
  inversion is the edit without guidance (on every edit type: regeneration from that
  inversion);
* ``none``: re-generation from the inverted noise with the target caption (no control);
  ``none/rf_inversion`` is RF-Inversion's edit (its controlled ODEs, no attention control);
* ``sdedit``: noise to strength 0.6, denoise with the target caption (no inversion);
* flow methods, run on any model in the flow view (:mod:`retouch.samplers.flow`): ``flowedit``
  (inversion-free, :mod:`retouch.recipes.flowedit`, strength 0.85 as the paper's Flux setting,
  chosen on ToyBench seed 7 over 0.66, its SD3 one; one noise draw a step, both velocities at
  CFG 5: a lower source guidance, as the paper's, lowered preservation there); ``p2p`` with
  the ``rf_solver`` inversion (P2P as above on RF-Solver's second-order trajectory) and
  ``rf_solver`` with it (RF-Solver's own edit: the source's self-attention values shared during
  the first 20 % of the steps);
* reference rows: ``reconstruction`` (Direct Inversion's source row: no edit at all) and
  ``ceiling`` (the rendered target through the VAE: the best any method can score).

Columns (means over cases): ``success`` / ``preserved`` (the checker reads the target attribute
/ everything else as in the target scene), ``identity`` (moves and resizes: the object where the
target puts it has the source object's colour, shape and style), ``bg_psnr`` / ``bg_ssim``
(against the source render outside the edit mask), ``gt_psnr`` (against the rendered target,
whole image), ``n`` cases; ``seconds``: median per case (inversion + edit; a shared inversion is
charged to each method; a median, as the machine may be busy with other work).

``overhead``: one ToyWorld UNet forward (2 rows x CFG) with retouch's processor and no
controller, and with an :class:`~retouch.attention.AttentionStore`, over diffusers' own
processors: ratios of medians of interleaved repeats in the same run.

Outputs: ``editing.json`` (``{"rows": [...], "overhead": {...}, "settings": {...}}``),
``editing.md``, ``editing.png`` (per edit type: source | ground truth | each method).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..metrics import psnr, ssim
from ..toyworld.editbench import EDIT_TYPES, EditCase, make_cases
from ..toyworld.editbench import score_edit as checker_score
from .common import (
    atomic_write_text,
    image_grid,
    model_label,
    versions,
    write_markdown_table,
    write_result,
)
from .overhead import processor_overhead
from .selfguide import (
    SELFGUIDE,
    SELFGUIDE_FREE,
    SELFGUIDE_INVERSION,
    donor_scene,
    free_caption,
    selfguide_spec,
)

__all__ = ["run", "Method", "methods", "edit_case", "score_case", "aggregate",
           "processor_overhead", "COLUMNS"]

CASES = {True: 40, False: 300}  # ToyBench cases, by quick
STEPS = {True: 10, False: 25}  # DDIM steps, by quick
CFG = 5.0  # guidance of inversion reconstruction and edit (ToyWorld's generation default)
EDICT_STEPS, EDICT_CFG = 50, 3.0  # the EDICT row's own (see methods())
SEED = 2024  # ToyBench case seed
SDEDIT_STRENGTH = 0.6  # fraction of the grid SDEdit noises to
FLOWEDIT_STRENGTH = 0.85  # fraction of the grid FlowEdit runs (paper, Flux: 24 of 28 steps)
BLEND = dict(blend_words="changed", blend_threshold=0.3, blend_start=0.2, blend_dilation=1)
PIXEL_BLEND = {**BLEND, "blend_space": "pixels"}
MASACTRL_START = 0.08  # MasaCtrl's S as a fraction of the steps (paper: 4 of 50)
REPEATS = {True: 7, False: 15}  # overhead: interleaved repeats (median)
COLUMNS = ("method", "inversion", "edit_type", "success", "preserved", "identity", "bg_psnr",
           "bg_ssim", "gt_psnr", "n", "seconds")
METRICS = ("success", "preserved", "identity", "bg_psnr", "bg_ssim", "gt_psnr")
REFERENCES = ("reconstruction", "ceiling")  # rows that are not edits
FLOOR_MARGIN = 0.1  # success within this of the unedited reconstruction's is "at the floor"


@dataclass(frozen=True)
class Method:
    """One benchmarked editing method."""

    name: str  # row "method"
    inversion: str  # inversion method, or "-" (SDEdit and FlowEdit invert nothing)
    editor: str  # retouch.recipes.editors.EDITORS name, "sdedit" or "flowedit"
    options: dict = field(default_factory=dict)  # editor options
    edit_types: tuple[str, ...] = EDIT_TYPES  # the cases it runs on
    quick: bool = True  # part of --quick
    steps: int | None = None  # its own steps and guidance where the bench's do not suit it
    cfg: float | None = None

    @property
    def label(self) -> str:
        return self.name if self.inversion == "-" else f"{self.name}/{self.inversion}"


def methods(quick: bool) -> list[Method]:
    """The methods of a run (see the module doc)."""
    every = [
        Method("p2p", "direct", "p2p", BLEND),
        Method("p2p (no blend)", "direct", "p2p"),
        Method("p2p", "bdia", "p2p", BLEND),
        # EDICT's loop takes no callbacks (no blending); at 25 steps and CFG 5 its two chains
        # drift apart (300 cases: all edits 0.29, everything else kept 0.05), so it runs at
        # the paper's 50 steps and a guidance of 3 (retouch.recipes.edit.check_loop)
        Method("p2p", "edict", "p2p", quick=False, steps=EDICT_STEPS, cfg=EDICT_CFG),
        Method("p2p", "null_text", "p2p", BLEND, quick=False),
        # edit-friendly DDPM inversion is exact too; without blending it is the best P2P on
        # ToyWorld, with the bench's blend it succeeds less (benchmarks/editing-p2p-ddpm/,
        # docs/benchmarks.md)
        Method("p2p (no blend)", SELFGUIDE_INVERSION, "p2p", quick=False),
        # the bench's blend in pixels, not latents: the ToyWorld VAE is not local, and the
        # source's latents outside the mask decode with the edit's inside to a shifted image
        # (retouch.attention.blend); the headline's P2P
        Method("p2p (pixel blend)", SELFGUIDE_INVERSION, "p2p", PIXEL_BLEND, quick=False),
        Method("p2p (pixel blend)", "direct", "p2p", PIXEL_BLEND, quick=False),
        Method("masactrl", "direct", "masactrl", edit_types=("position", "size")),
        Method("selfguide", SELFGUIDE_INVERSION, "selfguide", SELFGUIDE,
               edit_types=("position", "size")),
        Method("selfguide (caption kept)", SELFGUIDE_INVERSION, "selfguide",
               {**SELFGUIDE, "caption_kept": True}, edit_types=("position", "size", "color")),
        Method("selfguide (caption free)", SELFGUIDE_INVERSION, "selfguide",
               {**SELFGUIDE_FREE, "caption_free": True},
               edit_types=("position", "size", "color")),
        Method("selfguide look", SELFGUIDE_INVERSION, "selfguide", SELFGUIDE,
               edit_types=("color",)),
        Method("none", SELFGUIDE_INVERSION, "none"),
        Method("none", "direct", "none"),
        Method("sdedit", "-", "sdedit", {"strength": SDEDIT_STRENGTH}),
        Method("flowedit", "-", "flowedit", {"strength": FLOWEDIT_STRENGTH}),
        Method("p2p", "rf_solver", "p2p", BLEND),
        Method("rf_solver", "rf_solver", "rf_solver"),
        Method("none", "rf_inversion", "none"),  # RF-Inversion's edit: its pulled ODEs alone
    ]
    return [m for m in every if m.quick or not quick]


def _masactrl_options(unet, steps: int) -> dict:
    from ..attention import coarse_resolution
    from ..attention.sites import controller_sites

    sites = controller_sites(unet)
    coarse = coarse_resolution(sites)
    up = [s.layer for s in sites if s.kind == "self" and s.place == "up"]
    # a transformer has one resolution: its later half of blocks
    fine = [s.layer for s in sites if s.kind == "self" and s.place == "up"
            and s.resolution > coarse] or up
    return {"start_step": max(1, round(MASACTRL_START * steps)), "start_layer": min(fine)}


def edit_case(
    model, case: EditCase, chosen: Sequence[Method], *, steps: int, cfg: float = CFG
) -> dict[str, tuple[np.ndarray, float]]:
    """Edit one case with every applicable method: ``{label: (image uint8 (H, W, 3),
    seconds)}``, plus ``"reconstruction"`` (the first Direct Inversion's source row) and
    ``"ceiling"`` (the rendered target through the VAE)."""
    from ..inversion import invert
    from ..recipes.edit import edit_inverted, sdedit
    from ..recipes.flowedit import flowedit
    from ..recipes.guide import donor_looks
    from ..toyworld.render import render

    out: dict[str, tuple[np.ndarray, float]] = {}
    inversions: dict[str, tuple[object, float]] = {}
    donors: dict[str, dict] = {}  # a colour case's donor looks, per inversion
    for m in chosen:
        if case.edit_type not in m.edit_types:
            continue
        t0 = time.perf_counter()
        if m.editor == "sdedit":
            res = sdedit(model, case.source_image, case.target_prompt, steps=steps, cfg=cfg,
                         seed=SEED, **m.options)
            out[m.label] = (res.edited, time.perf_counter() - t0)
            continue
        if m.editor == "flowedit":
            res = flowedit(model, case.source_image, case.source_prompt, case.target_prompt,
                           steps=steps, cfg=cfg, seed=SEED, **m.options)
            out[m.label] = (res.edited, time.perf_counter() - t0)
            continue
        options = dict(m.options)
        # "caption free": the source caption without the edited attribute's word, for the
        # inversion and the edit, so the caption neither pins the object nor makes the edit
        source = free_caption(case) if options.pop("caption_free", False) else (
            case.source_prompt)
        if m.editor == "selfguide" and not _names_each_object_alone(
                selfguide_spec(case, weights=options["weights"], steps=options["steps"]),
                source):
            continue  # left out of this row; run() counts it
        key = (m.inversion, source, m.steps or steps, m.cfg or cfg)
        if key not in inversions:
            inv = invert(model, case.source_image, source, method=m.inversion,
                         steps=key[2], cfg=key[3], progress=False)
            inversions[key] = (inv, time.perf_counter() - t0)
            t0 = time.perf_counter()
        inv, inv_seconds = inversions[key]
        if m.editor == "masactrl":
            options = {**_masactrl_options(model.network, steps), **options}
        if m.editor == "selfguide":
            # "caption kept" / "caption free": the paper's setting, where guidance alone must
            # move the object
            kept = options.pop("caption_kept", False) or source != case.source_prompt
            target = source if kept else case.target_prompt
            spec = selfguide_spec(case, **options)
            looks = None
            if spec.transfer:  # a colour case: the look of a rendered donor's object
                if m.inversion not in donors:
                    scene, donor_prompt, word = donor_scene(case)
                    donors[m.inversion] = donor_looks(
                        model, render(scene).image, donor_prompt, [word], spec,
                        inversion=m.inversion, steps=steps, cfg=cfg)
                looks = donors[m.inversion]
            plugin = spec.bind(model, source, target, looks)
            res = edit_inverted(model, inv, target, editor="none", plugin=plugin)
        else:
            res = edit_inverted(model, inv, case.target_prompt, editor=m.editor, **options)
        out[m.label] = (res.edited, inv_seconds + time.perf_counter() - t0)
        if m.inversion == "direct" and "reconstruction" not in out:
            out["reconstruction"] = (res.source, float("nan"))
    with torch.no_grad():
        ceiling = model.decode(model.encode_image(case.target_image))[0]
    out["ceiling"] = (ceiling, float("nan"))
    return out


def _names_each_object_alone(spec, prompt: str) -> bool:
    """Whether every word self-guidance steers names one object of ``prompt`` (not so for two
    green circles, or where a caption free of the edit dropped the word that told two
    objects apart): a case where it does not is left out of the self-guidance rows."""
    try:
        spec.check_prompt(prompt)
    except ValueError:
        return False
    return True


def score_case(image: np.ndarray, case: EditCase) -> dict[str, float]:
    """The checker's ``success`` / ``preserved`` and the masked fidelities of one edit."""
    keep = ~case.edit_mask
    return {
        "identity": float("nan"),  # for moves and resizes only
        **{k: float(v) for k, v in checker_score(image, case).items()},
        "bg_psnr": psnr(image, case.source_image, keep=keep),
        "bg_ssim": ssim(image, case.source_image, keep=keep),
        "gt_psnr": psnr(image, case.target_image),
    }


def aggregate(records: Sequence[dict], order: Sequence[tuple[str, str]] = ()) -> list[dict]:
    """Rows of :data:`COLUMNS` from per-case records ``{"method", "inversion", "edit_type",
    "seconds", **metrics}``: per (method, inversion, edit type) and ``"all"``; sorted by edit
    type, then by ``order`` of (method, inversion) (others after, as first seen)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        for edit_type in (r["edit_type"], "all"):
            groups.setdefault((r["method"], r["inversion"], edit_type), []).append(r)
    rows = []
    for (method, inversion, edit_type), rs in groups.items():
        row = {"method": method, "inversion": inversion, "edit_type": edit_type, "n": len(rs)}
        for k in (*METRICS, "seconds"):
            vals = [r[k] for r in rs if np.isfinite(r[k])]
            mean = np.median if k == "seconds" else np.mean
            row[k] = float(mean(vals)) if vals else float("nan")
        rows.append(row)
    types = {t: i for i, t in enumerate((*EDIT_TYPES, "all"))}
    rank = {pair: i for i, pair in enumerate(order)}
    return sorted(rows, key=lambda r: (types[r["edit_type"]],
                                       rank.get((r["method"], r["inversion"]), len(rank))))


def run(*, quick: bool, out: Path, model: str | None = None, cases: int | None = None,
        steps: int | None = None, edit_types: Sequence[str] | None = None,
        method_names: Sequence[str] | None = None, cfg: float | None = None) -> dict:
    """Run the benchmark; writes ``editing.{json,md,png}`` in ``out`` and returns the JSON.

    ``model``: a diffusers folder (default: the shipped ToyWorld model); ``cases`` and
    ``steps`` override the mode's (:data:`CASES`, :data:`STEPS`); ``quick`` picks the methods;
    ``edit_types``: the cases cycle through these only (default :data:`EDIT_TYPES`);
    ``method_names``: only these rows, each a method name (every inversion of it) or a
    ``method/inversion`` label (default: all of the mode's); ``cfg``: the guidance of
    inversion, reconstruction and edit (default :data:`CFG`; rows with their own keep theirs).
    """
    from tqdm.auto import tqdm

    from ..models.pipeline import PipelineModel

    started = versions()  # the commit and versions this run starts from
    cfg = CFG if cfg is None else cfg
    out = Path(out)
    chosen = methods(quick)
    if method_names is not None:
        known = {m.name for m in chosen} | {m.label for m in chosen}
        unknown = sorted(set(method_names) - known)
        if unknown or not method_names:
            raise ValueError(f"unknown method(s) {', '.join(unknown) or '(none)'} for this "
                             f"mode; valid: {', '.join(m.label for m in chosen)}")
        chosen = [m for m in chosen if m.name in method_names or m.label in method_names]
    if (cases is not None and cases < 1) or (steps is not None and steps < 2):
        raise ValueError(f"need cases >= 1 and steps >= 2, got cases={cases}, steps={steps}")
    types = tuple(edit_types or EDIT_TYPES)
    unknown = sorted(set(types) - set(EDIT_TYPES))
    if unknown or not types:
        raise ValueError(f"unknown edit type(s) {', '.join(unknown) or '(none)'}; valid: "
                         f"{', '.join(EDIT_TYPES)}")
    pm = PipelineModel.load(model)  # after every check of the arguments
    weights = model_label(model)  # the weights measured, named before the run
    steps = steps or STEPS[quick]
    cases = make_cases(cases or CASES[quick], seed=SEED, edit_types=types)
    records, examples, skipped = [], {}, {}
    for case in tqdm(cases, desc="bench editing", leave=False):
        edits = edit_case(pm, case, chosen, steps=steps, cfg=cfg)
        for m in chosen:
            if case.edit_type in m.edit_types and m.label not in edits:
                skipped[m.label] = skipped.get(m.label, 0) + 1
        examples.setdefault(case.edit_type, (case, {k: im for k, (im, _) in edits.items()}))
        for label, (image, seconds) in edits.items():
            m = next((m for m in chosen if m.label == label), None)
            method, inversion = (m.name, m.inversion) if m else (
                label, "direct" if label == "reconstruction" else "-")
            records.append({"label": label, "method": method, "inversion": inversion,
                            "edit_type": case.edit_type, "seconds": seconds,
                            **score_case(image, case)})
    order = [(m.name, m.inversion) for m in chosen] + [("reconstruction", "direct")]
    rows = aggregate(records, order)
    overhead = processor_overhead(pm, repeats=REPEATS[quick])
    settings = {"cases": len(cases), "edit_types": list(types), "steps": steps, "cfg": cfg,
                "seed": SEED, "selfguide": SELFGUIDE, "selfguide_free": SELFGUIDE_FREE,
                "sdedit_strength": SDEDIT_STRENGTH, "flowedit_strength": FLOWEDIT_STRENGTH,
                "blend": BLEND,
                "masactrl": _masactrl_options(pm.network, steps),
                "methods": [m.label for m in chosen], "model": weights,
                "skipped": skipped}
    result = {"headline": headline(rows), "rows": rows, "overhead": overhead,
              "settings": settings}
    write_result(out / "editing.json", result, started=started)
    labels = [m.label for m in chosen]
    images, names = _sheet(examples, labels)
    image_grid(images, out / "editing.png", columns=len(labels) + 2, labels=names)
    atomic_write_text(out / "editing.md", _markdown(result, quick=quick))
    return result


def _sheet(examples: dict, labels: list[str]) -> tuple[list[np.ndarray], list[str]]:
    """Tiles and captions: per edit type, source | ground truth | each method (blank: n/a)."""
    images, names = [], []
    for edit_type in EDIT_TYPES:
        if edit_type not in examples:
            continue
        case, edits = examples[edit_type]
        blank = np.full_like(case.source_image, 255)
        images += [case.source_image, case.target_image,
                   *(edits.get(label, blank) for label in labels)]
        names += [f"src: {edit_type}", "truth", *labels]
    return images, names


def headline(rows: list[dict]) -> dict:
    """P2P with local blending in pixels after edit-friendly DDPM inversion (exact) on colour
    and shape edits (``p2p_*``): success, and the dB it keeps outside the edit over
    regenerating from the same inversion without control (``none``) at the same step count;
    the same for the paper's P2P, blending latents, after Direct Inversion (``p2p_direct_*``,
    over ``none`` after Direct Inversion) and for P2P without blending after edit-friendly DDPM
    inversion (``p2p_ddpm_*``).
    Self-guidance on moves and resizes: success per type, the share of cases with everything
    else preserved, and per type the dB it keeps outside the edit over the same inversion's
    ``none`` row (``selfguide_{type}_gain_db``); on colour edits, by a donor's look, the same
    with the source caption (guidance alone, ``selfguide_kept_colour_*``) and with the target
    caption (``selfguide_look_colour_*``); guidance alone under a caption free of the edited
    attribute: ``selfguide_free_{position,size,colour}_{success,preserved,gain_db}`` (the dB
    over the same inversion's ``none`` row, which regenerates with the target caption). The flow
    editors (FlowEdit; RF-Solver's feature sharing on its inversion; RF-Inversion's controlled
    ODEs) on colour edits: success and the dB kept outside the edit over regeneration without
    control after Direct Inversion (``{flowedit,rf_solver,rf_inversion}_colour_*``)."""
    figures = {}
    for edit_type, name in (("color", "colour"), ("shape", "shape")):
        # P2P blending pixels after edit-friendly DDPM inversion (exact), over regeneration
        # from that inversion
        p2p = _get(rows, "p2p (pixel blend)", SELFGUIDE_INVERSION, edit_type)
        none = _get(rows, "none", SELFGUIDE_INVERSION, edit_type)
        figures[f"p2p_{name}_success"] = None if p2p is None else p2p["success"]
        figures[f"p2p_{name}_gain_db"] = _gain_db(p2p, none)
        # the paper's P2P (latent blending) after Direct Inversion, the headline until
        # session 26
        p2p, none = _get(rows, "p2p", "direct", edit_type), _get(rows, "none", "direct", edit_type)
        figures[f"p2p_direct_{name}_success"] = None if p2p is None else p2p["success"]
        figures[f"p2p_direct_{name}_gain_db"] = _gain_db(p2p, none)
        # the same for P2P without blending on edit-friendly DDPM inversion, over regeneration
        # from that inversion
        p2p = _get(rows, "p2p (no blend)", SELFGUIDE_INVERSION, edit_type)
        none = _get(rows, "none", SELFGUIDE_INVERSION, edit_type)
        figures[f"p2p_ddpm_{name}_success"] = None if p2p is None else p2p["success"]
        figures[f"p2p_ddpm_{name}_gain_db"] = _gain_db(p2p, none)
    for edit_type in ("position", "size"):
        sg = _get(rows, "selfguide", SELFGUIDE_INVERSION, edit_type)
        none = _get(rows, "none", SELFGUIDE_INVERSION, edit_type)
        figures[f"selfguide_{edit_type}_success"] = None if sg is None else sg["success"]
        figures[f"selfguide_{edit_type}_gain_db"] = _gain_db(sg, none)
    none = _get(rows, "none", "direct", "color")
    for key, method, inversion in (("flowedit", "flowedit", "-"),
                                   ("rf_solver", "rf_solver", "rf_solver"),
                                   ("rf_inversion", "none", "rf_inversion")):
        row = _get(rows, method, inversion, "color")
        figures[f"{key}_colour_success"] = None if row is None else row["success"]
        figures[f"{key}_colour_gain_db"] = _gain_db(row, none)
    # colour via appearance (a donor's look): guidance alone, and with the target caption
    none = _get(rows, "none", SELFGUIDE_INVERSION, "color")
    for key, method in (("selfguide_kept_colour", "selfguide (caption kept)"),
                        ("selfguide_look_colour", "selfguide look")):
        row = _get(rows, method, SELFGUIDE_INVERSION, "color")
        figures[f"{key}_success"] = None if row is None else row["success"]
        figures[f"{key}_gain_db"] = _gain_db(row, none)
    # guidance alone, the caption free of the edited attribute (the paper's setting)
    # and its fidelity outside the edit over regeneration with the target caption (no control)
    for edit_type, name in (("position", "position"), ("size", "size"), ("color", "colour")):
        row = _get(rows, "selfguide (caption free)", SELFGUIDE_INVERSION, edit_type)
        none = _get(rows, "none", SELFGUIDE_INVERSION, edit_type)
        figures[f"selfguide_free_{name}_success"] = None if row is None else row["success"]
        figures[f"selfguide_free_{name}_preserved"] = None if row is None else row["preserved"]
        figures[f"selfguide_free_{name}_gain_db"] = _gain_db(row, none)
    moved = [r for r in rows if (r["method"], r["inversion"]) == ("selfguide",
                                                                  SELFGUIDE_INVERSION)
             and r["edit_type"] in ("position", "size")]
    figures["selfguide_preserved"] = (float(np.average([r["preserved"] for r in moved],
                                                       weights=[r["n"] for r in moved]))
                                      if moved else None)
    return figures


def _gain_db(row: dict | None, none: dict | None) -> float | None:
    """The dB ``row`` keeps outside the edit over the baseline row ``none`` (None if either is
    missing)."""
    return None if row is None or none is None else row["bg_psnr"] - none["bg_psnr"]


def _get(rows, method: str, inversion: str, edit_type: str) -> dict | None:
    return next((r for r in rows if (r["method"], r["inversion"], r["edit_type"])
                 == (method, inversion, edit_type)), None)


def _verdicts(rows: list[dict]) -> list[str]:
    """One line per edit type: does P2P (Direct Inversion) beat the other methods, does local
    blending help, and does any method's success rise above the checker's floor at all."""
    lines = []
    for edit_type in EDIT_TYPES:
        p2p = _get(rows, "p2p", "direct", edit_type)
        others = [r for r in rows if r["edit_type"] == edit_type and r is not p2p
                  and r["method"] not in (*REFERENCES, "p2p (no blend)")]
        if p2p is None or not others:
            continue
        best = max(others, key=lambda r: (r["success"], r["bg_psnr"]))
        name = f"{best['method']}/{best['inversion']}".removesuffix("/-")
        sign = np.sign(p2p["success"] - best["success"])
        verdict = {1: "wins", 0: "ties", -1: "loses"}[int(sign)]
        keep = "better" if p2p["bg_psnr"] >= best["bg_psnr"] else "worse"
        line = (f"* **{edit_type}**: P2P {verdict} on success ({p2p['success']:.2f} vs "
                f"{best['success']:.2f} for {name}) and keeps the unedited region {keep} "
                f"({p2p['bg_psnr']:.1f} vs {best['bg_psnr']:.1f} dB)")
        ablation = _get(rows, "p2p (no blend)", "direct", edit_type)
        if ablation is not None:
            helps = (p2p["success"], p2p["bg_psnr"]) > (ablation["success"],
                                                        ablation["bg_psnr"])
            line += (f"; local blending {'helps' if helps else 'does not help'} (no blend: "
                     f"{ablation['success']:.2f}, {ablation['bg_psnr']:.1f} dB)")
        floor = _get(rows, "reconstruction", "direct", edit_type)
        top = max(p2p["success"], best["success"])
        if floor is not None and top <= floor["success"] + FLOOR_MARGIN:
            line += (f". Caution: no method is clearly above the unedited reconstruction's "
                     f"{floor['success']:.2f} (the checker's floor): the model does not follow "
                     "this edit yet, so compare preservation, not success")
        lines.append(line + ".")
    return lines


def _markdown(result: dict, *, quick: bool) -> str:
    rows, o, st = result["rows"], result["overhead"], result["settings"]
    summary = [r for r in rows if r["edit_type"] == "all"]
    per_type = [r for r in rows if r["edit_type"] != "all"]
    ref = {r["method"]: r for r in summary if r["method"] in REFERENCES}
    lines = [
        "# Editing benchmark (real images)",
        "",
        f"Model: `{st['model']}`; {st['cases']} ToyBench cases (seed {st['seed']}), the source "
        f"*render* VAE-encoded and inverted under its caption; {st['steps']} DDIM steps on the "
        f"scheduler's grid, CFG {st['cfg']:g}. P2P: word swap, cross window 0.8, self window "
        f"0.4, local blending on the edited word (threshold {BLEND['blend_threshold']}, from "
        f"{BLEND['blend_start']:.0%} of the steps, 3x3 max-pool) except with EDICT (its loop "
        f"takes no callbacks; it runs at {EDICT_STEPS} steps and CFG {EDICT_CFG:g}); "
        f"`p2p (pixel blend)`: the same mask, blending the decoded images instead of the "
        f"latents (`blend_space=\"pixels\"`; the ToyWorld VAE is not local). MasaCtrl "
        f"(position and size only): S = "
        f"{st['masactrl']['start_step']}, L = {st['masactrl']['start_layer']}. SDEdit: strength "
        f"{st['sdedit_strength']}. Self-guidance ({SELFGUIDE_INVERSION} inversion, towards "
        f"the target caption or, in the `caption kept` row, the source's; in the `caption free` "
        f"row the source's without the edited attribute's words, for inversion and edit): "
        f"the object moved by "
        f"the case's exact offset or scaled by its exact factor, or on colour edits taking the "
        f"look of a rendered donor's object of the target colour, others held; weights "
        f"{st['selfguide']['weights']} (the `caption free` row: size "
        f"{st.get('selfguide_free', SELFGUIDE_FREE)['weights']['size']:g}), steps "
        f"{st['selfguide']['steps']}; `none` with the same "
        f"inversion is that edit without guidance. Edit types: "
        f"{', '.join(st.get('edit_types', EDIT_TYPES))}. `seconds`: median per case, "
        "inversion + edit."
        + (" EDICT and null-text inversion run in the full benchmark only (cost)."
           if quick else "")
        + ("".join(f" `{label}` leaves out {n} case(s) where no caption word names the edited "
                   "object alone (its `n` is smaller)." for label, n in st.get("skipped",
                                                                           {}).items())),
        "",
        "## All edit types",
        "",
        write_markdown_table(summary, COLUMNS),
        "## Per edit type",
        "",
        write_markdown_table(per_type, COLUMNS),
        "## Where Prompt-to-Prompt wins and where it does not",
        "",
        "Best other editing method per type (reference rows excluded):",
        "",
        *_verdicts(rows),
        "",
        "Reference rows: `reconstruction` is the inverted source without any edit (its "
        "success is the checker's false-positive floor), `ceiling` the rendered target through "
        "the VAE "
        f"(success {ref.get('ceiling', {}).get('success', float('nan')):.2f}: the best a method "
        "can score through this VAE). P2P keeps the source layout by construction, so it "
        "cannot move objects (position) and struggles to resize them; MasaCtrl is the paper's "
        "method for those (compare its rows with `none`: at these S and L it touches only the "
        "finest decoder layers). On *generated* images same-seed regeneration already keeps "
        "ToyWorld's layout, which is why this benchmark edits real (rendered) images.",
        "",
        f"**Processor overhead** (one UNet forward, {o['batch_rows']} rows, median of "
        f"{o['repeats']} interleaved repeats, diffusers' `{o['diffusers_processor']}` = 1): "
        f"retouch's processor with no controller {o['ratio_no_controller']:.3f}x, with an "
        f"AttentionStore {o['ratio_store']:.3f}x.",
        "",
        "![examples](editing.png)",
        "",
    ]
    return "\n".join(lines)
