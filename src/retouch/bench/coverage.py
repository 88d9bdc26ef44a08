"""How well each word's cross-attention map covers the region it names (issue 14).

``attention_mass`` (the share of a word's attention inside its object) is maximised by a point at
the object's centre, which is what the ToyWorld model learnt. The measures here ask for coverage:

* ``soft_iou(a, m) = sum(min(m, a)) / sum(max(m, a))`` with the map ``a`` scaled to max 1 and the
  soft mask ``m`` (area fractions in [0, 1]) on the map's grid: 1 exactly when the scaled map
  equals the mask, threshold-free;
* ``threshold_iou``: IoU of the cells where ``a >= 0.3`` and the cells the object covers by at
  least half (the measure of the issue's table).

:func:`measure_coverage` reads the maps two ways on held-out renders: per cross-attention
resolution of the UNet (head- and layer-averaged, the render noised to a few fixed times, one
conditional call each), and the maps :func:`~retouch.recipes.attention_maps.attention_maps`
returns for the render (what the attention techniques read). Object words are the shape nouns;
background words are the colour and ``background``.

References: Wang et al., CVPR 2024 (TokenCompose: grounding losses, mask IoU of attention maps);
Hertz et al. 2022 (Prompt-to-Prompt: cross-attention maps as object masks).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["soft_iou", "threshold_iou", "measure_coverage", "THRESHOLD", "BIG"]

THRESHOLD = 0.3  # threshold IoU: a cell is "on" where the map is >= THRESHOLD x its max
BIG = "big"  # the size word of the objects reported apart


def _scaled(a: torch.Tensor) -> torch.Tensor:
    return a / a.flatten(-2).amax(-1)[..., None, None].clamp_min(1e-12)


def soft_iou(a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Soft IoU of maps ``a`` (..., S, S), scaled to max 1 here, and soft masks ``m`` (same shape,
    values in [0, 1]): ``sum(min(m, a)) / sum(max(m, a))``, shape (...)."""
    a = _scaled(a.float())
    m = m.float()
    return torch.minimum(a, m).sum((-2, -1)) / torch.maximum(a, m).sum((-2, -1)).clamp_min(1e-12)


def threshold_iou(a: torch.Tensor, m: torch.Tensor, *,
                  threshold: float = THRESHOLD) -> torch.Tensor:
    """IoU of ``a >= threshold * max(a)`` and ``m >= 0.5`` over (..., S, S), shape (...)."""
    on = _scaled(a.float()) >= threshold
    inside = m >= 0.5
    union = (on | inside).sum((-2, -1)).float()
    return (on & inside).sum((-2, -1)).float() / union.clamp_min(1)


def _words(scene) -> list[tuple[int, int, bool]]:
    """(token position, mask channel, is a big object) of the canonical caption's object nouns
    (channels 0, 1) and background words (channel 2)."""
    from ..toyworld.scene import caption

    out = []
    for i, role in enumerate(caption(scene).roles):
        if role is None:
            continue
        k, attr = role
        if attr == "shape":
            out.append((i + 1, k, scene.objects[k].size == BIG))  # +1: BOS comes first
        elif attr == "background":
            out.append((i + 1, 2, False))
    return out


def _summary(rows: list[tuple[float, float, int, bool]]) -> dict:
    """Means of (soft IoU, threshold IoU) rows over object words, big ones, and background."""
    def mean(sel):
        vals = [r for r in rows if sel(r)]
        if not vals:
            return None, None
        return float(np.mean([r[0] for r in vals])), float(np.mean([r[1] for r in vals]))

    obj = mean(lambda r: r[2] < 2)
    big = mean(lambda r: r[2] < 2 and r[3])
    small = mean(lambda r: r[2] < 2 and not r[3])
    bg = mean(lambda r: r[2] == 2)
    return {
        "soft_iou": obj[0], "threshold_iou": obj[1],
        "big_soft_iou": big[0], "big_threshold_iou": big[1],
        "small_soft_iou": small[0], "small_threshold_iou": small[1],
        "background_soft_iou": bg[0], "background_threshold_iou": bg[1],
        "words": sum(r[2] < 2 for r in rows), "background_words": sum(r[2] == 2 for r in rows),
    }


def _score(maps, masks: torch.Tensor, scenes, *, side: int) -> dict:
    """Coverage of maps against renderer masks (B, 3, M, M); ``maps(b, pos)`` is the (S, S)
    map of token ``pos`` of scene ``b``, or None where it was not read."""
    pooled = F.adaptive_avg_pool2d(masks.float(), side) if masks.shape[-1] >= side else (
        F.interpolate(masks.float(), size=(side, side), mode="bilinear", align_corners=False))
    rows = []
    for b, scene in enumerate(scenes):
        for pos, channel, big in _words(scene):
            a = maps(b, pos)
            if a is not None:
                m = pooled[b, channel].cpu()
                rows.append((float(soft_iou(a.cpu(), m)), float(threshold_iou(a.cpu(), m)),
                             channel, big))
    return _summary(rows)


def model_time(schedule, fraction: float) -> float:
    """The model time ``fraction`` of the way to pure noise: ``fraction x 1000`` on SD's
    discrete schedules (timestep 200 for 0.2), ``fraction`` in rectified flow."""
    from ..schedules import DiscreteVPSchedule

    if isinstance(schedule, DiscreteVPSchedule):
        return float(fraction * schedule.num_train_timesteps)
    return float(fraction * schedule.t_max)


@torch.no_grad()
def _per_resolution(model, data, timesteps) -> dict[int, torch.Tensor]:
    """Head-, layer- and time-averaged cross maps (B, S, S, T) per UNet attention resolution."""
    from ..attention import find_sites
    from ..toyworld.scene import caption
    from ..training.grounding import grounded

    network = model.network
    denoiser = model.network_denoiser(model.encode([caption(s).text for s in data.scenes]))
    x0 = model.encode_image(data.images)
    gen = torch.Generator().manual_seed(0)
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    resolutions = tuple(sorted({s.resolution for s in find_sites(network).values()},
                               reverse=True))
    with grounded(network, resolutions, rows=len(data.scenes), call=denoiser) as (store,
                                                                                  forward):
        for t in (model_time(model.schedule, f) for f in timesteps):
            eps = torch.randn(x0.shape, generator=gen).to(x0)
            alpha, sigma = model.schedule.coeffs(t)
            forward(alpha * x0 + sigma * eps, t)
            for probs in store:  # (B, N, T)
                side = int(round(probs.shape[1] ** 0.5))
                grid = probs.float().reshape(probs.shape[0], side, side, -1)
                sums[side] = sums[side] + grid if side in sums else grid
                counts[side] = counts.get(side, 0) + 1
    return {side: sums[side] / counts[side] for side in sorted(sums, reverse=True)}


def _recipe_maps(model, data, *, steps: int, cfg: float) -> dict[tuple[int, int], torch.Tensor]:
    """The maps ``attention_maps`` returns for each render under its caption, keyed by (scene,
    token position). Words that occur twice in a caption ("a red circle ... and a blue circle")
    are left out: the recipe sums a word's tokens, so its map covers both objects."""
    from ..recipes.attention_maps import attention_maps
    from ..toyworld.scene import caption

    out = {}
    images = ((data.images.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
    for b, scene in enumerate(data.scenes):
        cap = caption(scene)
        words = {cap.words[pos - 1]: pos for pos, _, _ in _words(scene)
                 if cap.words.count(cap.words[pos - 1]) == 1}
        maps = attention_maps(model, cap.text, image=images[b], words=list(words), steps=steps,
                              cfg=cfg, clusters=2)
        for name, pos in words.items():
            out[b, pos] = torch.from_numpy(maps.heatmaps[name])
    return out


def measure_coverage(
    model,
    data,
    *,
    timesteps: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8),
    recipe_steps: int = 10,
    recipe_cfg: float = 5.0,
) -> dict:
    """Coverage of object and background words on the renders of ``data`` (a SceneSet): per
    UNet cross-attention resolution (``"res16"``, ``"res8"``, ``"res4"``: the mid block) and
    for the maps ``attention_maps`` returns (``"attention_maps"``, ``recipe_steps`` steps, CFG
    ``recipe_cfg``; words that occur twice in a caption left out). Each entry holds soft and
    threshold IoU over all object words, big ones,
    small ones and the background words."""
    out = {}
    for side, maps in _per_resolution(model, data, timesteps).items():
        out[f"res{side}"] = _score(lambda b, pos, maps=maps: maps[b, :, :, pos], data.masks,
                                   data.scenes, side=side)
    recipe = _recipe_maps(model, data, steps=recipe_steps, cfg=recipe_cfg)
    side = next(iter(recipe.values())).shape[0]
    out["attention_maps"] = _score(lambda b, pos: recipe.get((b, pos)), data.masks, data.scenes,
                                   side=side)
    return out
