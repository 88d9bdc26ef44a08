"""EDICT sampling from noise on the shipped ToyWorld model, by step count and guidance scale.

Shows why EDICT edits need the paper's 50 steps and moderate guidance: the second sub-step of
each step evaluates the network at t on a chain already moved to t_next, and guidance amplifies
that mismatch into a drift between the two chains. Prints the checker's all-attributes accuracy
on 8 benchmark prompts and the final rms of x - y. About 3 minutes on one CPU thread.

    .venv/bin/python scripts/edict_steps.py
"""

import numpy as np
import torch

from retouch.bench.toyworld import benchmark_scenes
from retouch.inversion.exact import edict_step
from retouch.models.pipeline import PipelineModel
from retouch.toyworld import checker
from retouch.toyworld.scene import caption


def main() -> None:
    model = PipelineModel.load(None)
    data = benchmark_scenes(8)
    prompts = [caption(s).text for s in data.scenes]
    with torch.no_grad():
        for steps in (10, 25, 50):
            ts = [float(t) for t in model.time_grid(steps)]
            for cfg in (1.0, 3.0, 5.0):
                den = model.denoiser(prompts, cfg=cfg)
                noise = torch.randn(model.latent_shape(len(prompts)),
                                    generator=torch.Generator().manual_seed(0))
                x, y = noise.clone(), noise.clone()
                for k in range(steps):
                    x, y = edict_step(den, x, y, ts[k], ts[k + 1], k=k, p=0.93)
                images = model.decode(x)
                right = np.mean([checker.score(i, s)["all"] for i, s in zip(images, data.scenes)])
                drift = (x - y).pow(2).mean().sqrt().item()
                print(f"steps {steps:2d} cfg {cfg:.0f} all right {right:.3f} x-y rms {drift:.3f}")


if __name__ == "__main__":
    main()
