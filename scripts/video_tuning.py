"""Choose Text2Video-Zero's motion-dynamics window on ToyWorld clips (issue 16), on clips the
consistency benchmark does not use (``bench.video.bench_clips`` with seed 1; the benchmark's
are seed 0).

    python scripts/video_tuning.py CLIPS CONFIG...

A CONFIG is ``KEYFRAMES:T1:T'`` (a keyframe scheme of ``recipes.video.KEYFRAMES`` and the
motion-dynamics window as fractions of the steps, ``recipes.video.dynamics_window``; the
paper's is 0.04:0.1) or ``KEYFRAMES:warped`` (warped noise, no dynamics). Each clip is run as
``bench.video.method_clip`` runs it (``bench.video.clip_frames``: 25 DDIM steps, CFG 5, 8
frames, the motion as one global translation for dynamics) and scored by
``bench.video.clip_scores``; prints the means of :data:`SHOWN` and seconds per frame.
"""

import sys
import time

import numpy as np

from retouch.bench.video import bench_clips, clip_frames, clip_scores
from retouch.models.pipeline import PipelineModel

FRAMES = 8
SHOWN = ("adherence", "inconsistency", "motion", "flicker", "changed_size", "changed_color")


def parse(config: str) -> dict:
    keyframes, *rest = config.split(":")
    if rest == ["warped"]:
        return dict(keyframes=keyframes, noise="warped")
    if len(rest) != 2:
        raise SystemExit(f"config {config!r}: give KEYFRAMES:T1:T' or KEYFRAMES:warped")
    return dict(keyframes=keyframes, dynamics=(float(rest[0]), float(rest[1])))


def main(clips: int, configs: list[str]) -> None:
    model = PipelineModel.load(None)
    cases = bench_clips(clips, FRAMES, seed=1)
    for config in configs:
        options, rows, t0 = parse(config), [], time.time()
        for i, (clip, prompt) in enumerate(cases):
            frames = clip_frames(model, clip, prompt, seed=i, **options)
            rows.append(clip_scores(frames, clip, prompt))
        means = {k: round(float(np.mean([r[k] for r in rows])), 3) for k in SHOWN}
        print(config, means, f"{(time.time() - t0) / (clips * FRAMES):.1f} s per frame",
              flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2:])
