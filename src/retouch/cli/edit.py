"""The ``retouch edit`` sub-command: edit a real image by changing its caption.

``retouch edit IMAGE --source P --target P [--inversion M] [--editor E] [--steps N] [--cfg S]
[--model DIR] --out DIR`` inverts IMAGE under the source caption P (``--inversion``, default
direct) and edits it towards the target caption with ``--editor`` (p2p, masactrl, pnp,
rf_solver, none; default p2p), or edits without inverting: the SDEdit baseline (``--editor
sdedit --strength S``) or FlowEdit (``--editor flowedit --strength S``). Writes
``DIR/input.png`` (the image as the model sees it), ``DIR/edited.png``,
``DIR/source_reconstruction.png`` (the source branch: the inversion's reconstruction; for
SDEdit and FlowEdit the VAE round trip), the attention masks the edit used --
``DIR/mask_local_blend.png`` (Prompt-to-Prompt local blending, white = may change) and
``DIR/attention.png`` (the edited words' cross-attention in the source and target branches)
-- and ``DIR/edit.json``.

``--blend changed`` turns on local blending on the words that differ between the captions
(``--blend SRC:TGT`` names them; ``--blend-space pixels`` blends the decoded images);
``--option KEY=VALUE`` passes any editor option (values are read as JSON when they parse, e.g.
``--option cross_steps=0.6``); FlowEdit takes
``final_steps`` (the paper's n_min), ``averages`` (n_avg) and ``source_cfg``, SDEdit none.
Combinations that cannot run (local blending with EDICT) are refused before any work, naming
the valid ones.

Input rules: those of :func:`retouch.images.prepare_image`. Wire-in: ``register(subparsers)``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from retouch.files import atomic_write_text, check_output_dir, save_image
from retouch.images import read_image

#: The files ``retouch edit`` may write into its --out folder.
OUTPUTS = ("input.png", "edited.png", "source_reconstruction.png", "mask_local_blend.png",
           "attention.png", "edit.json")

#: Editors that edit the image without inverting it, with their default ``--strength``.
DIRECT_EDITORS = {"sdedit": 0.6, "flowedit": 0.85}
#: The ``--option`` keys each of them takes (FlowEdit: ``n_min``, ``n_avg``, source guidance).
DIRECT_OPTIONS = {"sdedit": (), "flowedit": ("final_steps", "averages", "source_cfg")}

__all__ = ["register", "run_edit", "parse_options", "DIRECT_EDITORS", "DIRECT_OPTIONS"]


def parse_options(pairs: list[str] | None) -> dict:
    """``["k=v", ...]`` as a dict; each value read as JSON if it parses, else kept a string."""
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option wants KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _blend(arg: str | None, space: str | None = None) -> dict:
    if arg is None:
        if space is not None:
            raise ValueError(f"--blend-space {space} is where local blending blends; turn it "
                             "on with --blend changed (or --blend SRC:TGT)")
        return {}
    where = {} if space is None else {"blend_space": space}
    if arg == "changed":
        return {"blend_words": "changed", **where}
    src, sep, tgt = arg.partition(":")
    if not sep or not src or not tgt:
        raise ValueError(f"--blend is 'changed' or SRC:TGT (words, comma-separated), got {arg!r}")
    return {"blend_words": (src.split(","), tgt.split(",")), **where}


def _save_masks(result, model, source: str, target: str, out: Path) -> list[Path]:
    from retouch.attention import token_heatmaps
    from retouch.attention.maps import save_heatmaps
    from retouch.attention.tokens import segments, token_ids
    from retouch.recipes.editors import changed_tokens

    paths = []
    size = result.edited.shape[:2]
    if "local_blend" in result.masks:
        mask = (result.masks["local_blend"] > 0).astype(np.uint8) * 255
        big = Image.fromarray(mask).resize(size[::-1], Image.Resampling.NEAREST)
        paths.append(save_image(big, out / "mask_local_blend.png"))
    # The changed words' positions in the first text segment (SD3: CLIP's; Flux: T5's), named
    # by that segment's tokenizer.
    tok, _, length = segments(model.text_tokens)[0]
    src_pos, tgt_pos = ([p for p in ps if p < length]
                        for ps in changed_tokens(model.text_tokens, source, target))
    if result.store is not None and result.store.counts.get("cross") and (src_pos or tgt_pos):
        cross = result.store.cross()  # (2, S, S, T): rows [source, target]
        heat = {}
        for row, prompt, positions, tag in ((0, source, src_pos, "source"),
                                            (1, target, tgt_pos, "target")):
            ids = token_ids(tok, prompt)
            for p in positions:
                word = tok.decode([ids[p]]).strip()
                heat.update(token_heatmaps(cross[row], {f"{tag}: {word}": [p]}))
        paths.append(save_heatmaps(out / "attention.png", heat, image=result.edited))
    return paths


def run_edit(args: argparse.Namespace) -> None:
    """Handler of ``retouch edit``."""
    from retouch.models.pipeline import PipelineModel
    from retouch.recipes.edit import edit, sdedit
    from retouch.recipes.editors import check_editor
    from retouch.recipes.flowedit import flowedit

    options = parse_options(args.option)
    direct = args.editor in DIRECT_EDITORS  # edits the image without inverting it
    if direct:
        if args.inversion is not None or args.blend is not None:
            raise ValueError(f"--editor {args.editor} inverts nothing and blends nothing: drop "
                             "--inversion and --blend (use --strength)")
        unknown = sorted(set(options) - set(DIRECT_OPTIONS[args.editor]))
        if unknown:
            allowed = ", ".join(DIRECT_OPTIONS[args.editor]) or "none"
            raise ValueError(f"--option {', '.join(unknown)}: --editor {args.editor} takes "
                             f"these options: {allowed}")
    elif args.strength is not None:
        raise ValueError("--strength is SDEdit's and FlowEdit's; use it with --editor sdedit "
                         "or --editor flowedit")
    if args.blend is not None and args.editor != "p2p":
        raise ValueError("--blend is Prompt-to-Prompt's local blending; use it with --editor p2p")
    if not direct:
        check_editor(args.editor, {**_blend(args.blend, args.blend_space), **options})
    out = check_output_dir(args.out, OUTPUTS, inputs=(args.image,))
    if not Path(args.image).is_file():
        raise FileNotFoundError(f"no image at {args.image}")
    model = PipelineModel.load(args.model)
    model.check_prompt(args.source)
    model.check_prompt(args.target)
    image = read_image(args.image, model.image_size)
    common = dict(steps=args.steps, cfg=args.cfg, seed=args.seed, progress=True)
    strength = DIRECT_EDITORS.get(args.editor) if args.strength is None else args.strength
    if args.editor == "sdedit":
        result = sdedit(model, image, args.target, strength=strength, **common)
    elif args.editor == "flowedit":
        result = flowedit(model, image, args.source, args.target, strength=strength, **common,
                          **options)
    else:
        result = edit(model, image, args.source, args.target, editor=args.editor,
                      inversion=args.inversion or "direct", maps=True, **common,
                      **{**_blend(args.blend, args.blend_space), **options})
    save_image(image, out / "input.png")
    save_image(result.edited, out / "edited.png")
    save_image(result.source, out / "source_reconstruction.png")
    masks = _save_masks(result, model, args.source, args.target, out)
    report = {"source": args.source, "target": args.target, "editor": args.editor,
              "inversion": None if direct else args.inversion or "direct",
              "steps": args.steps, "cfg": args.cfg, "seed": args.seed,
              "strength": strength,
              "options": {**_blend(args.blend), **options}, "masks": [p.name for p in masks]}
    atomic_write_text(out / "edit.json", json.dumps(report, indent=2) + "\n")
    print(f"wrote {out / 'edited.png'}, {out / 'source_reconstruction.png'}"
          + "".join(f", {p}" for p in masks))


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``edit`` sub-command to ``subparsers`` (from ``add_subparsers``)."""
    from retouch.attention.blend import SPACES
    from retouch.cli.arguments import add_model_argument, fraction, number, whole
    from retouch.inversion.api import METHODS
    from retouch.recipes.editors import EDITORS

    p = subparsers.add_parser("edit", help="edit a real image by changing its caption",
                              description=__doc__.split("\n\n")[1])
    p.add_argument("image", help="image file (PNG, JPEG, ...)")
    p.add_argument("--source", required=True, help="caption of the image (source prompt)")
    p.add_argument("--target", required=True, help="caption of the edited image")
    p.add_argument("--inversion", default=None, choices=METHODS, help="default direct")
    p.add_argument("--editor", default="p2p", choices=(*EDITORS, *DIRECT_EDITORS))
    p.add_argument("--steps", type=whole(1), default=25)
    p.add_argument("--cfg", type=number, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=whole(0), default=0,
                   help="SDEdit / FlowEdit / edit-friendly noise seed")
    p.add_argument("--strength", type=fraction, default=None,
                   help="SDEdit / FlowEdit strength in [0, 1] (default 0.6 / 0.85)")
    p.add_argument("--blend", default=None, metavar="changed|SRC:TGT",
                   help="P2P local blending on these words")
    p.add_argument("--blend-space", default=None, choices=SPACES,
                   help="where --blend blends: latents, each step (the paper; default), or "
                        "pixels, once after decoding (the rows sample unblended; for a VAE "
                        "that is not local, as ToyWorld's: benchmarks/editing-p2p-tuning.md)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="editor option (FlowEdit: final_steps, averages, source_cfg)")
    add_model_argument(p)
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=run_edit)
    return p
