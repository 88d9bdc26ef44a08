"""The ``retouch`` command line: generate, invert, edit, attention, demo, bench and ToyWorld
training. Each sub-command's module parses its arguments and calls the library; expected errors
become one line and exit code 2 (:func:`main`)."""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
import time
from pathlib import Path

__all__ = ["main", "BENCHMARKS"]

# Benchmark name -> module with ``run(*, quick: bool, out: Path) -> dict``.
BENCHMARKS = {
    "samplers": "retouch.bench.samplers",
    "toyworld": "retouch.bench.toyworld",
    "inversion": "retouch.bench.inversion",
    "editing": "retouch.bench.editing",
    "scale": "retouch.bench.scale",
    "guidance": "retouch.bench.guidance",
    "consistency": "retouch.bench.consistency",
    "fusion": "retouch.bench.fusion",
}


def _cmd_generate(args) -> None:
    from ..recipes.generate import generate_to_file

    out = generate_to_file(
        args.prompt,
        args.out,
        model=args.model,
        steps=args.steps,
        cfg=args.cfg,
        seed=args.seed,
        sampler=args.sampler,
        n=args.n,
    )
    print(f"wrote {out}")


def _cmd_demo(args) -> None:
    from ..files import check_output_dir
    from ..report.demo import run_demo

    check_output_dir(args.out, ("index.html",))
    index = run_demo(Path(args.out), model=args.model)
    print(f"wrote {index}")


def _cmd_attention(args) -> None:
    from ..files import check_output_dir
    from ..images import read_image
    from ..models.pipeline import PipelineModel
    from ..recipes.attention_maps import OUTPUTS, attention_maps, save_attention_maps

    check_output_dir(args.out, OUTPUTS, inputs=(args.image,))
    if args.image is not None and not Path(args.image).is_file():
        raise FileNotFoundError(f"no image at {args.image}")
    model = PipelineModel.load(args.model)
    image = read_image(args.image, model.image_size) if args.image else None
    maps = attention_maps(model, args.prompt, image=image, words=args.tokens, steps=args.steps,
                          cfg=args.cfg, seed=args.seed, progress=True)
    for path in save_attention_maps(maps, Path(args.out)):
        print(f"wrote {path}")
    for seg, (word, score) in sorted(maps.segment_words.items()):
        print(f"segment {seg}: {word} ({score:.2f})")


def _cmd_ui(args) -> None:
    from ..app.ui import serve

    print(f"retouch ui: serving on http://{args.host}:{args.port} (Ctrl-C stops)")
    serve(args.model, port=args.port, host=args.host)


def _cmd_bench(args) -> None:
    if args.name not in BENCHMARKS:
        raise ValueError(
            f"unknown benchmark {args.name!r}; valid: {', '.join(sorted(BENCHMARKS))}"
        )
    from ..files import check_output_dir

    module = importlib.import_module(BENCHMARKS[args.name])
    out = check_output_dir(args.out, ())
    t0 = time.time()
    types = None if args.types is None else tuple(args.types.split(","))
    names = None if args.methods is None else tuple(args.methods.split(","))
    parts = None if args.parts is None else tuple(args.parts.split(","))
    extra = {k: v for k, v in (("model", args.model), ("cases", args.cases),
                               ("steps", args.steps), ("edit_types", types),
                               ("method_names", names), ("parts", parts),
                               ("cfg", args.cfg)) if v is not None}
    accepted = inspect.signature(module.run).parameters
    flag = {"edit_types": "types", "method_names": "methods"}
    refused = [f"--{flag.get(k, k)}" for k in extra if k not in accepted]
    if refused:
        raise ValueError(f"retouch bench {args.name} does not take {', '.join(refused)}")
    module.run(quick=args.quick, out=out, **extra)
    print(f"wrote {out / (args.name + '.json')} and {args.name}.md in {time.time() - t0:.0f} s")


def _style_weight(text: str) -> tuple[str, float]:
    """``STYLE=WEIGHT`` as a pair (style names and weights are checked by ``train``)."""
    style, _, weight = text.partition("=")
    try:
        from .arguments import number

        return style, number(weight)
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected STYLE=WEIGHT, e.g. striped=1.5") from None


def _cmd_train(args) -> None:
    from ..files import check_output_dir
    from ..training.toyworld import TrainConfig, train

    check_output_dir(args.out, ())
    cfg = TrainConfig(
        out=args.out,
        seed=args.seed,
        vae_steps=args.vae_steps,
        unet_steps=args.unet_steps,
        batch=args.batch,
        lr=args.lr,
        grounding_weight=args.grounding_weight,
        coverage_loss=args.coverage_loss,
        coverage_weight=args.coverage_weight,
        teacher_weight=args.teacher_weight,
        partial_captions=args.partial_captions,
        free_style=args.free_style,
        init_from=args.init_from,
        extended=args.extended,
        cooldown=tuple(args.cooldown) if args.cooldown else None,
        style_weights={style: w for style, w in args.style_weight} or None,
        arch=args.arch,
        unet_depth=args.unet_depth,
    )
    train(cfg, resume=args.resume)


def _cmd_tune_decoder(args) -> None:
    from ..training.decoder import DecoderConfig, tune_decoder

    cfg = DecoderConfig(run=args.run, steps=args.steps, object_weight=args.object_weight,
                        extended=args.extended, train_encoder=args.train_encoder,
                        composites=args.composites, lr=args.lr)
    best = tune_decoder(cfg, resume=args.resume)
    print(f"best decoder at step {best['step']}: " + ", ".join(
        f"{k} {v:.3f}" for k, v in best.items() if k != "step"))


def _cmd_export(args) -> None:
    from ..training.export import export_pipeline

    dest = export_pipeline(Path(args.run), Path(args.dest) if args.dest else None,
                           guidance_scale=args.guidance_scale)
    print(f"exported {args.run} to {dest}")


def build_parser() -> argparse.ArgumentParser:
    from .arguments import OneLineParser, add_model_argument, fraction, number, whole

    p = OneLineParser(prog="retouch", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="text-to-image with retouch's own sampling loop")
    g.add_argument("prompt")
    add_model_argument(g)
    g.add_argument("--steps", type=whole(1), default=25)
    g.add_argument("--cfg", type=number, default=None,
                   help="classifier-free guidance scale (default: the scale the model's "
                        "toyworld.json recommends, else 5)")
    g.add_argument("--seed", type=whole(0), default=0)
    g.add_argument("--sampler", default="ddim")
    g.add_argument("--n", type=whole(1), default=1, help="images (saved as a row)")
    g.add_argument("--out", required=True,
                   help="output image; the extension picks the format (.png, .jpg, .webp)")
    g.set_defaults(func=_cmd_generate)

    d = sub.add_parser("demo", help="the main job: an HTML gallery of what retouch does")
    d.add_argument("--out", default="demo")
    add_model_argument(d)
    d.set_defaults(func=_cmd_demo)

    a = sub.add_parser("attention", help="per-word cross-attention heatmaps and segments")
    a.add_argument("--prompt", required=True)
    a.add_argument("--image", default=None, help="read the model's attention on this image")
    a.add_argument("--tokens", nargs="*", default=None, help="words to map (default: all)")
    add_model_argument(a)
    a.add_argument("--steps", type=whole(1), default=25)
    a.add_argument("--cfg", type=number, default=5.0)
    a.add_argument("--seed", type=whole(0), default=0)
    a.add_argument("--out", required=True, help="output folder")
    a.set_defaults(func=_cmd_attention)

    u = sub.add_parser("ui", help="the web UI (Gradio): generate, invert, edit, attention")
    add_model_argument(u)
    u.add_argument("--port", type=whole(1), default=7860)
    u.add_argument("--host", default="127.0.0.1", help="address to listen on")
    u.set_defaults(func=_cmd_ui)

    b = sub.add_parser("bench", help="benchmarks: NAME.json, NAME.md and plots in --out")
    b.add_argument("name", help=f"one of: {', '.join(sorted(BENCHMARKS))}")
    b.add_argument("--quick", action="store_true", help="about a minute on 2 CPU cores")
    b.add_argument("--out", default="bench")
    add_model_argument(b, "for benchmarks that use a model")
    b.add_argument("--cases", type=whole(1), default=None,
                   help="editing: ToyBench cases (they cycle through the edit types)")
    b.add_argument("--steps", type=whole(2), default=None, help="editing: sampling steps")
    b.add_argument("--types", default=None, metavar="T1,T2",
                   help="editing: only these edit types (color, shape, size, background, "
                        "position)")
    b.add_argument("--methods", default=None, metavar="M1,M2",
                   help="editing: only these rows, by method or method/inversion "
                        "(e.g. flowedit,p2p/rf_solver,none/direct)")
    b.add_argument("--cfg", type=number, default=None,
                   help="toyworld: the guidance scale of the adherence prompts; editing: of "
                        "inversion and edit (default 5 for both)")
    b.add_argument("--parts", default=None, metavar="P1,P2",
                   help="fusion: only these parts (cost, panoramas, regions, grids); "
                   "consistency: (style, video, transfer)")
    b.set_defaults(func=_cmd_bench)

    from .edit import register as register_edit
    from .fusion import register as register_fusion
    from .guide import register as register_guide
    from .invert import register as register_invert
    from .style_aligned import register as register_style_aligned
    from .transfer import register as register_transfer
    from .video import register as register_video

    register_invert(sub)
    register_edit(sub)
    register_guide(sub)
    register_video(sub)
    register_transfer(sub)
    register_style_aligned(sub)
    register_fusion(sub)

    t = sub.add_parser("toyworld", help="train or export the ToyWorld model")
    tsub = t.add_subparsers(dest="toy_command", required=True)
    tr = tsub.add_parser("train", help="train (or --resume) a ToyWorld model")
    tr.add_argument("--out", default="runs/toy", help="run directory")
    tr.add_argument("--resume", action="store_true")
    # Defaults are TrainConfig's (a test checks); written out so `retouch --help` needs no torch.
    tr.add_argument("--seed", type=whole(0), default=0)
    tr.add_argument("--vae-steps", type=whole(0), default=1500)
    tr.add_argument("--unet-steps", type=whole(1), default=100000)
    tr.add_argument("--batch", type=whole(1), default=32)
    tr.add_argument("--lr", type=number, default=3e-4)
    tr.add_argument("--grounding-weight", type=number, default=0.1)
    tr.add_argument("--coverage-loss", choices=("bce", "kl"), default=None,
                    help="a grounding term asking each word's map to cover its region: bce "
                         "(TokenCompose's pixel loss) or kl (to the mask-uniform distribution)")
    tr.add_argument("--coverage-weight", type=number, default=0.0,
                    help="weight of --coverage-loss (needed with it)")
    tr.add_argument("--teacher-weight", type=number, default=0.0,
                    help="hold the UNet's noise prediction to the --init-from model's with this "
                         "weight (distillation, meant to keep its function while grounding "
                         "reshapes attention; 1.0 did not keep adherence: docs/toyworld.md)")
    tr.add_argument("--partial-captions", type=number, default=0.0, metavar="SHARE",
                    help="share of captions that leave out each of size, colour, position and "
                         "background (with --free-style also the style) with probability 1/2")
    tr.add_argument("--free-style", type=number, default=0.0, metavar="SHARE",
                    help="share of captions without the style word (of partial captions: 1/2), "
                         "teaching the model that a caption without one means any fill style "
                         "(default 0: the older grammar, where it means solid)")
    tr.add_argument("--init-from", default=None, metavar="DIR",
                    help="start from an exported pipeline (e.g. the shipped model) to train it on")
    tr.add_argument("--extended", action="store_true",
                    help="the extended vocabulary (top/bottom, outlined/striped); with "
                         "--init-from the VAE first learns the new renders (--vae-steps)")
    tr.add_argument("--cooldown", type=whole(0), nargs=2, default=None, metavar=("START", "END"),
                    help="UNet steps over which the learning rate decays linearly to 0; "
                         "training stops at END")
    tr.add_argument("--style-weight", action="append", default=[], type=_style_weight,
                    metavar="STYLE=WEIGHT",
                    help="sample scenes of a fill style WEIGHT times as often, e.g. "
                         "striped=1.5 (repeatable)")
    tr.add_argument("--unet-depth", type=whole(1), default=1, metavar="N",
                    help="transformer layers per UNet attention block; more than --init-from's "
                         "model has grows it, the new layers starting as identities")
    tr.add_argument("--arch", default="unet", choices=("unet", "sd3"),
                    help="the denoiser: an SD1-style UNet, or a tiny SD3 transformer trained "
                         "by rectified flow (start it from a trained model's VAE and text "
                         "encoder with --init-from)")
    tr.set_defaults(func=_cmd_train)
    td = tsub.add_parser(
        "tune-decoder",
        help="fine-tune a run's VAE decoder (encoder frozen) so colours and edges decode right",
    )
    td.add_argument("run", help="a `retouch toyworld train` run directory")
    td.add_argument("--steps", type=whole(1), default=3000)
    td.add_argument("--object-weight", type=number, default=10.0,
                    help="loss weight of object pixels relative to background pixels")
    td.add_argument("--extended", action="store_true", help="extended-vocabulary renders")
    td.add_argument("--train-encoder", action="store_true",
                    help="also train the encoder (solid-fill latents anchored to the old ones)")
    td.add_argument("--lr", type=number, default=2e-4,
                    help="peak learning rate, cosine-decayed to 0 over --steps")
    td.add_argument("--composites", type=fraction, default=0.0, metavar="SHARE",
                    help="share of each batch decoded from composite latents (one render "
                         "inside a mask, another outside), so that latent blending decodes "
                         "locally")
    td.add_argument("--resume", action="store_true")
    td.set_defaults(func=_cmd_tune_decoder)
    ex = tsub.add_parser("export", help="write a run's EMA weights as a diffusers folder")
    ex.add_argument("run")
    ex.add_argument("--dest", default=None,
                    help="default: the package's shipped model of the run's kind "
                    "(toyworld, or toyworld-flow for an sd3 run)")
    ex.add_argument("--guidance-scale", type=number, default=None, metavar="CFG",
                    help="the text-to-image guidance to recommend in toyworld.json (a --cfg "
                         "chosen from `retouch bench toyworld` runs); generate, the UI and the "
                         "demo use it")
    ex.set_defaults(func=_cmd_export)
    return p




def main(argv: list[str] | None = None) -> int:
    """Run the ``retouch`` command line; returns the exit code (0, 2 on an expected error)."""
    from ..checks import EXPECTED_ERRORS  # one line and exit 2 for these
    from .arguments import notes_to_stderr

    # transformers warns about optional image processors SD pipelines never use here.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a one-line usage error (2)
        return int(exc.code or 0)
    try:
        with notes_to_stderr():
            args.func(args)
    except EXPECTED_ERRORS as exc:
        print(f"retouch: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("retouch: interrupted", file=sys.stderr)
        return 130
    return 0


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        text = f"{exc.strerror}: {exc.filename}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
