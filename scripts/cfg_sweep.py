"""All-attributes adherence of ToyWorld models against the guidance scale, on the first N of
``bench toyworld``'s extended prompts (same seeds, 25 DDIM steps, batches of 8).

    python scripts/cfg_sweep.py N CFG1,CFG2,... MODEL...

Prints one JSON line per model and scale. Session 19, N = 96, on one thread beside a training
run: the shipped model 0.94 / 0.94 / 0.98 at CFG 5 / 3 / 2; teach1 (covering maps) 0.80 / 0.875 /
0.94 / 0.92 at CFG 8 / 5 / 3 / 2 (`benchmarks/toyworld-guidance-scale/`).
"""

import json
import sys
import time

from retouch.bench.toyworld import benchmark_scenes, prompt_adherence
from retouch.models.pipeline import PipelineModel


def main(n: int, scales: list[float], folders: list[str]) -> None:
    scenes = benchmark_scenes(n, extended=True).scenes  # the first n of the bench's 256
    for folder in folders:
        model = PipelineModel.load(folder)
        for cfg in scales:
            t0 = time.time()
            accuracy = prompt_adherence(model, scenes, cfg=cfg)[0]
            print(json.dumps({"model": folder, "cfg": cfg, "n": n, "all": accuracy["all"],
                              "seconds": round(time.time() - t0)}), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), [float(c) for c in sys.argv[2].split(",")], sys.argv[3:])
