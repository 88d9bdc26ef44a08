"""Consistency across images through shared attention: StyleAligned batches.

:func:`style_aligned` generates a batch whose first prompt is the reference: every other image
attends to the reference's self-attention keys and values (AdaIN-normalised queries and keys,
:class:`~retouch.attention.SharedAttention`), so the batch shares its style while each image
follows its own prompt; the reference itself is generated as it would be alone. The reference
may be a real image: pass its inversion (any method of :data:`retouch.inversion.METHODS` made
with the same steps and guidance) and its row follows the inverted trajectory.

References: Hertz et al. 2024 (StyleAligned, CVPR; Sec. 3 and the reference-image variant,
Sec. 4.3: DDIM-inverted reference latents replace the reference row at each step).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..attention import BatchLayout, SharedAttention, attention_control, guidance_halves
from ..checks import count, finite, prompt_list
from ..samplers import get_step, sample, start_latents
from ..samplers.callbacks import pin_row

__all__ = ["style_aligned"]


def style_aligned(
    model,
    prompts: list[str],
    *,
    steps: int = 25,
    cfg: float = 5.0,
    seed: int = 0,
    sampler: str = "ddim",
    reference_inversion=None,
    share: bool = True,
    shared_noise: bool = False,
    progress: bool = False,
    **options,
) -> np.ndarray:
    """Images (B, H, W, 3) uint8 for ``prompts``, the first being the reference (see the module
    doc). ``options`` go to :class:`SharedAttention` (``adain_queries``, ``adain_keys``,
    ``adain_values``, ``score_scale``, ``score_shift``, ``start_layer``, ``steps``).
    ``share=False`` is the baseline: the same noises, no sharing. Each row starts from its own
    noise, drawn on the CPU from ``seed`` (``shared_noise``: every row from the first row's)."""
    prompts = prompt_list(prompts)
    if len(prompts) < 2:
        raise ValueError("style_aligned needs a reference prompt and at least one more")
    count("steps", steps)
    finite("cfg", cfg)
    step = get_step(sampler)
    controllers = [SharedAttention(**options)] if share else []
    times = model.time_grid(steps)
    noise = torch.randn(model.latent_shape(len(prompts)),
                        generator=torch.Generator().manual_seed(seed))
    if shared_noise:
        noise = noise[:1].expand_as(noise).clone()
    x = start_latents(model.schedule, float(times[0]), noise).to(model.device)
    callbacks = []
    if reference_inversion is not None:
        traj: Tensor = reference_inversion.trajectory
        if len(reference_inversion.times) != len(times) or reference_inversion.batch != 1:
            raise ValueError(f"the reference inversion has {reference_inversion.steps} steps and "
                             f"{reference_inversion.batch} image(s); invert one image with "
                             f"steps={steps}")
        x[0] = traj[0][0].to(x)
        callbacks.append(pin_row(traj[:, 0]))
    den = model.denoiser(prompts, cfg=cfg)
    layout = BatchLayout(("reference",) + ("image",) * (len(prompts) - 1), guidance_halves(den))
    with torch.no_grad(), attention_control(model.network, controllers, layout=layout) as session:
        latents = sample(session.denoiser(den, times), x, times, step=step, callbacks=callbacks,
                         progress=progress, generator=torch.Generator().manual_seed(seed + 1))
    return model.decode(latents)
