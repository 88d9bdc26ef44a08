"""What the video benchmark's identity inconsistency is made of (issue 16).

    python scripts/video_changes.py METHOD...

Runs each METHOD (a row name of ``bench.video.METHODS``, e.g. ``independent`` or
``"first + warped noise"``) on the benchmark's own clips (12 clips of 8 frames, seed 0, exactly
as ``retouch bench consistency --parts video`` does) and splits the frames counted as changed
(identity differs from frame 1's) into those where a *read* attribute differs (both frames' words
known and unequal, or another object count) and those that differ only because the checker
abstained (``None``) on one side. Prints both shares of frames 2..F and, per attribute, how often
a read value changed. Session 18: see ``docs/benchmarks.md``.
"""

import sys
from collections import Counter

from retouch.bench.video import IDENTITY, METHODS, _identity, bench_clips, method_clip
from retouch.models.pipeline import PipelineModel
from retouch.toyworld.checker import read


def split(first: tuple, other: tuple) -> tuple[bool, list[str]]:
    """(differs only through abstentions, attributes whose read values differ)."""
    read_changes = [a for a, x, y in zip(IDENTITY, first, other, strict=True)
                    if x is not None and y is not None and x != y]
    return (first != other and not read_changes), read_changes


def main(names: list[str]) -> None:
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        sys.exit(f"methods {unknown or '(none)'}: choose from {', '.join(METHODS)}")
    model = PipelineModel.load(None)
    cases = bench_clips(12, 8)
    for name in names:
        changed = abstained = total = 0
        attrs: Counter = Counter()
        for i, (clip, prompt) in enumerate(cases):
            ids = [_identity(read(f)) for f in method_clip(model, name, clip, prompt, seed=i)]
            for other in ids[1:]:
                only_abstained, read_changes = split(ids[0], other)
                total += 1
                changed += bool(read_changes)
                abstained += only_abstained
                attrs.update(read_changes)
        print(f"{name}: inconsistency {(changed + abstained) / total:.3f} = read changes "
              f"{changed / total:.3f} + abstentions only {abstained / total:.3f} "
              f"({total} frames); read changes by attribute: "
              + ", ".join(f"{a} {attrs[a] / total:.3f}" for a in IDENTITY))


if __name__ == "__main__":
    main(sys.argv[1:])
