"""Measure a ToyWorld training run (or a model folder) quickly: coverage and adherence.

Coverage (soft IoU and 0.3 x max threshold IoU of object and background words' cross-attention
maps, :mod:`retouch.bench.coverage`) on ``--scenes`` held-out renders, and the checker's read of
``--prompts`` generated images (fully specified extended captions, 25 DDIM steps, CFG 5, as in
``bench toyworld``) plus as many partially specified ones. A run is measured on its *raw*
weights by default (``--ema`` for the EMA): over a pilot of a few hundred steps the EMA (decay
0.999) still averages the run with its starting weights. About a minute with 32 + 32.

    python scripts/coverage_pilot.py RUN_OR_MODEL [--scenes 32] [--prompts 32] [--ema]

Writes ``RUN/pilot-<step>.json`` (or prints only, for a model folder).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def measure(folder: Path, *, scenes: int, prompts: int) -> dict:
    from retouch.bench.coverage import measure_coverage
    from retouch.bench.toyworld import benchmark_scenes, partial_prompts, prompt_adherence
    from retouch.models.pipeline import PipelineModel

    model = PipelineModel.load(str(folder))
    t0 = time.time()
    data = benchmark_scenes(max(scenes, prompts), extended=True)
    sub = type(data)(data.scenes[:scenes], data.images[:scenes], data.masks[:scenes])
    out = {"coverage": measure_coverage(model, sub)}
    out["adherence"] = prompt_adherence(model, data.scenes[:prompts])[0]
    partial = prompt_adherence(model, prompts=partial_prompts(prompts, extended=True))[0]
    out["partial_all"] = partial["all"]
    out["seconds"] = time.time() - t0
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", help="a `retouch toyworld train` run directory or a model folder")
    p.add_argument("--scenes", type=int, default=32)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--ema", action="store_true", help="measure a run's EMA weights")
    args = p.parse_args(argv)
    src = Path(args.source)
    if (src / "unet.safetensors").exists():
        from retouch.bench.common import write_json
        from retouch.training.checkpoint import load
        from retouch.training.export import export_pipeline

        step = load(src / "unet.safetensors")[1]["step"]
        with tempfile.TemporaryDirectory(dir=src) as tmp:
            folder = export_pipeline(src, Path(tmp) / "model", ema=args.ema)
            result = {"step": step, "ema": args.ema,
                      **measure(folder, scenes=args.scenes, prompts=args.prompts)}
        write_json(src / f"pilot-{step}{'-ema' if args.ema else ''}.json", result)
    else:
        result = measure(src, scenes=args.scenes, prompts=args.prompts)
    summary = {k: result["coverage"]["attention_maps"][k]
               for k in ("soft_iou", "big_threshold_iou", "background_soft_iou")}
    summary |= {"res8_soft_iou": result["coverage"]["res8"]["soft_iou"],
                "res16_soft_iou": result["coverage"]["res16"]["soft_iou"],
                "all_right": result["adherence"]["all"], "partial_all": result["partial_all"]}
    print(json.dumps(summary))
    print(json.dumps(result, indent=1), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
