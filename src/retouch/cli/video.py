"""The ``retouch video`` sub-command: a clip from an image model, or an edit of a real clip.

``retouch video PROMPT --frames N [--keyframes first|first+previous|previous|none] [--noise
independent|shared|mixed|warped] [--mix A] [--motion DX,DY [--dynamics]] --out DIR`` generates N
frames whose self-attention reads the keyframes (Text2Video-Zero: first; Pix2Video:
first+previous). With ``--noise warped`` the start noise moves along ``--motion`` (a global
translation of DX, DY latent pixels per frame, carried as Chang et al.'s warped noise); with
``--dynamics`` the first frame's partly denoised latent moves along it instead (Text2Video-Zero's
motion dynamics; ``--dynamics-window T1,T'`` as fractions of the steps, default the paper's
0.04,0.1; on ToyWorld 0.3,0.5 keeps the object's look and motion best, ``docs/benchmarks.md``).
``--pull W`` adds Pix2Video's latent guidance (each frame's clean estimate
pulled towards the previous frame's in the first half of the steps; 1 closes about the whole
gap per step). ``--input FRAME.png ...`` edits a
real clip instead: every frame is inverted under PROMPT (``--inversion``, default ddim) and
edited towards ``--target`` with ``--editor`` (default p2p: the source's attention maps fused
into the edit, close to FateZero) and keyframe attention among the edited frames.

Writes ``DIR/frame_000.png``... and ``DIR/clip.gif`` (with ``--input`` also
``DIR/source_000.png``..., the reconstructions), and ``DIR/video.json``. Wire-in:
``register(subparsers)``.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import torch

from retouch.files import atomic_write_bytes, atomic_write_text, check_output_dir, save_image

__all__ = ["register", "run_video", "save_gif"]

MAX_FRAMES = 64  # one clip; more frames are refused (split the clip)


def save_gif(frames: np.ndarray, path: Path, fps: float = 6.0) -> Path:
    """An animated GIF of uint8 (F, H, W, 3) frames, looping, written atomically."""
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:],
                   duration=int(1000 / fps), loop=0)
    return atomic_write_bytes(path, buf.getvalue())


def _motion(arg: str | None) -> tuple[float, float] | None:
    if arg is None:
        return None
    try:
        dx, dy = (float(v) for v in arg.split(","))
    except ValueError:
        raise ValueError(f"--motion wants DX,DY (latent pixels per frame), got {arg!r}") from None
    if not all(np.isfinite((dx, dy))):
        raise ValueError(f"--motion must be finite, got {arg!r}")
    return dx, dy


def _window(arg: str | None, dynamics: bool, steps: int) -> tuple[float, float]:
    """The motion-dynamics window (checked against ``steps``; the paper's when not given)."""
    from retouch.recipes.video import T2V_ZERO_DYNAMICS, dynamics_window

    if arg is None:
        return T2V_ZERO_DYNAMICS
    if not dynamics:
        raise ValueError("--dynamics-window sets --dynamics' window; add --dynamics or drop it")
    try:
        window = tuple(float(v) for v in arg.split(","))
    except ValueError:
        window = ()
    if len(window) != 2:
        raise ValueError(f"--dynamics-window wants T1,T' (fractions of the steps, e.g. 0.3,0.5), "
                         f"got {arg!r}")
    dynamics_window(window, steps)  # refuses windows outside 0 < T1 < T' < 1
    return window


def _global_flows(frames: int, hw: tuple[int, int], motion: tuple[float, float]) -> torch.Tensor:
    flows = torch.zeros(frames - 1, 2, *hw)
    flows[:, 0], flows[:, 1] = motion
    return flows


def run_video(args: argparse.Namespace) -> None:
    """Handler of ``retouch video``."""
    from retouch.images import read_image
    from retouch.models.pipeline import PipelineModel
    from retouch.recipes.video import edit_clip, generate_clip

    motion = _motion(args.motion)
    window = _window(args.dynamics_window, args.dynamics, args.steps)
    editing = bool(args.input)
    if editing and (args.noise != "independent" or motion is not None or args.frames):
        raise ValueError("--input edits the given frames from their inversions: drop --frames, "
                         "--noise and --motion")
    if not editing and args.target is not None:
        raise ValueError("--target is the edited caption of an --input clip; give --input "
                         "FRAME.png ... or drop --target")
    if editing and args.target is None:
        raise ValueError("--input needs --target (the caption the edited clip should have)")
    if args.noise == "warped" and motion is None:
        raise ValueError("--noise warped carries the noise along --motion DX,DY; give it")
    if args.dynamics and (motion is None or args.noise != "independent"):
        raise ValueError("--dynamics moves the first frame's latent along --motion DX,DY: give "
                         "--motion, and no --noise (each later frame starts from frame 1)")
    if motion is not None and args.noise != "warped" and not args.dynamics:
        raise ValueError("--motion moves warped noise or, with --dynamics, the first frame's "
                         "latent; use it with --noise warped or --dynamics")
    if args.mix is not None and args.noise != "mixed":
        raise ValueError("--mix weighs mixed noise; use it with --noise mixed")
    if args.mix is not None and not (np.isfinite(args.mix) and args.mix >= 0):
        raise ValueError(f"--mix must be a finite number >= 0, got {args.mix}")
    if args.pull is not None and (editing or not (np.isfinite(args.pull) and args.pull >= 0)):
        raise ValueError(f"--pull must be a finite number >= 0 (1 closes about the whole gap to "
                         f"the previous frame per step) for a generated clip, got {args.pull}"
                         + (" with --input" if editing else ""))
    if editing and args.chunk is not None:
        raise ValueError("--chunk splits generated clips; an --input edit runs in one call")
    if args.chunk is not None and args.keyframes not in ("none", "first"):
        raise ValueError(f"--keyframes {args.keyframes} chains frames and cannot run in chunks; "
                         f"use --keyframes first or drop --chunk")
    frames = len(args.input) if editing else (args.frames or 8)
    if frames > MAX_FRAMES:
        raise ValueError(f"{frames} frames in one clip; at most {MAX_FRAMES}: split the clip")
    names = [f"frame_{i:03d}.png" for i in range(frames)] + ["clip.gif", "video.json"]
    names += [f"source_{i:03d}.png" for i in range(frames)] if editing else []
    out = check_output_dir(args.out, names, inputs=args.input or ())
    for path in args.input or ():
        if not Path(path).is_file():
            raise FileNotFoundError(f"no image at {path}")
    model = PipelineModel.load(args.model)
    model.check_prompt(args.prompt)
    common = dict(keyframes=args.keyframes, steps=args.steps, cfg=args.cfg, progress=True)
    if editing:
        model.check_prompt(args.target)
        images = [np.asarray(read_image(p, model.image_size)) for p in args.input]
        result = edit_clip(model, images, args.prompt, args.target, inversion=args.inversion,
                           editor=args.editor, **common)
        clip = result.edited
        for i, f in enumerate(result.source):
            save_image(f, out / f"source_{i:03d}.png")
    else:
        h, w = model.latent_shape(1)[-2:]
        flows = _global_flows(frames, (h, w), motion) if motion is not None else None
        mix = 1.0 if args.mix is None else args.mix
        clip = generate_clip(model, args.prompt, frames=frames, noise=args.noise, mix=mix,
                             flows=flows, seed=args.seed, chunk=args.chunk,
                             dynamics=window if args.dynamics else None,
                             pull=args.pull or 0.0, **common)
    for i, f in enumerate(clip):
        save_image(f, out / f"frame_{i:03d}.png")
    save_gif(clip, out / "clip.gif")
    report = {"prompt": args.prompt, "target": args.target, "frames": frames,
              "keyframes": args.keyframes, "noise": None if editing else args.noise,
              "mix": args.mix, "motion": motion,
              "dynamics": list(window) if args.dynamics else None, "pull": args.pull,
              "inversion": args.inversion if editing else None,
              "editor": args.editor if editing else None, "steps": args.steps, "cfg": args.cfg,
              "seed": args.seed}
    atomic_write_text(out / "video.json", json.dumps(report, indent=2) + "\n")
    print(f"wrote {frames} frames and {out / 'clip.gif'}")


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``video`` sub-command to ``subparsers`` (from ``add_subparsers``)."""
    from retouch.cli.arguments import add_run_arguments, number, whole
    from retouch.inversion.api import METHODS
    from retouch.noise import NOISE_MODELS
    from retouch.recipes.editors import EDITORS
    from retouch.recipes.video import KEYFRAMES

    p = subparsers.add_parser("video", help="a clip with keyframe attention, or a clip edit",
                              description=__doc__.split("\n\n")[1])
    p.add_argument("prompt", help="the clip's caption (with --input: the frames' caption)")
    p.add_argument("--frames", type=whole(2), default=None, help="frames to generate (8)")
    p.add_argument("--keyframes", default="first", choices=KEYFRAMES)
    p.add_argument("--noise", default="independent", choices=NOISE_MODELS)
    p.add_argument("--mix", type=number, default=None,
                   help="mixed noise weight (Ge et al.; default 1)")
    p.add_argument("--motion", default=None, metavar="DX,DY",
                   help="latent pixels per frame, for --noise warped or --dynamics")
    p.add_argument("--dynamics", action="store_true",
                   help="Text2Video-Zero's motion dynamics along --motion")
    p.add_argument("--dynamics-window", default=None, metavar="T1,T'",
                   help="with --dynamics: where frame 1's latent is warped (T') and every "
                        "frame restarts (T1), as fractions of the steps (default 0.04,0.1)")
    p.add_argument("--pull", type=number, default=None,
                   help="Pix2Video's latent guidance weight (e.g. 1; default off)")
    p.add_argument("--chunk", type=whole(2), default=None, help="frames per model call")
    p.add_argument("--input", nargs="+", default=None, metavar="FRAME", help="edit these frames")
    p.add_argument("--target", default=None, help="with --input: the edited caption")
    p.add_argument("--inversion", default="ddim", choices=METHODS)
    p.add_argument("--editor", default="p2p", choices=tuple(EDITORS))
    add_run_arguments(p)
    p.set_defaults(func=run_video)
    return p
