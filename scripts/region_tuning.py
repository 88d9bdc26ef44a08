"""Choose MultiDiffusion's region settings on ToyWorld layouts (issue 17), on layouts the fusion
benchmark does not use (``random.Random(0)``; the benchmark draws from ``Random(1)``).

    python scripts/region_tuning.py CASES CONFIG...

CASES layouts per split of ``bench.fusion.SPLITS``; a CONFIG is ``BOOTSTRAP:STRIDE[:POWER]``
(the share of bootstrapped steps, the window stride in latent pixels and the coverage power of
the region views' weights, default 0: the paper's plain masks) or ``regional`` (regional
prompting at its defaults). Prints the share of regions right (``bench.fusion.region_scores``)
per split and overall, and seconds per layout. 20 DDIM steps, CFG 5, seed = case index.
"""

import random
import sys
import time

import numpy as np

from retouch.bench.fusion import CFG, SPLITS, STEPS, bench_layout, region_scores
from retouch.models.pipeline import PipelineModel
from retouch.recipes.fusion import regions


def main(cases: int, configs: list[str]) -> None:
    model = PipelineModel.load(None)
    size = model.image_size
    rng = random.Random(0)
    layouts = [(name, c, *bench_layout(rng, split, size, tuple(int(n) for n in name.split("x"))))
               for name, split in SPLITS.items() for c in range(cases)]
    for config in configs:
        if config == "regional":
            options = dict(method="regional")
        else:
            bootstrap, stride, *power = config.split(":")
            options = dict(method="multidiffusion", bootstrap=float(bootstrap), stride=int(stride),
                           coverage_power=float(power[0]) if power else 0.0)
        right, per, t0 = [], {}, time.time()
        for name, c, layout, picks in layouts:
            image = regions(model, layout, steps=STEPS, cfg=CFG, seed=c, **options)
            scores = region_scores(image, picks, size)
            right += scores
            per.setdefault(name, []).extend(scores)
        split_means = {k: round(float(np.mean(v)), 3) for k, v in per.items()}
        print(config, round(float(np.mean(right)), 3), f"of {len(right)}", split_means,
              f"{(time.time() - t0) / len(layouts):.1f} s per layout", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2:])
