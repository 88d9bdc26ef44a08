"""Choose Text2Video-Zero's motion-dynamics window on ToyWorld clips (issue 16), on clips the
consistency benchmark does not use (``bench.video.bench_clips`` with seed 1; the benchmark's
are seed 0).

    python scripts/video_tuning.py CLIPS CONFIG...

A CONFIG is ``KEYFRAMES:T1:T'`` (a keyframe scheme of ``recipes.video.KEYFRAMES`` and the
motion-dynamics window as fractions of the steps, ``recipes.video.dynamics_window``; the
paper's is 0.04:0.1) or ``KEYFRAMES:warped`` (warped noise, no dynamics). Each clip is run as
``bench.video.method_clip`` runs it (25 DDIM steps, CFG 5, 8 frames, the motion as one global
translation for dynamics) and scored by ``bench.video.clip_scores``; prints the means of
adherence, inconsistency, motion and flicker, and seconds per frame.
"""

import sys
import time

import numpy as np
import torch

from retouch.bench.video import CFG, STEPS, bench_clips, clip_scores
from retouch.models.pipeline import PipelineModel
from retouch.recipes.video import generate_clip


def run(model, config: str, clip, prompt: str, seed: int) -> np.ndarray:
    keyframes, *window = config.split(":")
    h = model.latent_shape(1)[-1]
    flows = clip.flows(h)
    if window == ["warped"]:
        return generate_clip(model, prompt, frames=len(clip), keyframes=keyframes,
                             noise="warped", flows=flows, steps=STEPS, cfg=CFG, seed=seed)
    flows = torch.zeros_like(flows)
    flows[:, 0], flows[:, 1] = clip.step[0] * h, clip.step[1] * h
    return generate_clip(model, prompt, frames=len(clip), keyframes=keyframes,
                         noise="independent", flows=flows, steps=STEPS, cfg=CFG, seed=seed,
                         dynamics=tuple(float(v) for v in window))


def main(clips: int, configs: list[str]) -> None:
    model = PipelineModel.load(None)
    cases = bench_clips(clips, 8, seed=1)
    for config in configs:
        rows, t0 = [], time.time()
        for i, (clip, prompt) in enumerate(cases):
            rows.append(clip_scores(run(model, config, clip, prompt, i), clip, prompt))
        keys = ("adherence", "inconsistency", "motion", "flicker", "changed_size",
                "changed_color")
        means = {k: round(float(np.mean([r[k] for r in rows])), 3) for k in keys}
        print(config, means, f"{(time.time() - t0) / (clips * 8):.1f} s per frame", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2:])
