"""Video part of ``bench consistency``: keyframe attention and noise models on ToyWorld clips.

Each clip moves one object of a random extended scene horizontally by 0.12 of the image side
(:func:`retouch.toyworld.clips.moving_clip`, it stays in its region). Every frame gets the same
prompt, which names only the shape and the position (``a circle on the left``), so the model
picks colour, size, fill style and background itself: independent frames disagree, and a
consistency method must make them agree. For each method (a keyframe scheme and a noise model,
or Text2Video-Zero's motion dynamics along the clip's motion as one global translation, as the
reference translates the whole latent, at the paper's window and a later one (:data:`DYNAMICS`);
25 DDIM steps, CFG 5, all frames in one batch):

* ``adherence``: the share of frames whose shape, position and object count read as the prompt
  says;
* ``inconsistency``: the share of frames 2..F whose identity (colour, shape, size, fill style,
  background, as the checker reads them) differs from frame 1's;
  ``changed_color`` ... ``changed_background``: the same per attribute;
* ``flicker``: the mean absolute change between consecutive frames (0..1) outside every object
  (the checker's masks of both frames and the clip's true object, dilated by 2 pixels);
* ``warp_error``: the mean absolute difference between frame ``t + 1`` and frame ``t`` moved by
  the clip's known flow (backward warp, whole pixels);
* ``motion``: how far the object moved from the first frame to the last (the checker's fitted
  centre) as a share of the clip's true displacement: 1 follows the motion, 0 is a still clip
  (the prompt names no motion, so a still clip is consistent; this says which methods carry
  the motion); clips whose first or last frame holds no readable object count as 0;
* seconds and network evaluations (NFE, counting each CFG half) per frame.
"""

from __future__ import annotations

import random
import time

import numpy as np
import torch
from scipy import ndimage

from ..recipes.video import PULL_STEPS, T2V_ZERO_DYNAMICS, dynamics_window, generate_clip
from ..samplers.state import in_window
from ..toyworld.checker import read, score
from ..toyworld.clips import Clip, moving_clip
from ..toyworld.scene import STYLES, caption, parse_caption, random_scene

__all__ = ["METHODS", "DYNAMICS", "MIN_ADHERENCE", "bench_clip", "bench_clips", "method_clip",
           "clip_frames", "clip_scores", "headline", "measure_video"]

METHODS = {  # name: (keyframe scheme, noise model or a key of DYNAMICS, Pix2Video pull weight)
    "independent": ("none", "independent", 0.0),
    "shared noise": ("none", "shared", 0.0),
    "mixed noise": ("none", "mixed", 0.0),
    "warped noise": ("none", "warped", 0.0),
    "motion dynamics": ("none", "dynamics", 0.0),
    "first": ("first", "independent", 0.0),
    "first+previous (Pix2Video)": ("first+previous", "independent", 0.0),
    "first + warped noise": ("first", "warped", 0.0),
    "first+previous + warped noise": ("first+previous", "warped", 0.0),
    "first + motion dynamics (Text2Video-Zero)": ("first", "dynamics", 0.0),
    "first + late motion dynamics": ("first", "late dynamics", 0.0),
    "first + warped noise + pull": ("first", "warped", 1.0),
    "first+previous + warped noise + pull": ("first+previous", "warped", 1.0),
}
#: The keyframe schemes, alone, with warped noise, with motion dynamics and with Pix2Video's
#: latent guidance (``pull``: each frame's clean estimate pulled towards the previous frame's
#: in the first half of the steps; weight 1 closes about the gap, chosen on 8 clips of another
#: seed among 0.3, 1 and 2 and the window to the last step); first-frame attention is
#: Text2Video-Zero's cross-frame attention. The headline takes the best of them, chosen on the
#: same clips among those whose adherence reaches :data:`MIN_ADHERENCE` (issue 16's floor).
KEYFRAME_ROWS = tuple(m for m, (k, _, _) in METHODS.items() if k != "none")
#: The motion-dynamics windows (T1, T') of the rows: the paper's, and a later one that warps
#: frame 1's latent once its object is drawn (30 % of the steps to T1, 50 % to T'). Chosen on 8
#: clips of another seed (``scripts/video_tuning.py``) as the latest window whose adherence
#: stays clear of :data:`MIN_ADHERENCE`: inconsistency 0.63 at the paper's window (adherence
#: 0.95), 0.55 at (0.1, 0.3) (0.98), 0.45 at (0.2, 0.4) (0.94), 0.34 at (0.3, 0.5) (0.89), 0.30
#: at (0.4, 0.6) (0.83), 0.25 at (0.5, 0.7) (0.80).
DYNAMICS = {"dynamics": T2V_ZERO_DYNAMICS, "late dynamics": (0.3, 0.5)}
MIN_ADHERENCE = 0.85
ONLY_SHAPE_AND_POSITION = {a: 1.0 for a in ("size", "color", "style", "background")}
OFFSET = 0.12  # of the image side, over the clip
STEPS, CFG = 25, 5.0


def bench_clip(rng: random.Random, frames: int) -> tuple[Clip, str]:
    scene = random_scene(rng, styles=STYLES, two_object_fraction=0.0, jitter=False)
    start = scene.replace(0, dx=-OFFSET / 2)
    clip = moving_clip(start, (OFFSET, 0.0), frames=frames)
    return clip, caption(clip.scenes[0], drop=ONLY_SHAPE_AND_POSITION, rng=rng).text


IDENTITY = ("color", "shape", "size", "style", "background", "count")


def _identity(reading) -> tuple:
    """The attributes of :data:`IDENTITY` as read (None where unreadable)."""
    o = reading.objects[0] if reading.objects else None
    attrs = (None,) * 4 if o is None else (o.color, o.shape, o.size, o.style)
    return (*attrs, reading.background, len(reading.objects))


def _warp(frame: np.ndarray, step_px: tuple[int, int], mask_next: np.ndarray) -> np.ndarray:
    """Frame ``t`` moved by the step inside the object's next-frame mask (backward warp)."""
    shifted = np.roll(frame, shift=(step_px[1], step_px[0]), axis=(0, 1))
    return np.where(mask_next[..., None], shifted, frame)


def clip_scores(frames: np.ndarray, clip: Clip, prompt: str) -> dict[str, float]:
    want = parse_caption(prompt)
    readings = [read(f) for f in frames]
    adhere = [all(score(r, want)[k] is not False for k in ("shape", "position", "count"))
              for r in readings]
    first = _identity(readings[0])
    inconsistent = [_identity(r) != first for r in readings[1:]]
    per_attribute = {f"changed_{a}": float(np.mean([_identity(r)[k] != first[k]
                                                     for r in readings[1:]]))
                     for k, a in enumerate(IDENTITY)}
    size = frames.shape[1]
    true = clip.moving_masks(size) >= 0.5
    step_px = tuple(int(round(s * size)) for s in clip.step)
    flicker, warp = [], []
    f = frames.astype(np.float64) / 255.0
    for t in range(len(frames) - 1):
        objects = true[t] | true[t + 1]
        for r in (readings[t], readings[t + 1]):
            for o in r.objects:
                objects |= o.mask
        outside = ~ndimage.binary_dilation(objects, iterations=2)
        flicker.append(np.abs(f[t + 1] - f[t])[outside].mean() if outside.any() else 0.0)
        warp.append(np.abs(f[t + 1] - _warp(f[t], step_px, true[t + 1])).mean())
    return {"adherence": float(np.mean(adhere)), "inconsistency": float(np.mean(inconsistent)),
            "flicker": float(np.mean(flicker)), "warp_error": float(np.mean(warp)),
            "motion": _motion(readings, clip), **per_attribute}


def _motion(readings, clip: Clip) -> float:
    """The first object's centre shift, first to last frame, along the clip's motion, as a
    share of the true shift (0 when either frame holds no object)."""
    if not (readings[0].objects and readings[-1].objects):
        return 0.0
    true = np.asarray(clip.step) * (len(readings) - 1)
    moved = np.subtract(readings[-1].objects[0].center, readings[0].objects[0].center)
    return float(moved @ true / (true @ true))


def bench_clips(clips: int, frames: int, seed: int = 0) -> list[tuple[Clip, str]]:
    """The benchmark's clips and their prompts."""
    rng = random.Random(seed)
    return [bench_clip(rng, frames) for _ in range(clips)]


def method_clip(model, method: str, clip: Clip, prompt: str, *, seed: int) -> np.ndarray:
    """The frames ``method`` (a key of :data:`METHODS`) generates for ``clip`` (module doc)."""
    keyframes, noise, pull = METHODS[method]
    if noise in DYNAMICS:
        return clip_frames(model, clip, prompt, keyframes=keyframes, dynamics=DYNAMICS[noise],
                           pull=pull, seed=seed)
    return clip_frames(model, clip, prompt, keyframes=keyframes, noise=noise, pull=pull,
                       seed=seed)


def clip_frames(model, clip: Clip, prompt: str, *, keyframes: str, noise: str = "independent",
                dynamics: tuple[float, float] | None = None, pull: float = 0.0,
                seed: int) -> np.ndarray:
    """``clip``'s frames by a keyframe scheme and a noise model along the object's flow, or
    with motion ``dynamics`` (T1, T') along the object's step applied to the whole latent (with
    independent noise); the benchmark's steps and guidance."""
    h = model.latent_shape(1)[-1]
    flows = clip.flows(h)
    if dynamics is not None:
        flows = torch.zeros_like(flows)
        flows[:, 0], flows[:, 1] = clip.step[0] * h, clip.step[1] * h
    return generate_clip(model, prompt, frames=len(clip), keyframes=keyframes, noise=noise,
                         flows=flows, steps=STEPS, cfg=CFG, seed=seed, dynamics=dynamics,
                         pull=pull)


def measure_video(model, *, clips: int, frames: int, seed: int = 0):
    """Per-method means over ``clips`` clips of ``frames`` frames, and a sample grid (rows of
    frames: the first clip under each method)."""
    cases = bench_clips(clips, frames, seed)
    tally = {m: [] for m in METHODS}
    seconds = {m: 0.0 for m in METHODS}
    grid = []
    for i, (clip, prompt) in enumerate(cases):
        for name in METHODS:
            t0 = time.perf_counter()
            out = method_clip(model, name, clip, prompt, seed=i)
            seconds[name] += time.perf_counter() - t0
            tally[name].append(clip_scores(out, clip, prompt))
            if i == 0:
                grid.append(out)
    means = {m: {k: float(np.mean([s[k] for s in v])) for k in v[0]} for m, v in tally.items()}
    for m in means:
        means[m]["seconds_per_frame"] = seconds[m] / (clips * frames)
        means[m]["nfe_per_frame"] = _nfe_per_frame(DYNAMICS.get(METHODS[m][1]), frames)
        if METHODS[m][2]:  # a backward pass through both CFG halves at each guided step
            guided = sum(in_window(i, STEPS, PULL_STEPS) for i in range(STEPS))
            means[m]["backward_per_frame"] = 2 * guided
    return means, grid, [p for _, p in cases]


def _nfe_per_frame(dynamics: tuple[float, float] | None, frames: int) -> float:
    """Network evaluations per frame, counting each CFG half: one row per frame per step; with
    motion dynamics frame 1 runs ``k0`` steps alone and every frame the last ``STEPS - k1``."""
    if dynamics is None:
        return STEPS * 2.0
    k1, k0 = dynamics_window(dynamics, STEPS)
    return 2.0 * (k0 + frames * (STEPS - k1)) / frames


def headline(means: dict) -> dict:
    base = means["independent"]
    adherent = [m for m in KEYFRAME_ROWS if means[m]["adherence"] >= MIN_ADHERENCE]
    best = min(adherent or KEYFRAME_ROWS, key=lambda m: means[m]["inconsistency"])
    ratio = (means[best]["inconsistency"] / base["inconsistency"]
             if base["inconsistency"] > 0 else None)
    flicker = (means["warped noise"]["flicker"] / base["flicker"] if base["flicker"] > 0
               else None)
    return {"video_inconsistency_ratio": ratio, "video_adherence": means[best]["adherence"],
            "warped_flicker_ratio": flicker, "video_best_keyframe_scheme": best,
            "video_inconsistency_independent": base["inconsistency"]}
