"""The ``retouch transfer`` sub-command: the structure of one image in the look of another.

``retouch transfer STRUCTURE APPEARANCE --structure-prompt P --appearance-prompt P
[--prompt P] [--inversion M] [--contrast C] [--swap-guidance S] [--inversion-cfg G]
[--structure-every K] --out DIR`` inverts both images and generates the structure image's layout
with the appearance image's look through cross-image attention (Alaluf et al. 2024).
``--prompt`` is the output's caption (default: the structure's). ``bench consistency`` found, on
ToyWorld, ``--cfg 1 --inversion-cfg 5 --swap-guidance 6 --structure-every 0`` best.
Writes ``DIR/output.png``, ``DIR/structure.png`` and ``DIR/appearance.png`` (the inputs as the
model reconstructs them) and ``DIR/transfer.json``. Wire-in: ``register(subparsers)``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from retouch.files import atomic_write_text, check_output_dir, save_image

__all__ = ["register", "run_transfer"]

OUTPUTS = ("output.png", "structure.png", "appearance.png", "transfer.json")


def run_transfer(args: argparse.Namespace) -> None:
    """Handler of ``retouch transfer``."""
    from retouch.attention.cross_image import CrossImageAttention
    from retouch.images import read_image
    from retouch.models.pipeline import PipelineModel
    from retouch.recipes.transfer import appearance_transfer

    # refuses a bad contrast or structure period before the model loads
    CrossImageAttention(contrast=args.contrast, structure_every=args.structure_every)
    if args.swap_guidance < 1:
        raise ValueError(f"--swap-guidance must be at least 1 (1: off), got {args.swap_guidance}")
    out = check_output_dir(args.out, OUTPUTS, inputs=(args.structure, args.appearance))
    for path in (args.structure, args.appearance):
        if not Path(path).is_file():
            raise FileNotFoundError(f"no image at {path}")
    model = PipelineModel.load(args.model)
    for p in (args.structure_prompt, args.appearance_prompt, args.prompt):
        if p is not None:
            model.check_prompt(p)
    structure = np.asarray(read_image(args.structure, model.image_size))
    appearance = np.asarray(read_image(args.appearance, model.image_size))
    result = appearance_transfer(
        model, structure, appearance, structure_prompt=args.structure_prompt,
        appearance_prompt=args.appearance_prompt, output_prompt=args.prompt,
        inversion=args.inversion, steps=args.steps, cfg=args.cfg,
        inversion_cfg=args.inversion_cfg, contrast=args.contrast,
        swap_guidance=args.swap_guidance, structure_every=args.structure_every, progress=True)
    save_image(result.output, out / "output.png")
    save_image(result.structure, out / "structure.png")
    save_image(result.appearance, out / "appearance.png")
    report = {k: getattr(args, k) for k in ("structure", "appearance", "structure_prompt",
                                            "appearance_prompt", "prompt", "inversion", "steps",
                                            "cfg", "inversion_cfg", "contrast",
                                            "swap_guidance", "structure_every")}
    atomic_write_text(out / "transfer.json", json.dumps(report, indent=2) + "\n")
    print(f"wrote {out / 'output.png'}")


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``transfer`` sub-command to ``subparsers`` (from ``add_subparsers``)."""
    from retouch.cli.arguments import add_run_arguments, number, whole
    from retouch.inversion.api import METHODS

    p = subparsers.add_parser("transfer", help="appearance transfer by cross-image attention",
                              description=__doc__.split("\n\n")[1])
    p.add_argument("structure", help="image whose layout the output keeps")
    p.add_argument("appearance", help="image whose look the output takes")
    p.add_argument("--structure-prompt", required=True, help="caption of the structure image")
    p.add_argument("--appearance-prompt", required=True, help="caption of the appearance image")
    p.add_argument("--prompt", default=None, help="caption of the output (default: structure's)")
    p.add_argument("--inversion", default="ddpm_edit_friendly", choices=METHODS,
                   help="inversion of both images (default: ddpm_edit_friendly, the output on "
                        "the structure's noise maps; the best in bench consistency)")
    p.add_argument("--contrast", type=number, default=1.67, help="attention contrast")
    p.add_argument("--swap-guidance", type=number, default=3.5, help="1 turns it off")
    p.add_argument("--inversion-cfg", type=number, default=None,
                   help="guidance of both inversions (default: --cfg; the reference inverts at "
                        "3.5 and samples the output at --cfg 1)")
    p.add_argument("--structure-every", type=whole(0), default=None,
                   help="steps between injections of the structure's keys and values (0: never; "
                        "default: every N/20-th of N steps in the first 40%%, as the reference)")
    add_run_arguments(p, seed=False)
    p.set_defaults(func=run_transfer)
    return p
