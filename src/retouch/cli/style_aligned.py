"""The ``retouch style-aligned`` sub-command: a batch that shares the first image's style.

``retouch style-aligned REFERENCE_PROMPT PROMPT [PROMPT ...] [--reference IMAGE] [--inversion
M] [--shared-noise] [--option KEY=VALUE] --out DIR`` generates one image per prompt; every image
after the first attends to the first one's self-attention keys and values (StyleAligned, Hertz et
al. 2024). ``--reference IMAGE`` makes the reference a real image (captioned by the first prompt,
inverted with ``--inversion``, default ddim). ``--option`` passes a SharedAttention option
(``adain_values=true``, ``score_shift=-1``, ``start_layer=2``...). Writes ``DIR/image_000.png``...
(the first is the reference), ``DIR/batch.png`` (a row) and ``DIR/style_aligned.json``.
Wire-in: ``register(subparsers)``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from retouch.files import atomic_write_text, check_output_dir, save_image

__all__ = ["register", "run_style_aligned"]


def run_style_aligned(args: argparse.Namespace) -> None:
    """Handler of ``retouch style-aligned``."""
    from retouch.attention import SharedAttention
    from retouch.cli.edit import parse_options
    from retouch.images import read_image
    from retouch.models.pipeline import PipelineModel
    from retouch.recipes.consistency import style_aligned

    options = parse_options(args.option)
    try:
        SharedAttention(**options)  # refuses unknown or bad options before the model loads
    except TypeError as err:
        raise ValueError(f"--option: {err}; see retouch.attention.SharedAttention") from None
    if args.inversion is not None and args.reference is None:
        raise ValueError("--inversion inverts a --reference image; give one or drop --inversion")
    prompts = args.prompts
    if len(prompts) < 2:
        raise ValueError("style-aligned needs the reference prompt and at least one more prompt")
    names = [f"image_{i:03d}.png" for i in range(len(prompts))] + ["batch.png",
                                                                  "style_aligned.json"]
    out = check_output_dir(args.out, names, inputs=(args.reference,))
    if args.reference is not None and not Path(args.reference).is_file():
        raise FileNotFoundError(f"no image at {args.reference}")
    model = PipelineModel.load(args.model)
    for p in prompts:
        model.check_prompt(p)
    inversion = None
    if args.reference is not None:
        from retouch.inversion import invert

        image = read_image(args.reference, model.image_size)
        inversion = invert(model, image, prompts[0], method=args.inversion or "ddim",
                           steps=args.steps,
                           cfg=args.cfg)
    images = style_aligned(model, prompts, steps=args.steps, cfg=args.cfg, seed=args.seed,
                           reference_inversion=inversion, shared_noise=args.shared_noise,
                           progress=True, **options)
    for i, im in enumerate(images):
        save_image(im, out / f"image_{i:03d}.png")
    save_image(np.concatenate(list(images), axis=1), out / "batch.png")
    report = {"prompts": prompts, "reference": args.reference,
              "inversion": (args.inversion or "ddim") if args.reference else None,
              "steps": args.steps,
              "cfg": args.cfg, "seed": args.seed, "shared_noise": args.shared_noise,
              "options": options}
    atomic_write_text(out / "style_aligned.json", json.dumps(report, indent=2) + "\n")
    print(f"wrote {len(images)} images and {out / 'batch.png'}")


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``style-aligned`` sub-command to ``subparsers`` (from ``add_subparsers``)."""
    from retouch.cli.arguments import add_run_arguments
    from retouch.inversion.api import METHODS

    p = subparsers.add_parser("style-aligned", help="a batch sharing the first image's style",
                              description=__doc__.split("\n\n")[1])
    p.add_argument("prompts", nargs="+", help="the reference prompt, then the others")
    p.add_argument("--reference", default=None, help="a real reference image")
    p.add_argument("--inversion", default=None, choices=METHODS,
                   help="with --reference (default ddim)")
    p.add_argument("--shared-noise", action="store_true", help="every image from one noise")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="SharedAttention option")
    add_run_arguments(p)
    p.set_defaults(func=run_style_aligned)
    return p
