"""Read a model's attention: per-word cross-attention heatmaps and self-attention segments.

For a prompt alone, the maps are averaged over the steps of generating its image; for a given
image, the image is noised to each time of the grid (one fixed noise) and the maps of the
model denoising it under the prompt are averaged. Either way two
:class:`~retouch.attention.AttentionStore` keep running sums on one grid: cross maps from every
site, self maps only from sites of side ≤ ``SELF_MAX_RESOLUTION`` (SD's 64x64 self-attention
would materialise a 4096 x 4096 map per head; Prompt-to-Prompt stops at 32 too).

References: Hertz et al. 2022 (cross-attention visualisation); Tumanyan et al. / the SIGGRAPH
2024 course "The power of attention layers" (self-attention segmentation).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..attention import (
    AttentionStore,
    BatchLayout,
    attention_control,
    find_sites,
    guidance_halves,
)
from ..attention.maps import save_heatmaps, token_heatmaps
from ..attention.segment import label_segments, segment_self_attention
from ..attention.tokens import word_positions
from ..checks import count, finite
from ..files import save_image
from ..models.pipeline import ImageLike, PipelineModel
from ..samplers import get_step, sample, start_latents

__all__ = ["AttentionMaps", "attention_maps", "save_attention_maps"]

SELF_MAX_RESOLUTION = 32  # self-attention maps are read from sites of this side or smaller
GRAMMAR_WORDS = frozenset({"a", "an", "the", "on", "and", "of", "in", "with", "to"})


@dataclass
class AttentionMaps:
    image: np.ndarray  # uint8 (H, W, 3): the generated or given image
    heatmaps: dict[str, np.ndarray]  # word -> (S, S) in [0, 1]
    segments: np.ndarray  # (S', S') int cluster labels of self-attention
    segment_words: dict[int, tuple[str, float]]  # cluster -> (word attending most, score)


def attention_maps(
    model: PipelineModel,
    prompt: str,
    *,
    image: ImageLike | None = None,
    words: list[str] | None = None,
    steps: int = 25,
    cfg: float = 5.0,
    seed: int = 0,
    clusters: int = 4,
    progress: bool = False,
) -> AttentionMaps:
    """Cross-attention heatmaps of ``words`` (default: the prompt's content words)."""
    count("steps", steps)
    finite("cfg", cfg)
    count("clusters", clusters)
    model.check_prompt(prompt)
    words = words or [w for w in dict.fromkeys(prompt.lower().split()) if w not in GRAMMAR_WORDS]
    positions = {w: word_positions(model.text_tokens, prompt, w) for w in words}
    den = model.denoiser([prompt], cfg=cfg)
    layout = BatchLayout(("image",), guidance_halves(den))
    times = model.time_grid(steps)
    sites = [s for s in find_sites(model.network).values() if s.place != "mid"]
    size = min(s.resolution for s in sites)
    coarse = {s.resolution for s in sites if s.resolution <= SELF_MAX_RESOLUTION}
    store = AttentionStore(kinds=("cross",), size=size)
    self_store = AttentionStore(kinds=("self",), resolutions=coarse, size=size)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(model.latent_shape(1), generator=gen).to(model.device)
    with torch.no_grad(), attention_control(model.network, [store, self_store],
                                          layout=layout) as session:
        controlled = session.denoiser(den, times)
        if image is None:
            x = start_latents(model.schedule, float(times[0]), noise)
            latents = sample(controlled, x, times, step=get_step("ddim"), progress=progress,
                             callbacks=[session.callback])
            picture = model.decode(latents)[0]
        else:
            z = model.encode_image(image)
            for t in [float(t) for t in times[:-1]]:
                alpha, sigma = model.schedule.coeffs(t)
                controlled(alpha * z + sigma * noise, t)
            picture = model.decode(z)[0]
    heatmaps = token_heatmaps(store.cross()[0], positions)
    labels = segment_self_attention(self_store.self_attention()[0], clusters=clusters)
    named = label_segments(labels, store.cross()[0], positions)
    return AttentionMaps(picture, heatmaps, labels.cpu().numpy(), named)


#: The files :func:`save_attention_maps` writes.
OUTPUTS = ("heatmaps.png", "segments.png")


def save_attention_maps(maps: AttentionMaps, out: Path) -> list[Path]:
    """Write ``heatmaps.png`` (image + one map per word) and ``segments.png`` into ``out``."""
    from PIL import Image

    out = Path(out)
    paths = [save_heatmaps(out / "heatmaps.png", maps.heatmaps, image=maps.image)]
    palette = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                        [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230]])
    seg = palette[maps.segments % len(palette)].astype(np.uint8)
    size = maps.image.shape[0]
    tile = Image.fromarray(seg).resize((size, size), Image.NEAREST)
    both = np.concatenate([maps.image, np.asarray(tile)], axis=1)
    big = Image.fromarray(both).resize((both.shape[1] * 2, both.shape[0] * 2), Image.NEAREST)
    paths.append(save_image(big, out / "segments.png"))
    return paths
