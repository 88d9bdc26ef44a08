"""ToyWorld training data: rendered scenes, masks, and caption batches with grounding targets."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .render import render
from .scene import POSITIONS, SHAPES, STYLES, Scene, caption, random_scene

__all__ = ["SceneSet", "make_scenes", "vocabulary", "CaptionBatch", "caption_batch", "DROP",
           "PARTIAL_DROP"]

# Per-attribute caption-word omission probabilities during training (the model learns to sample
# an attribute whose word is missing). The style word's is ``caption_batch(free_style=...)``:
# without that, training keeps the older grammar, in which a caption without a style word means
# solid (scene.py), and never drops the word of an outlined or striped scene.
DROP = {"size": 0.1, "color": 0.1, "position": 0.15, "background": 0.2}
# Omission probabilities of a partially specified caption (``caption_batch(partial=...)``, the
# benchmark's partial prompts): with DROP alone, "a blue triangle" (size, position and
# background all left out) is 1 caption in 330.
PARTIAL_DROP = {"size": 0.5, "color": 0.5, "style": 0.5, "position": 0.5, "background": 0.5}


def vocabulary(extended: bool) -> dict:
    """``random_scene`` options of the training world: the core vocabulary (solid fill; left,
    right, center), or the extended one (also top/bottom and outlined/striped). Star and heart
    are never in either: personalization teaches them."""
    if not extended:
        return {"shapes": SHAPES}
    return {"shapes": SHAPES, "styles": STYLES, "positions": tuple(POSITIONS)}


@dataclass
class SceneSet:
    """N rendered scenes: ``images`` (N, 3, H, W) in [-1, 1]; ``masks`` (N, 3, M, M): the
    silhouettes of objects 0 and 1 and the background, pooled to the latent grid M."""

    scenes: list[Scene]
    images: torch.Tensor
    masks: torch.Tensor

    def __len__(self) -> int:
        return len(self.scenes)


def make_scenes(
    n: int, *, seed: int, size: int, mask_size: int, progress: bool = True, **scene_kw
) -> SceneSet:
    """Render ``n`` random scenes (deterministic in ``seed``)."""
    from tqdm.auto import tqdm

    rng = random.Random(seed)
    scenes, images, masks = [], np.empty((n, size, size, 3), np.uint8), []
    for i in tqdm(range(n), desc="render scenes", disable=not progress, leave=False):
        scene = random_scene(rng, **scene_kw)
        r = render(scene, size)
        scenes.append(scene)
        images[i] = r.image
        m = np.zeros((3, size, size), np.float32)
        m[: len(r.masks)] = r.masks[:2]
        m[2] = r.background_mask
        masks.append(m)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    m = F.adaptive_avg_pool2d(torch.from_numpy(np.stack(masks)), mask_size)
    return SceneSet(scenes=scenes, images=x, masks=m)


@dataclass
class CaptionBatch:
    """Captions with, per token, the region its word names.

    ``region`` (B, T) indexes the mask channels (0, 1 objects, 2 background) or is -1 for
    tokens that are not grounded (grammar words, BOS/EOS/padding, dropped captions).
    """

    texts: list[str]
    region: torch.Tensor


def caption_batch(
    scenes: list[Scene],
    *,
    rng: random.Random,
    max_tokens: int,
    cond_dropout: float,
    solid_word: float = 0.0,
    partial: float = 0.0,
    free_style: float = 0.0,
) -> CaptionBatch:
    """Training captions (random attribute-word dropout, whole-caption dropout for CFG); a solid
    scene's caption says ``solid`` with probability ``solid_word``; a share ``partial`` of them
    drop attributes with PARTIAL_DROP instead of DROP.

    ``free_style`` > 0 trains the current meaning of a caption without a style word, *any* fill
    style, as for every other attribute: the style word is left out with that probability (with
    PARTIAL_DROP's in a partial caption) and written otherwise, ``solid`` too (``solid_word`` is
    unused). With 0 the older grammar: the word is never dropped, and ``solid`` is written with
    probability ``solid_word``."""
    texts, regions = [], torch.full((len(scenes), max_tokens), -1, dtype=torch.long)
    for b, scene in enumerate(scenes):
        if rng.random() < cond_dropout:
            texts.append("")
            continue
        say_solid = free_style > 0 or (solid_word > 0 and rng.random() < solid_word)
        drop = PARTIAL_DROP if partial > 0 and rng.random() < partial else DROP
        style = drop.get("style", free_style) if free_style > 0 else 0.0
        drop = {**drop, "style": style}
        cap = caption(scene, drop=drop, say_solid=say_solid, rng=rng)
        texts.append(cap.text)
        for i, role in enumerate(cap.roles):
            if role is not None and i + 1 < max_tokens:  # +1: BOS comes first
                regions[b, i + 1] = 2 if role[0] < 0 else role[0]
    return CaptionBatch(texts=texts, region=regions)
