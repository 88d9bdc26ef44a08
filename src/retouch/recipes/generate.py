"""Text-to-image with retouch's one sampling loop (any sampler, any SD-family model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..checks import count, finite, prompt_list
from ..files import check_output_file, save_image
from ..models.pipeline import PipelineModel
from ..samplers import get_step, sample, start_latents
from ..toyworld.folder import DEFAULT_GUIDANCE, generation_guidance

__all__ = ["generate", "generate_to_file", "recommended_cfg"]


def recommended_cfg(model: PipelineModel) -> float:
    """The text-to-image guidance a loaded model recommends (its folder's ``toyworld.json``;
    :func:`~retouch.toyworld.folder.generation_guidance`); a model built in memory has no
    folder and gets ``DEFAULT_GUIDANCE``."""
    return generation_guidance(model.folder) if model.folder else DEFAULT_GUIDANCE


def generate(
    model: PipelineModel,
    prompts: list[str] | str,
    *,
    steps: int = 25,
    cfg: float | None = None,
    seed: int = 0,
    sampler: str = "ddim",
    negative: str = "",
    progress: bool = True,
) -> np.ndarray:
    """Sample one image per prompt; returns uint8 (B, H, W, 3). Start noise is drawn on the CPU
    from ``seed`` so results do not depend on the device. ``cfg=None``: the scale the model
    recommends (:func:`~retouch.toyworld.folder.generation_guidance`)."""
    prompts = prompt_list(prompts)
    count("steps", steps)
    if cfg is None:
        cfg = recommended_cfg(model)
    finite("cfg", cfg)
    count("seed", seed, minimum=0)
    step = get_step(sampler)  # validates the name before any work
    denoiser = model.denoiser(prompts, cfg=cfg, negative=[negative] * len(prompts))
    gen = torch.Generator().manual_seed(seed)
    times = model.time_grid(steps)
    noise = torch.randn(model.latent_shape(len(prompts)), generator=gen)
    x = start_latents(model.schedule, float(times[0]), noise).to(model.device)
    with torch.no_grad():
        latents = sample(denoiser, x, times, step=step, progress=progress,
                         generator=torch.Generator().manual_seed(seed + 1))
    return model.decode(latents)


def generate_to_file(prompt: str, out: str | Path, *, model=None, n: int = 1, **kw) -> Path:
    """Generate ``n`` images of ``prompt`` and save them side by side as one image, in the
    format ``out``'s extension names. ``cfg=None`` (or absent): the scale the model recommends
    (:func:`~retouch.toyworld.folder.generation_guidance`)."""
    count("n", n)
    get_step(kw.get("sampler", "ddim"))  # the sampler's name, before the model loads
    if kw.get("cfg") is None:
        kw["cfg"] = generation_guidance(model)
    finite("cfg", kw["cfg"])
    out = check_output_file(out)
    tw = PipelineModel.load(model)
    images = generate(tw, [prompt] * n, **kw)
    return save_image(np.concatenate(list(images), axis=1), out)
