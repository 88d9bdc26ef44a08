"""Self-attention segmentation: cluster pixels by where they attend, name clusters by words.

Each pixel's self-attention row (where it looks, a distribution over pixels) is a feature; pixels
of one object look at the same places, so k-means on these rows gives segments. A segment is
labelled with the word whose (max-normalised) cross-attention map is highest on it on average,
or "background" below a threshold.

References: SIGGRAPH 2024 course "The power of attention layers" (self-segmentation, segment
labelling); Patashnik et al. 2023 (Localizing object-level shape variations); Lloyd 1982 and
Arthur & Vassilvitskii 2007 (k-means, k-means++ seeding).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["kmeans", "segment_self_attention", "label_segments", "BACKGROUND"]

BACKGROUND = "background"


def kmeans(
    x: Tensor, k: int, *, iters: int = 50, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means with k-means++ seeding; returns (labels (N,), centres (k, D)).

    Shapes: x (N, D). Deterministic given ``generator``.
    """
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] for {n} points, got {k}")
    x = x.float()
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [x[first]]
    d2 = ((x - centres[0]) ** 2).sum(-1)
    for _ in range(1, k):  # k-means++: next centre drawn with probability ~ squared distance
        total = d2.sum()
        probs = d2 / total if total > 0 else torch.full_like(d2, 1 / n)
        nxt = int(torch.multinomial(probs, 1, generator=generator))
        centres.append(x[nxt])
        d2 = torch.minimum(d2, ((x - x[nxt]) ** 2).sum(-1))
    c = torch.stack(centres)
    labels = torch.cdist(x, c).argmin(1)
    for _ in range(iters):
        for j in range(k):
            members = labels == j
            if members.any():
                c[j] = x[members].mean(0)
        new = torch.cdist(x, c).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
    return labels, c


def segment_self_attention(
    self_maps: Tensor, *, clusters: int = 5, iters: int = 50, seed: int = 0
) -> Tensor:
    """Segment an ``S x S`` image by k-means on its self-attention rows.

    Shapes: self_maps (S*S, S*S) (query, key; e.g. :meth:`AttentionStore.self_attention` row);
    returns labels (S, S) int64 in [0, clusters).
    """
    n = self_maps.shape[0]
    side = int(round(n**0.5))
    if self_maps.shape != (n, n) or side * side != n:
        raise ValueError(f"expected square self-attention maps (S*S, S*S), got {self_maps.shape}")
    labels, _ = kmeans(self_maps, clusters, iters=iters,
                       generator=torch.Generator().manual_seed(seed))
    return labels.reshape(side, side)


def label_segments(
    labels: Tensor,
    cross: Tensor,
    positions: Mapping[str, Sequence[int]],
    *,
    threshold: float = 0.3,
) -> dict[int, tuple[str, float]]:
    """Name each segment by the word attending to it most: ``{segment: (word, score)}``.

    ``score`` is the mean, over the segment's pixels, of the word's cross-attention map
    divided by its maximum; segments scoring below ``threshold`` for every word are
    :data:`BACKGROUND`. Shapes: labels (S, S); cross (S, S, T) at the same S.
    """
    if labels.shape != cross.shape[:2]:
        raise ValueError(f"labels {tuple(labels.shape)} and maps {tuple(cross.shape)} differ")
    if not positions:
        raise ValueError("label_segments needs at least one word")
    words = list(positions)
    maps = torch.stack([cross[..., list(positions[w])].sum(-1).float() for w in words])
    maps = maps / maps.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]  # (W, S, S) in [0, 1]
    out = {}
    for seg in labels.unique().tolist():
        scores = maps[:, labels == seg].mean(1)
        best = int(scores.argmax())
        score = float(scores[best])
        out[seg] = (words[best], score) if score >= threshold else (BACKGROUND, score)
    return out
