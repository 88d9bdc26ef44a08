"""The ``retouch panorama`` and ``retouch regions`` sub-commands (fusing diffusion paths).

``retouch panorama PROMPT --width W [--height H] [--stride S] [--sync [--sync-weight W]
[--sync-steps N] [--distance D]] [--share-anchor] --out DIR`` generates a W x H image by
MultiDiffusion windows of the model's native size every S latent pixels (default a quarter
window), with SyncDiffusion's
gradient step toward the middle window with ``--sync``, and with every window also attending to
the middle window's self-attention with ``--share-anchor``. Writes ``DIR/panorama.png`` and
``DIR/panorama.json``.

``retouch regions LAYOUT.json [--method multidiffusion|regional] [--bootstrap F]
[--coverage-power P] --out DIR`` generates a region layout (see :mod:`retouch.fusion.layout` for
the file) by MultiDiffusion's region masks (each region's windows weighted by the share of the
window the region fills, to the power P) or by regional prompting in the cross-attention.
Writes ``DIR/regions.png`` and ``DIR/regions.json``. Wire-in: ``register(subparsers)``.
"""

from __future__ import annotations

import argparse
import json

from retouch.files import atomic_write_text, check_output_dir, save_image

__all__ = ["register", "run_panorama", "run_regions"]


def _settings(args, keys) -> dict:
    return {k: getattr(args, k) for k in keys}


def run_panorama(args: argparse.Namespace) -> None:
    """Handler of ``retouch panorama``."""
    from retouch.models.pipeline import PipelineModel
    from retouch.recipes.fusion import canvas_latent_hw, panorama, sync_diffusion

    if not args.sync and (args.sync_weight is not None or args.sync_steps is not None
                          or args.distance is not None):
        raise ValueError("--sync-weight, --sync-steps and --distance set SyncDiffusion: add "
                         "--sync")
    out = check_output_dir(args.out, ("panorama.png", "panorama.json"))
    model = PipelineModel.load(args.model)
    model.check_prompt(args.prompt)
    height = args.height or model.image_size
    canvas_latent_hw(model, args.width, height)  # refuses a bad canvas before any work
    sync = None
    if args.sync:
        options = {k: v for k, v in (("weight", args.sync_weight), ("steps", args.sync_steps))
                   if v is not None}
        sync = sync_diffusion(model, distance=args.distance or "colour", **options)
    image = panorama(model, args.prompt, width=args.width, height=height, stride=args.stride,
                     sync=sync, share_anchor=args.share_anchor, steps=args.steps,
                     cfg=args.cfg, seed=args.seed, sampler=args.sampler, progress=True)
    save_image(image, out / "panorama.png")
    report = _settings(args, ("prompt", "width", "stride", "sync", "share_anchor", "steps",
                              "cfg", "seed", "sampler")) | {"height": height}
    if sync is not None:
        report |= {"sync_weight": sync.weight, "sync_steps": sync.steps,
                   "distance": args.distance or "colour", "sync_losses": sync.losses}
    atomic_write_text(out / "panorama.json", json.dumps(report, indent=2) + "\n")
    print(f"wrote {out / 'panorama.png'}")


def run_regions(args: argparse.Namespace) -> None:
    """Handler of ``retouch regions``."""
    from retouch.checks import finite
    from retouch.fusion import RegionLayout
    from retouch.models.pipeline import PipelineModel
    from retouch.recipes.fusion import canvas_latent_hw, regions

    layout = RegionLayout.read(args.layout)
    if args.method == "regional" and layout.base is None:
        raise ValueError(f"regional prompting needs a 'base' prompt in {args.layout}")
    finite("--coverage-power", args.coverage_power, low=0)
    out = check_output_dir(args.out, ("regions.png", "regions.json"), inputs=(args.layout,))
    model = PipelineModel.load(args.model)
    for p in layout.prompts + [q for q in (layout.background, layout.base) if q]:
        model.check_prompt(p)
    layout.masks(canvas_latent_hw(model, layout.width, layout.height))
    image = regions(model, layout, method=args.method, stride=args.stride,
                    bootstrap=args.bootstrap, coverage_power=args.coverage_power,
                    steps=args.steps, cfg=args.cfg, seed=args.seed,
                    sampler=args.sampler, progress=True)
    save_image(image, out / "regions.png")
    report = _settings(args, ("layout", "method", "stride", "bootstrap", "coverage_power",
                              "steps", "cfg", "seed", "sampler"))
    atomic_write_text(out / "regions.json", json.dumps(report, indent=2) + "\n")
    print(f"wrote {out / 'regions.png'}")


def register(subparsers) -> None:
    """Add the ``panorama`` and ``regions`` sub-commands to ``subparsers``."""
    from retouch.cli.arguments import add_run_arguments, fraction, number, whole
    from retouch.recipes.fusion import DISTANCES
    from retouch.samplers import SAMPLERS

    doc = __doc__.split("\n\n")
    p = subparsers.add_parser("panorama", help="a wide image by MultiDiffusion (SyncDiffusion)",
                              description=doc[1])
    p.add_argument("prompt")
    p.add_argument("--width", type=whole(1), required=True, help="canvas width in pixels")
    p.add_argument("--height", type=whole(1), default=None,
                   help="canvas height in pixels (default: the model's size)")
    p.add_argument("--stride", type=whole(1), default=None,
                   help="window stride in latent pixels (default: a quarter window)")
    p.add_argument("--sync", action="store_true", help="SyncDiffusion toward the middle window")
    p.add_argument("--sync-weight", type=number, default=None,
                   help="gradient step weight (default: 2 for vae, vae-stats and colour, "
                        "20 for lpips)")
    p.add_argument("--sync-steps", type=whole(0), default=None,
                   help="synchronise the first N steps")
    p.add_argument("--distance", choices=tuple(DISTANCES), default=None,
                   help="SyncDiffusion's distance (default colour: the decoded images' colour "
                        "statistics; vae and colour need no download, lpips needs weights "
                        "on disk)")
    p.add_argument("--share-anchor", action="store_true",
                   help="every window also attends to the middle window (shared attention)")
    p.add_argument("--sampler", choices=tuple(SAMPLERS), default="ddim")
    add_run_arguments(p)
    p.set_defaults(func=run_panorama)

    r = subparsers.add_parser("regions", help="a region layout by MultiDiffusion or regional "
                              "prompting", description=doc[2])
    r.add_argument("layout", help="layout JSON file")
    r.add_argument("--method", choices=("multidiffusion", "regional"), default="multidiffusion")
    r.add_argument("--stride", type=whole(1), default=None,
                   help="window stride in latent pixels (default: a quarter window for "
                        "multidiffusion, one window for regional)")
    r.add_argument("--bootstrap", type=fraction, default=0.4,
                   help="multidiffusion: share of early steps bootstrapped")
    r.add_argument("--coverage-power", type=number, default=2.0,
                   help="multidiffusion: a region's windows weigh (share of the window it "
                        "fills) ** P; 0 is the paper's plain masks (default 2)")
    r.add_argument("--sampler", choices=tuple(SAMPLERS), default="ddim")
    add_run_arguments(r)
    r.set_defaults(func=run_regions)
