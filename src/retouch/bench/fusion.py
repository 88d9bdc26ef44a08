"""Fusion benchmark: panoramas (MultiDiffusion, SyncDiffusion) and region layouts on ToyWorld.

**Panoramas.** Each prompt names one object's size, colour and shape but no background and no
fill style (``a big red circle``), so every window picks those itself; a panorama is coherent
when the checker, reading each non-overlapping native-size tile, finds one background colour on
every tile and at most one fill style among all objects. Canvases 4x and 8x the model's width,
windows every half window (20 DDIM steps, CFG 5, one seed per prompt, the same for every
method). Methods: MultiDiffusion; SyncDiffusion (:data:`SYNC`); MultiDiffusion with every
window also attending to the middle window's self-attention (StyleAligned's shared attention,
the middle window as reference: a cheaper route to one look); and a no-overlap baseline
(stride = window: independent tiles side by side). 64 prompts, 128 panoramas per method. Per
method:

* ``coherence``: the share of coherent panoramas (background and style; each alone too);
  SyncDiffusion against MultiDiffusion also paired, panorama by panorama (the same prompt,
  width and seed): how many only one of them makes coherent, and McNemar's exact two-sided
  p-value for the difference (``coherence_sync_p``);
* ``adherence``: the share of tiles holding an object of the prompt's colour and shape (the
  paper's trade-off: synchronising may cost per-window fidelity);
* ``seam_ratio``: the mean horizontal gradient energy on the columns where windows begin or end
  over that of the other columns (1: no seam);
* seconds per panorama, network evaluations (each CFG half counts one; SyncDiffusion's gradient
  pass counts its forward and backward as one each) and window rows per step.

**Distances.** How well SyncDiffusion's distances track the checker's coherence: over pairs
of tiles of the MultiDiffusion panoramas (the anchor tile with every other), the ROC AUC of the
distance separating pairs the checker calls coherent (same background and style) from the rest.

**Regions.** Layouts of one to four native-size regions (a 1x2, 2x1, 1x3 and 2x2 split), each
region prompting one object (colour and shape) on one shared background; a region's object is
right when its tile holds an object of that colour and shape and no other tile does. Both
MultiDiffusion's region masks (the recipe's defaults: bootstrapping 40% of the steps, windows
every quarter window, each weighted by the square of the share of it the region fills) and
regional prompting (base prompt: all objects and the background, base ratio 0.3; its default
windows, side by side); and the seam ratio (as for panoramas) on the columns where regions
meet.

**Grid stacking**: four views of each prompt as one 2x2 canvas (one image to the model, so its
self-attention spans the views) against four independent images; coherence and adherence as
for panoramas, over the four views.

**Cost against width**: seconds, NFE and peak resident memory growth of one MultiDiffusion
panorama at 1x, 2x, 4x and 8x the width (memory: the process's peak RSS, read before and after;
widths run first, in increasing order).

Outputs ``fusion.json`` (headline ``coherence_multidiffusion``, ``coherence_sync``,
``sync_time_ratio``, ``region_adherence_multidiffusion``, ``region_adherence_regional``,
``seam_ratio``, ``coherence_sync_p``; ``coherence_paired``, and ``per_panorama``: each
method's coherence verdicts by prompt, then width), ``fusion.md``, ``fusion.png``
(panoramas), ``fusion_regions.png``. ``parts`` (:data:`PARTS`; ``retouch bench fusion
--parts regions``) runs some parts alone: the headline then holds only their figures.
"""

from __future__ import annotations

import random
import resource
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..fusion import RegionLayout, VAEFeatureDistance, colour_statistics, window_boxes
from ..models.pipeline import PipelineModel
from ..recipes.fusion import default_stride, grid_views, panorama, regions, sync_diffusion
from ..recipes.generate import generate
from ..toyworld.checker import read
from ..toyworld.scene import BACKGROUNDS, COLORS, SHAPES
from .common import (
    atomic_write_text,
    chosen_parts,
    image_grid,
    model_label,
    paired_counts,
    versions,
    write_markdown_table,
    write_result,
)

__all__ = ["run", "PARTS", "bench_layout", "bench_prompt", "panorama_scores", "region_scores",
           "seam_ratio", "auc", "SYNC"]

STEPS, CFG = 20, 5.0
#: SyncDiffusion's settings here: the paper's decay and the reference script's 10 synchronised
#: steps of 50 (here 4 of 20). The distance is the decoded images' colour statistics
#: (``colour``); its weight 1 was chosen on other prompts (random.Random(0)), 16 of them at 4x and
#: 8x: coherence 0.41 at weight 1, 0.34 at 2 (0.31 with 8 synchronised steps), MultiDiffusion
#: 0.25; the VAE-feature distance plus the colour one 0.38. The paper's weight 20 is LPIPS's.
SYNC = dict(weight=1.0, decay=0.95, steps=4, distance="colour")
#: Region layouts by grid (rows x columns): RPG splits of the canvas into native-size tiles.
SPLITS = {"1x2": "1,1", "2x1": "1;1", "1x3": "1,1,1", "2x2": "1,1,1;1,1,1"}


def bench_prompt(rng: random.Random) -> tuple[str, str, str]:
    size, color, shape = rng.choice(("small", "big")), rng.choice(tuple(COLORS)), rng.choice(
        SHAPES)
    return f"a {size} {color} {shape}", color, shape


def _tiles(image: np.ndarray, size: int) -> list[np.ndarray]:
    h, w = image.shape[:2]
    return [image[r:r + size, c:c + size] for r in range(0, h - size + 1, size)
            for c in range(0, w - size + 1, size)]


def panorama_scores(image: np.ndarray, color: str, shape: str, size: int) -> dict[str, float]:
    readings = [read(t) for t in _tiles(image, size)]
    backgrounds = {r.background for r in readings}
    styles = {o.style for r in readings for o in r.objects if o.style is not None}
    bg_one = len(backgrounds) == 1 and None not in backgrounds
    style_one = len(styles) <= 1
    hits = [any(o.color == color and o.shape == shape for o in r.objects) for r in readings]
    return {"coherence": float(bg_one and style_one), "background_one": float(bg_one),
            "style_one": float(style_one), "adherence": float(np.mean(hits))}


def seam_ratio(image: np.ndarray, borders: list[int]) -> float | None:
    """Mean |horizontal difference| on the border columns over the other columns'."""
    f = image.astype(np.float64)
    d = np.abs(np.diff(f, axis=1)).mean(axis=(0, 2))  # d[x - 1]: between columns x - 1 and x
    cols = np.zeros(len(d), bool)
    for x in borders:
        if 0 < x < image.shape[1]:
            cols[x - 1] = True
    if not cols.any() or cols.all() or d[~cols].mean() == 0:
        return None
    return float(d[cols].mean() / d[~cols].mean())


def _window_borders(width_latent: int, window: int, stride: int, factor: int) -> list[int]:
    """Image columns where a panorama's windows begin or end."""
    lefts = {left for _, left in window_boxes((window, width_latent), (window, window), stride)}
    return sorted({x * factor for s in lefts for x in (s, s + window)})


def _windows(width_latent: int, window: int, stride: int) -> int:
    return len(window_boxes((window, width_latent), (window, window), stride))


def auc(scores: list[float], labels: list[bool]) -> float | None:
    """ROC AUC of ``scores`` ranking positive ``labels`` first (ties count half)."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return float(wins / (len(pos) * len(neg)))


def _distance_pairs(model, images: list[np.ndarray], size: int) -> dict[str, float | None]:
    """AUC of each default distance for the checker's tile-pair coherence (see module doc)."""
    distances = {name: VAEFeatureDistance(model.vae, statistics=name == "vae-stats")
                 for name in ("vae", "vae-stats")} | {"colour": colour_statistics}
    scores = {name: [] for name in distances}
    labels = []
    for image in images:
        tiles = _tiles(image, size)
        anchor = len(tiles) // 2
        readings = [read(t) for t in tiles]
        for k, t in enumerate(tiles):
            if k == anchor:
                continue
            a, b = readings[anchor], readings[k]
            labels.append(a.background is not None and a.background == b.background
                          and a.style == b.style)
            pair = model.to_tensor(np.stack([tiles[anchor], t]))
            with torch.no_grad():
                for name, dist in distances.items():
                    scores[name].append(-float(dist(pair[:1], pair[1:])[0]))
    return {f"distance_auc_{name}": auc(s, labels) for name, s in scores.items()} | {
        "distance_pairs": len(labels), "distance_pairs_coherent": int(sum(labels))}


def bench_layout(rng: random.Random, split: str, size: int, grid: tuple[int, int]):
    rows, cols = grid
    background = rng.choice(tuple(BACKGROUNDS))
    visible = [(c, s) for c in COLORS for s in SHAPES if not (c == background == "black")]
    picks = rng.sample(visible, rows * cols)  # distinct objects, none black on black
    prompts = [f"a {c} {s} on a {background} background" for c, s in picks]
    objects = " and ".join(f"a {c} {s}" for c, s in picks)
    layout = RegionLayout.from_dict({
        "width": cols * size, "height": rows * size, "split": split, "prompts": prompts,
        "base": f"{objects} on a {background} background"})
    return layout, picks


def region_scores(image: np.ndarray, picks: list[tuple[str, str]], size: int) -> list[bool]:
    """Per region: its tile holds its object, and no other tile does."""
    readings = [read(t) for t in _tiles(image, size)]
    found = [{(o.color, o.shape) for o in r.objects} for r in readings]
    return [picks[k] in found[k] and not any(picks[k] in f for j, f in enumerate(found) if j != k)
            for k in range(len(picks))]


#: The benchmark's parts (``retouch bench fusion --parts regions`` runs one alone).
PARTS = ("cost", "panoramas", "regions", "grids")


def run(*, quick: bool, out: Path, model: str | None = None,
        parts: tuple[str, ...] | None = None) -> dict:
    started = versions()  # the commit and versions this run starts from
    parts = chosen_parts("fusion", parts, PARTS)
    tw = PipelineModel.load(model)
    size, window = tw.image_size, tw.unet.config.sample_size
    setup = dict(quick=quick, size=size, window=window, stride=window // 2,
                 steps=8 if quick else STEPS)
    rng = random.Random(1)  # SYNC's weight was chosen on prompts of random.Random(0)
    # regions draw after these (so their layouts changed when the prompts went from 32 to 64)
    prompts = [bench_prompt(rng) for _ in range(2 if quick else 64)]
    result = {"headline": {}, "model": model_label(model), "quick": quick, "parts": list(parts),
              "steps": setup["steps"], "cfg": CFG, "stride": setup["stride"],
              "prompts": [p for p, _, _ in prompts]}
    sections, figures = {}, {}
    for part, fn in (("cost", _cost_part), ("panoramas", _panorama_part),
                     ("regions", _region_part), ("grids", _grid_part)):
        if part in parts:
            fields, text, images = fn(tw, prompts, rng, **setup)
            result["headline"].update(fields.pop("headline"))
            result.update(fields)
            sections[part] = text
            for name, (grid, labels) in images.items():
                have = figures.setdefault(name, ([], []))
                have[0].extend(grid)
                have[1].extend(labels)
    out.mkdir(parents=True, exist_ok=True)
    write_result(out / "fusion.json", result, started=started)
    only = "" if set(parts) == set(PARTS) else f" (parts run: {', '.join(parts)})"
    shown = [sections[p] for p in ("panoramas", "regions", "grids", "cost") if p in sections]
    atomic_write_text(out / "fusion.md", "# Fusion: panoramas and region layouts on ToyWorld"
                      f"{only}\n\nModel: `{result['model']}`.\n\n" + "\n".join(shown))
    if "fusion" in figures:
        image_grid(figures["fusion"][0], out / "fusion.png", columns=1,
                   labels=figures["fusion"][1], scale=2)
    if "regions" in figures:
        image_grid(_pad(figures["regions"][0]), out / "fusion_regions.png", columns=2,
                   labels=figures["regions"][1], scale=2)
    return result


def _cost_part(tw, prompts, rng, *, quick, size, window, stride, steps):
    cost = []
    for k in (1, 2, 4) if quick else (1, 2, 4, 8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        panorama(tw, prompts[0][0], width=k * size, stride=stride, steps=steps, cfg=CFG, seed=0)
        secs = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        windows = _windows(k * window, window, stride)
        cost.append({"width": f"{k}x", "windows": windows, "seconds": secs,
                     "seconds_per_window": secs / windows, "nfe": 2 * steps,
                     "rows_per_step": 2 * windows, "peak_rss_growth_mb": (after - before) / 1024})
    text = ("## Cost against width (MultiDiffusion)\n\n"
            + write_markdown_table(cost, list(cost[0])))
    return {"headline": {}, "cost": cost}, text, {}


def _panorama_part(tw, prompts, rng, *, quick, size, window, stride, steps):
    widths = (4,) if quick else (4, 8)
    methods = {"multidiffusion": dict(stride=stride),
               "syncdiffusion": dict(stride=stride, sync=True),
               "shared anchor attention": dict(stride=stride, share_anchor=True),
               "no overlap": dict(stride=window)}
    factor = tw.vae_factor
    tally = {m: [] for m in methods}
    seconds = {m: 0.0 for m in methods}
    seams = {m: [] for m in methods}
    md_images, grid, labels = [], [], []
    sync_rows = {k: v for k, v in SYNC.items() if k != "distance"}
    for i, (prompt, color, shape) in enumerate(tqdm(prompts, desc="bench fusion: panoramas")):
        for k in widths:
            for name, kw in methods.items():
                sync = sync_diffusion(tw, distance=SYNC["distance"], **sync_rows) if kw.get(
                    "sync") else None
                t0 = time.perf_counter()
                image = panorama(tw, prompt, width=k * size, stride=kw["stride"], sync=sync,
                                 share_anchor=kw.get("share_anchor", False), steps=steps,
                                 cfg=CFG, seed=i)
                seconds[name] += time.perf_counter() - t0
                tally[name].append(panorama_scores(image, color, shape, size))
                seams[name].append(seam_ratio(image, _window_borders(
                    k * window, window, kw["stride"], factor)))
                if name == "multidiffusion":
                    md_images.append(image)
                if i < 3 and k == 4:
                    grid.append(image)
                    labels.append(f"{name}: {prompt}")
    n = len(prompts) * len(widths)
    means = {}
    for name, rows in tally.items():
        means[name] = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
        valid = [s for s in seams[name] if s is not None]
        means[name]["seam_ratio"] = float(np.mean(valid)) if valid else None
        means[name]["seconds_per_panorama"] = seconds[name] / n
    for name, kw in methods.items():
        views = {k: _windows(k * window, window, kw["stride"]) for k in widths}
        means[name].update({f"windows_{k}x": v for k, v in views.items()})
        sync_steps = SYNC["steps"] if kw.get("sync") else 0
        # a synchronised step adds a forward and a backward pass (both CFG halves)
        means[name]["nfe"] = 2 * (steps + 2 * sync_steps)
    distances = _distance_pairs(tw, md_images, size)
    md, sy = means["multidiffusion"], means["syncdiffusion"]
    headline = {
        "coherence_multidiffusion": md["coherence"], "coherence_sync": sy["coherence"],
        "sync_time_ratio": sy["seconds_per_panorama"] / md["seconds_per_panorama"],
        "seam_ratio": md["seam_ratio"],
        "adherence_multidiffusion": md["adherence"], "adherence_sync": sy["adherence"],
        "seam_ratio_no_overlap": means["no overlap"]["seam_ratio"],
        "coherence_shared_anchor": means["shared anchor attention"]["coherence"],
    }
    paired = paired_counts([s["coherence"] for s in tally["syncdiffusion"]],
                           [s["coherence"] for s in tally["multidiffusion"]],
                           names=("sync_only", "multidiffusion_only"))
    headline["coherence_sync_p"] = paired["p"]
    rows = [{"method": m, **v} for m, v in means.items()]
    text = (
        f"{n} panoramas per method ({len(prompts)} prompts naming no background or style, at "
        f"{' and '.join(f'{k}x' for k in widths)} the width; windows every {stride} latent "
        f"pixels; {steps} DDIM steps, CFG {CFG}). "
        f"SyncDiffusion: {SYNC}. See `retouch.bench.fusion`.\n\n"
        + write_markdown_table(rows, ["method", "coherence", "background_one", "style_one",
                                      "adherence", "seam_ratio", "seconds_per_panorama", "nfe",
                                      *(f"windows_{k}x" for k in widths)])
        + f"\nPaired, panorama by panorama: coherent with SyncDiffusion only "
        f"{paired['sync_only']}, with MultiDiffusion only {paired['multidiffusion_only']}, both "
        f"{paired['both']}, neither {paired['neither']}; McNemar's exact two-sided p = "
        f"{paired['p']:.3g}.\n"
        + "\n## Distances against the checker's coherence (tile pairs)\n\n"
        + write_markdown_table([distances], list(distances)))
    fields = {"headline": headline, "panoramas_per_method": n, "sync": SYNC, "methods": means,
              "coherence_paired": paired, "distances": distances,
              "per_panorama": {m: [s["coherence"] for s in scores]
                               for m, scores in tally.items()},
              "per_panorama_order": "prompt, then width"}
    return fields, text, {"fusion": (grid, labels)}


def _region_part(tw, prompts, rng, *, quick, size, window, stride, steps):
    """MultiDiffusion's region masks and regional prompting, each with its default windows
    (a quarter window apart; side by side)."""
    methods = ("multidiffusion", "regional")
    tally = {m: [] for m in methods}
    seconds = {m: 0.0 for m in methods}
    seams = {m: [] for m in methods}
    grid, labels = [], []
    cases = 1 if quick else 8
    per_split = {}
    bar = tqdm(total=len(SPLITS) * cases, desc="bench fusion: regions")
    for split_name, split in SPLITS.items():
        grid_rc = tuple(int(n) for n in split_name.split("x"))
        for c in range(cases):
            layout, picks = bench_layout(rng, split, size, grid_rc)
            for method in tally:
                t0 = time.perf_counter()
                image = regions(tw, layout, method=method, steps=steps, cfg=CFG, seed=c)
                seconds[method] += time.perf_counter() - t0
                right = region_scores(image, picks, size)
                tally[method] += right
                borders = [k * size for k in range(1, grid_rc[1])]
                if borders:
                    seams[method].append(seam_ratio(image, borders))
                per_split.setdefault((split_name, method), []).extend(right)
                if c == 0:
                    grid.append(image)
                    labels.append(f"{method} {split_name}")
            bar.update()
    bar.close()
    means = {m: float(np.mean(v)) for m, v in tally.items()}
    seam_means = {m: float(np.mean(valid)) if (valid := [x for x in v if x is not None])
                  else None for m, v in seams.items()}
    by_split = {f"{s} {m}": float(np.mean(v)) for (s, m), v in per_split.items()}
    split_rows = [{"layout": s, "multidiffusion": by_split[f"{s} multidiffusion"],
                   "regional": by_split[f"{s} regional"]} for s in SPLITS]
    text = (f"## Region layouts ({cases} per layout; MultiDiffusion windows every "
            f"{default_stride(tw)} latent pixels, regional prompting's side by side)\n\n"
            + write_markdown_table(split_rows, ["layout", "multidiffusion", "regional"])
            + "\nSeam ratio on the columns where regions meet (layouts split into columns; 1: "
            "no seam): " + ", ".join(f"{m} {v:.2f}" if v is not None else f"{m} -"
                              for m, v in seam_means.items())
            + "\n")
    fields = {"headline": {"region_adherence_multidiffusion": means["multidiffusion"],
                           "region_adherence_regional": means["regional"]},
              "regions": means, "regions_by_split": by_split,
              "region_seconds": {m: s / (len(SPLITS) * cases) for m, s in seconds.items()},
              "region_seam_ratio": seam_means}
    return fields, text, {"regions": (grid, labels)}


def _grid_part(tw, prompts, rng, *, quick, size, window, stride, steps):
    tally = {"grid 2x2": [], "independent": []}
    cases = 2 if quick else 16
    grid, labels = [], []
    for i, (prompt, color, shape) in enumerate(tqdm(prompts[:cases],
                                                   desc="bench fusion: grids")):
        stacked = grid_views(tw, prompt, grid=(2, 2), steps=steps, cfg=CFG, seed=i)
        alone = generate(tw, [prompt] * 4, steps=steps, cfg=CFG, seed=i, progress=False)
        for name, views in (("grid 2x2", stacked), ("independent", alone)):
            tally[name].append(panorama_scores(np.concatenate(list(views), 1), color, shape,
                                               size))
        if i == 0:
            grid += [np.concatenate(list(stacked), 1), np.concatenate(list(alone), 1)]
            labels += ["grid 2x2 views", "independent views"]
    means = {m: {k: float(np.mean([r[k] for r in v])) for k in v[0]} for m, v in tally.items()}
    text = (f"## Grid stacking ({cases} prompts, 4 views each)\n\n"
            + write_markdown_table([{"method": m, **v} for m, v in means.items()],
                                   ["method", "coherence", "background_one", "style_one",
                                    "adherence"]))
    return {"headline": {}, "grid_views": means}, text, {"regions": (grid, labels)}


def _pad(images: list[np.ndarray]) -> list[np.ndarray]:
    """Images of different sizes padded white to the largest (for one grid)."""
    h = max(im.shape[0] for im in images)
    w = max(im.shape[1] for im in images)
    out = []
    for im in images:
        canvas = np.full((h, w, 3), 255, np.uint8)
        canvas[: im.shape[0], : im.shape[1]] = im
        out.append(canvas)
    return out
