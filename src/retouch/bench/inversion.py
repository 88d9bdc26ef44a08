"""Inversion benchmark: how well each method gives a real (rendered) image back.

Setup: ToyWorld scenes are *rendered* (not generated), captioned with their canonical caption,
VAE-encoded (posterior mean) and inverted with every method of :mod:`retouch.inversion` at
CFG 1 and CFG 7.5, along the model scheduler's own DDIM grid (10 steps quick, 50 full); the
reconstruction is decoded and compared with the render. All images of a setting go through
the network as one batch.

Columns: ``latent_rel_error`` = mean over images of ``||z_rec - z|| / ||z||`` (z: the encoded
latent); ``psnr`` = mean PSNR (dB, images in [0, 1]) of the decoded reconstruction against the
render; ``psnr_ceiling`` = the same for a plain VAE encode -> decode (no diffusion at all), the
best any inversion can do; ``nfe`` = network evaluations per image for inversion plus
reconstruction, where a CFG step's batched unconditional + conditional call counts as one (so
CFG 1 and CFG 7.5 cost the same NFE) and null-text's backward passes are not counted;
``seconds`` = wall time per image (batch time / images) on this machine. A method the model
refuses (EDICT on a rectified-flow model) gets a row with its reason and no numbers.

Outputs: ``inversion.json`` (``{"rows": [...]}``), ``inversion.md`` (table), ``inversion.png``
(per image and CFG: input, VAE ceiling, then each method's reconstruction).
"""

from __future__ import annotations

import math
import time
from io import BytesIO
from pathlib import Path

import torch

from retouch.bench.common import (
    atomic_write_bytes,
    atomic_write_text,
    model_label,
    versions,
    write_markdown_table,
    write_result,
)
from retouch.metrics import MSE_FLOOR

__all__ = ["run", "CFGS", "COLUMNS"]

CFGS = (1.0, 7.5)  # guidance scales benchmarked
IMAGES = {True: 8, False: 32}  # rendered scenes, by quick
STEPS = {True: 10, False: 50}  # DDIM steps, by quick
GRID_IMAGES = 3  # images shown in the PNG grid
SEED = 0  # scene seed
COLUMNS = ("method", "cfg", "latent_rel_error", "psnr", "psnr_ceiling", "nfe", "seconds")


def _psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (measured on [0, 1]); (B,)."""
    a = (a.clamp(-1, 1) + 1) / 2
    b = (b.clamp(-1, 1) + 1) / 2
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(MSE_FLOOR)
    return -10 * torch.log10(mse)


def _to_uint8(x: torch.Tensor):
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _grid_png(columns: list[str], rows: list[tuple[str, list]], size: int) -> bytes:
    """A labelled grid: one header row of column names, then rows of uint8 (H, W, 3) tiles."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=11)
    tile, pad, label_w, head_h = size * 2, 4, 110, 30
    w = label_w + len(columns) * (tile + pad)
    h = head_h + len(rows) * (tile + pad)
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    for j, name in enumerate(columns):
        x = label_w + j * (tile + pad) + tile // 2
        for k, part in enumerate(name.split("\n")):
            draw.text((x, 2 + 13 * k), part, fill="black", font=font, anchor="ma")
    for i, (label, tiles) in enumerate(rows):
        y = head_h + i * (tile + pad)
        draw.text((4, y + tile // 2), label, fill="black", font=font, anchor="lm")
        for j, arr in enumerate(tiles):
            im = Image.fromarray(arr).resize((tile, tile), Image.Resampling.NEAREST)
            img.paste(im, (label_w + j * (tile + pad), y))
    buf = BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _headline(rows: list[dict]) -> dict:
    """Per method, the worst over the guidance scales: latent error and PSNR."""
    worst: dict[str, dict] = {}
    for r in (r for r in rows if "refused" not in r):
        w = worst.setdefault(r["method"], {"latent_rel_error": 0.0, "psnr": math.inf})
        w["latent_rel_error"] = max(w["latent_rel_error"], r["latent_rel_error"])
        w["psnr"] = min(w["psnr"], r["psnr"])
    return {"worst_latent_rel_error": {m: w["latent_rel_error"] for m, w in worst.items()},
            "worst_psnr": {m: w["psnr"] for m, w in worst.items()}}


def run(*, quick: bool, out: Path, model: str | None = None) -> dict:
    """Run the benchmark; writes ``inversion.{json,md,png}`` in ``out`` and returns the JSON.

    ``model``: a diffusers folder (default: the shipped ToyWorld model).
    """
    from tqdm.auto import tqdm

    from retouch.inversion import METHODS, as_factory, invert, reconstruct
    from retouch.inversion.core import MethodRefused
    from retouch.models.pipeline import PipelineModel
    from retouch.toyworld.dataset import make_scenes
    from retouch.toyworld.scene import caption

    started = versions()  # the commit and versions this run starts from
    out = Path(out)
    pm = PipelineModel.load(model)
    label = model_label(model)  # the weights measured, named before the run
    n, steps = IMAGES[quick], STEPS[quick]
    scenes = make_scenes(
        n, seed=SEED, size=pm.image_size, mask_size=pm.latent_shape(1)[-1], progress=False
    )
    captions = [caption(s).text for s in scenes.scenes]
    images = scenes.images.to(pm.device)
    with torch.no_grad():
        latents = pm.encode_image(images)
        ceiling_images = pm.decode(latents, output="tensor")
    ceiling = float(_psnr(ceiling_images, images).mean())
    times = pm.time_grid(steps)
    rows, shown = [], {}
    settings = [(cfg, m) for cfg in CFGS for m in METHODS]
    for cfg, method in tqdm(settings, desc="bench inversion", leave=False):
        factory = as_factory(pm, captions)
        t0 = time.perf_counter()
        try:
            inv = invert(factory, latents, method=method, cfg=cfg, times=times, progress=False)
        except MethodRefused as refusal:  # e.g. edict on a flow model's pure-noise grid
            rows.append({"method": method, "cfg": cfg, "refused": str(refusal),
                         **dict.fromkeys(COLUMNS[2:])})
            shown[(cfg, method)] = _to_uint8(torch.zeros_like(images[:GRID_IMAGES]).cpu())
            continue
        rec = reconstruct(inv, factory, progress=False)
        seconds = (time.perf_counter() - t0) / n
        with torch.no_grad():
            decoded = pm.decode(rec, output="tensor")
        err = (rec - latents).flatten(1).norm(dim=1) / latents.flatten(1).norm(dim=1)
        rows.append(
            {
                "method": method,
                "cfg": cfg,
                "latent_rel_error": float(err.mean()),
                "psnr": float(_psnr(decoded, images).mean()),
                "psnr_ceiling": ceiling,
                "nfe": factory.calls,
                "seconds": seconds,
            }
        )
        shown[(cfg, method)] = _to_uint8(decoded[:GRID_IMAGES].cpu())
    result = {"headline": _headline(rows), "model": label, "rows": rows}
    write_result(out / "inversion.json", result, started=started)
    inputs = _to_uint8(images[:GRID_IMAGES].cpu())
    ceil = _to_uint8(ceiling_images[:GRID_IMAGES].cpu())
    grid_rows = [
        (f"image {i}, cfg {cfg:g}", [inputs[i], ceil[i], *(shown[(cfg, m)][i] for m in METHODS)])
        for i in range(min(GRID_IMAGES, n))
        for cfg in CFGS
    ]
    names = ["input", "VAE\nceiling", *(m.replace("_", "\n", 1) for m in METHODS)]
    atomic_write_bytes(out / "inversion.png", _grid_png(names, grid_rows, pm.image_size))
    best = {c: max((r for r in rows if r["cfg"] == c and "refused" not in r),
                   key=lambda r: r["psnr"]) for c in CFGS}
    refused = sorted({f"{r['method']} ({r['refused']})" for r in rows if "refused" in r})
    lines = [
        "# Inversion benchmark",
        "",
        f"Model: `{label}`; {n} rendered ToyWorld scenes "
        f"({pm.image_size}x{pm.image_size}, seed {SEED}) with their captions; {steps} DDIM "
        f"steps on the scheduler's grid; CFG {', '.join(f'{c:g}' for c in CFGS)}. "
        "NFE = network calls per image for inversion + reconstruction (a batched CFG pair "
        "counts once; null-text backward passes not counted); seconds per image.",
        "",
        write_markdown_table(rows, COLUMNS),
        "Best PSNR: "
        + "; ".join(f"CFG {c:g}: {b['method']} ({b['psnr']:.2f} dB)" for c, b in best.items())
        + f"; VAE ceiling {ceiling:.2f} dB."
        + (f" Refused on this model: {'; '.join(refused)}." if refused else ""),
        "",
        "![reconstructions](inversion.png)",
        "",
    ]
    atomic_write_text(out / "inversion.md", "\n".join(lines))
    return result
