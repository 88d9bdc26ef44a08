"""The ``retouch guide`` sub-command: move, resize or restyle objects of a real image by
self-guidance.

``retouch guide IMAGE --source P [--move WORD:DX,DY] [--resize WORD:S] [--restyle WORD:OTHER]
[--transfer WORD:DONORWORD --donor IMAGE2 --donor-prompt P2] [--keep WORD] [--target P --editor
E] [--inversion M] [--weight NAME=W] [--window A,B] [--steps N] [--cfg S] [--model DIR] --out
DIR`` inverts IMAGE under its caption P (default edit-friendly DDPM, exact: an edit that asks
for nothing gives the image back), then guides the edit's attention: WORD's object moves by DX,
DY (fractions of the image side, x right, y down), scales its side by S, or takes OTHER's look
(or, with ``--transfer``, the look of DONORWORD's object in IMAGE2, captioned P2 and inverted
the same way), while the objects named by ``--keep`` hold their shape and look (on a ToyWorld
model every other shape word of the caption is held unless ``--keep`` is given). ``--target``
(with ``--editor none``, the default, or p2p, ...) edits the caption in the same run: on
ToyWorld, whose captions name positions and sizes, give the new position or size there too --
guidance against the caption's own words barely moves anything
(``benchmarks/editing-selfguide``). Writes ``DIR/input.png``, ``DIR/edited.png``,
``DIR/source_reconstruction.png`` and ``DIR/guide.json``.

Input rules: words must be words of the source caption (donor words of the donor's), moves in
(-1, 1), factors > 0, weights finite and >= 0; all refused before the model loads. Wire-in:
``register(subparsers)``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from retouch.files import atomic_write_text, check_output_dir, save_image
from retouch.images import read_image

OUTPUTS = ("input.png", "edited.png", "source_reconstruction.png", "guide.json")

__all__ = ["register", "run_guide", "guidance_from_args"]


def _pairs(values: list[str] | None, flag: str, parse) -> dict:
    out = {}
    for item in values or []:
        word, sep, rest = item.partition(":")
        if not sep or not word or not rest:
            raise ValueError(f"{flag} wants WORD:VALUE, got {item!r}")
        if word in out:
            raise ValueError(f"{flag} names {word!r} twice; give one {flag} per word")
        out[word] = parse(rest, f"{flag} {item}")
    return out


def _window(text: str) -> tuple[float, float]:
    parts = text.split(",")
    if len(parts) != 2:
        raise ValueError(f"--window is START,END (fractions of the steps, e.g. 0,0.6), got "
                         f"{text!r}")
    return tuple(_float(p, f"--window {text}") for p in parts)


def _offset(text: str, name: str) -> tuple[float, float]:
    parts = text.split(",")
    if len(parts) != 2:
        raise ValueError(f"{name}: the move is DX,DY (fractions of the image side), got {text!r}")
    return tuple(_float(p, name) for p in parts)


def _float(text: str, name: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{name}: {text!r} is not a number") from None


def guidance_from_args(args: argparse.Namespace, toyworld: bool = False):
    """The :class:`~retouch.recipes.guide.SelfGuidance` the arguments ask for, checked against
    the source caption; without ``--keep``, on a ``toyworld`` model, every other shape word of
    the caption is held."""
    from retouch.recipes.guide import DEFAULT_STEPS, GuideWeights, SelfGuidance
    from retouch.toyworld.scene import SHAPES

    move = _pairs(args.move, "--move", _offset)
    resize = _pairs(args.resize, "--resize", _float)
    restyle = _pairs(args.restyle, "--restyle", lambda v, name: v)
    transfer = _pairs(args.transfer, "--transfer", lambda v, name: v)
    if transfer and (args.donor is None or args.donor_prompt is None):
        raise ValueError("--transfer takes looks from a donor image: give --donor IMAGE2 and "
                         "--donor-prompt (its caption)")
    if not transfer and (args.donor is not None or args.donor_prompt is not None):
        raise ValueError("--donor and --donor-prompt serve --transfer WORD:DONORWORD; give it")
    weights = {}
    for item in args.weight or []:
        key, sep, value = item.partition("=")
        if not sep or key not in GuideWeights.__dataclass_fields__:
            raise ValueError(f"--weight wants NAME=W with NAME one of "
                             f"{', '.join(GuideWeights.__dataclass_fields__)}, got {item!r}")
        weights[key] = _float(value, f"--weight {item}")
    window = DEFAULT_STEPS
    if args.window is not None:
        window = _window(args.window)
    edited = {*move, *resize, *restyle, *transfer}
    keep = args.keep
    if keep is None:  # the other objects, by their shape words (those naming one object)
        words = args.source.lower().split()
        keep = [w for w in words if toyworld and w in SHAPES and w not in edited
                and words.count(w) == 1]
    spec = SelfGuidance(move=move, resize=resize, restyle=restyle, transfer=transfer,
                        keep=keep, weights=GuideWeights(**weights), steps=window)
    spec.check_prompt(args.source)
    if transfer:
        SelfGuidance(keep=list(transfer.values())).check_prompt(args.donor_prompt)
    return spec


def run_guide(args: argparse.Namespace) -> None:
    """Handler of ``retouch guide``."""
    from retouch.models.pipeline import PipelineModel
    from retouch.recipes.editors import check_editor
    from retouch.recipes.guide import guide

    if args.target is None and args.editor != "none":
        raise ValueError(f"--editor {args.editor} edits towards a --target caption; give one")
    check_editor(args.editor, {})
    guidance_from_args(args)  # every check before the model loads
    inputs = (args.image,) if args.donor is None else (args.image, args.donor)
    out = check_output_dir(args.out, OUTPUTS, inputs=inputs)
    for path in inputs:
        if not Path(path).is_file():
            raise FileNotFoundError(f"no image at {path}")
    model = PipelineModel.load(args.model)
    spec = guidance_from_args(args, toyworld=model.vocabulary is not None)
    model.check_prompt(args.source)
    if args.target is not None:
        model.check_prompt(args.target)
    image = read_image(args.image, model.image_size)
    donor = None
    if args.donor is not None:
        model.check_prompt(args.donor_prompt)
        donor = (read_image(args.donor, model.image_size), args.donor_prompt)
    result = guide(model, image, args.source, spec, target_prompt=args.target,
                   inversion=args.inversion, editor=args.editor, steps=args.steps, cfg=args.cfg,
                   seed=args.seed, donor=donor, progress=True)
    save_image(image, out / "input.png")
    save_image(result.edited, out / "edited.png")
    save_image(result.source, out / "source_reconstruction.png")
    report = {"source": args.source, "target": args.target, "editor": args.editor,
              "inversion": args.inversion, "steps": args.steps, "cfg": args.cfg,
              "seed": args.seed, "move": spec.move, "resize": spec.resize,
              "restyle": spec.restyle, "transfer": spec.transfer, "donor": args.donor,
              "donor_prompt": args.donor_prompt, "keep": spec.keep, "weights": asdict(spec.weights),
              "window": list(spec.steps)}
    atomic_write_text(out / "guide.json", json.dumps(report, indent=2) + "\n")
    print(f"wrote {out / 'edited.png'}, {out / 'source_reconstruction.png'}")


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``guide`` sub-command to ``subparsers`` (from ``add_subparsers``)."""
    from retouch.cli.arguments import add_run_arguments
    from retouch.inversion.api import METHODS
    from retouch.recipes.editors import EDITORS

    p = subparsers.add_parser("guide", help="move, resize or restyle objects by self-guidance",
                              description=__doc__.split("\n\n")[1])
    p.add_argument("image", help="image file (PNG, JPEG, ...)")
    p.add_argument("--source", required=True, help="caption of the image")
    p.add_argument("--move", action="append", metavar="WORD:DX,DY",
                   help="move WORD's object by DX, DY (image fractions)")
    p.add_argument("--resize", action="append", metavar="WORD:S",
                   help="scale WORD's object's side by S > 0")
    p.add_argument("--restyle", action="append", metavar="WORD:OTHER",
                   help="WORD's object takes OTHER's look")
    p.add_argument("--transfer", action="append", metavar="WORD:DONORWORD",
                   help="WORD's object takes the look of DONORWORD's object in --donor")
    p.add_argument("--donor", default=None, metavar="IMAGE2",
                   help="the image --transfer takes looks from")
    p.add_argument("--donor-prompt", default=None, metavar="P2", help="the donor's caption")
    p.add_argument("--keep", action="append", metavar="WORD",
                   help="hold WORD's object (default on ToyWorld: every other shape word)")
    p.add_argument("--target", default=None, help="a caption edit to compose (with --editor)")
    p.add_argument("--editor", default="none", choices=tuple(EDITORS))
    p.add_argument("--inversion", default="ddpm_edit_friendly", choices=METHODS)
    p.add_argument("--weight", action="append", metavar="NAME=W",
                   help="energy weight: centroid, size, shape, keep, appearance")
    p.add_argument("--window", default=None, metavar="A,B",
                   help="guided steps, fractions (default 0,0.6)")
    add_run_arguments(p)
    p.set_defaults(func=run_guide)
    return p
