"""The ``retouch invert`` sub-command: invert an image, save the inversion and its reconstruction.

``retouch invert IMAGE --prompt P --method M [--steps N] [--cfg S] [--model DIR] --out DIR``
writes ``DIR/input.png`` (the image as the model sees it), ``DIR/reconstruction.png``,
``DIR/inversion.safetensors`` (tensors + JSON metadata) and ``DIR/inversion.json`` (the
metadata and the reconstruction's scores). ``--from-inversion FILE`` reconstructs a saved
inversion instead; it is refused, naming the mismatch, if it was made with another model, or
with another step count / method / prompt than ones given explicitly.

Input rules: those of :func:`retouch.images.prepare_image` (mode converted and size
adapted with a note on stderr; other aspect ratios refused). Prompt words outside a ToyWorld
model's vocabulary are refused, naming them.

Wire-in: ``register(subparsers)`` from ``retouch.cli.build_parser``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from retouch.files import atomic_write_text, check_output_dir, save_image
from retouch.images import read_image
from retouch.metrics import psnr

#: The files ``retouch invert`` writes into its --out folder.
OUTPUTS = ("input.png", "reconstruction.png", "inversion.safetensors", "inversion.json")

__all__ = ["register", "run_invert"]

def run_invert(args: argparse.Namespace) -> None:
    """Handler of ``retouch invert``."""
    import numpy as np
    import torch

    from retouch.inversion import (
        METHODS,
        fingerprint_of,
        invert,
        load_inversion,
        reconstruct,
    )
    from retouch.models.pipeline import PipelineModel

    if args.method is not None and args.method not in METHODS:
        raise ValueError(f"unknown inversion method {args.method!r}; valid: {', '.join(METHODS)}")
    if args.from_inversion is None and args.prompt is None:
        raise ValueError("--prompt is required (the caption of the image)")
    writes = [n for n in OUTPUTS if not (args.from_inversion and n.endswith(".safetensors"))]
    out = check_output_dir(args.out, writes, inputs=(args.image, args.from_inversion))
    if not Path(args.image).is_file():
        raise FileNotFoundError(f"no image at {args.image}")
    model = PipelineModel.load(args.model)
    if args.prompt is not None:
        model.check_prompt(args.prompt)
    image = read_image(args.image, model.image_size)
    if args.from_inversion is not None:
        inv = load_inversion(
            args.from_inversion,
            fingerprint=fingerprint_of(model),
            steps=args.steps,
            method=args.method,
        )
        for name, given, saved in (("prompt", args.prompt, inv.prompt), ("cfg", args.cfg, inv.cfg)):
            if given is not None and given != saved:
                raise ValueError(
                    f"refusing {args.from_inversion}: it was made with {name} {saved!r}, "
                    f"not {given!r}"
                )
        with torch.no_grad():
            given_latent = model.encode_image(image).to(inv.trajectory[-1])
        source = inv.trajectory[-1]
        if float((given_latent - source).norm() / source.norm()) > 1e-2:
            raise ValueError(f"{args.image} is not the image {args.from_inversion} was made from "
                             "(their latents differ); pass that image")
    else:
        inv = invert(
            model,
            image,
            args.prompt,
            method=args.method or "ddim",
            steps=50 if args.steps is None else args.steps,
            cfg=1.0 if args.cfg is None else args.cfg,
        )
    latent = reconstruct(inv, model)
    rec = model.decode(latent)[0]
    save_image(image, out / "input.png")
    if args.from_inversion is None:
        inv.save(out / "inversion.safetensors")
    save_image(rec, out / "reconstruction.png")
    target = np.asarray(image)
    with torch.no_grad():
        ceiling = model.decode(model.encode_image(image))[0]
    report = {
        "method": inv.method,
        "steps": inv.steps,
        "cfg": inv.cfg,
        "prompt": inv.prompt,
        "fingerprint": inv.fingerprint,
        "options": inv.options,
        "nfe_invert": inv.nfe,
        "psnr": psnr(rec, target),
        "psnr_ceiling": psnr(ceiling, target),
        "latent_rel_error": float((latent - inv.trajectory[-1]).norm() / inv.trajectory[-1].norm()),
    }
    atomic_write_text(out / "inversion.json", json.dumps(report, indent=2) + "\n")
    saved = args.from_inversion or out / "inversion.safetensors"
    print(
        f"wrote {out / 'reconstruction.png'}: PSNR {report['psnr']:.2f} dB "
        f"(VAE ceiling {report['psnr_ceiling']:.2f} dB), latent error "
        f"{report['latent_rel_error']:.2e}; inversion "
        + (f"read from {saved}" if args.from_inversion else f"in {saved}")
    )


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``invert`` sub-command to ``subparsers`` (from ``add_subparsers``)."""
    from retouch.cli.arguments import add_model_argument, number, whole
    from retouch.inversion.api import METHODS

    p = subparsers.add_parser(
        "invert",
        help="invert an image into the model's noise space and reconstruct it",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument("image", help="image file (PNG, JPEG, ...)")
    p.add_argument("--prompt", default=None, help="caption of the image (the source prompt)")
    p.add_argument("--method", default=None, help=f"one of: {', '.join(METHODS)} (default ddim)")
    p.add_argument("--steps", type=whole(1), default=None, help="sampling steps (default 50)")
    p.add_argument(
        "--cfg", type=number, default=None, help="guidance scale of the reconstruction (default 1)"
    )
    add_model_argument(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--from-inversion",
        default=None,
        metavar="FILE",
        help="reconstruct this saved inversion instead of inverting",
    )
    p.set_defaults(func=run_invert)
    return p
