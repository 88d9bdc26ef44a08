"""Choose SyncDiffusion's distance and weight on ToyWorld panoramas (issue 17), on prompts the
fusion benchmark does not use (``random.Random(0)``; the benchmark draws from ``Random(1)``).

    python scripts/sync_tuning.py N WIDTHS CONFIG...

N prompts (``bench.fusion.bench_prompt``), each at every width of WIDTHS (comma-separated
multiples of the model's width); a CONFIG is ``md`` (MultiDiffusion) or
``DISTANCE:WEIGHT[:STEPS]`` with DISTANCE one of ``recipes.fusion.DISTANCES``, ``both`` (the
VAE-feature distance plus the colour statistics) or ``texture`` (the colour statistics of the
image and of its horizontal and vertical differences: stripes and outlines change the latter).
Prints the checker's means per config, as the benchmark scores panoramas (coherence,
background_one, style_one, adherence) and seconds per prompt. Windows every half window, 20
DDIM steps, CFG 5, seed = prompt index.
"""

import random
import sys
import time

import numpy as np

from retouch.bench.fusion import CFG, STEPS, bench_prompt, panorama_scores
from retouch.fusion import SyncDiffusion, VAEFeatureDistance, colour_statistics
from retouch.models.pipeline import PipelineModel
from retouch.recipes.fusion import panorama, sync_diffusion


def texture_statistics(a, b):
    """Colour statistics of the images and of their finite differences (a candidate)."""
    total = colour_statistics(a, b)
    for dim in (2, 3):
        total = total + colour_statistics(a.diff(dim=dim), b.diff(dim=dim))
    return total


def make_sync(model, config: str):
    if config == "md":
        return None
    name, weight, *steps = config.split(":")
    options = dict(weight=float(weight), decay=0.95, steps=int(steps[0]) if steps else 4)
    if name == "texture":
        return SyncDiffusion(model.decode_tensor, texture_statistics, **options)
    if name == "both":
        vae = VAEFeatureDistance(model.vae)
        return SyncDiffusion(model.decode_tensor,
                             lambda a, b: vae(a, b) + colour_statistics(a, b), **options)
    return sync_diffusion(model, distance=name, **options)


def main(n: int, widths: tuple[int, ...], configs: list[str]) -> None:
    model = PipelineModel.load(None)
    size, window = model.image_size, model.unet.config.sample_size
    rng = random.Random(0)
    prompts = [bench_prompt(rng) for _ in range(n)]
    for config in configs:
        rows, t0 = [], time.time()
        for i, (prompt, colour, shape) in enumerate(prompts):
            for k in widths:
                image = panorama(model, prompt, width=k * size, stride=window // 2,
                                 sync=make_sync(model, config), steps=STEPS, cfg=CFG, seed=i)
                rows.append(panorama_scores(image, colour, shape, size))
        means = {key: round(float(np.mean([r[key] for r in rows])), 3) for key in rows[0]}
        print(config, means, f"{(time.time() - t0) / n:.1f} s per prompt", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), tuple(int(w) for w in sys.argv[2].split(",")), sys.argv[3:])
