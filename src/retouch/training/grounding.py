"""Grounding of cross-attention for training (TokenCompose, Wang et al., CVPR 2024).

A training-only attention processor keeps the head-averaged cross-attention probabilities of
chosen layers. ``grounding_loss`` (TokenCompose's token loss) asks each attribute word's
attention to fall inside the region it names; a point at the region's centre satisfies it fully.
``coverage_loss`` asks the map to *cover* the region: TokenCompose's pixel loss (binary
cross-entropy between the map scaled to max 1 and the mask, per layer), or the KL divergence from
the mask-uniform distribution ``q = m / sum(m)`` to the map. ToyWorld's renderer gives the
regions for free. At inference the model is a plain diffusers UNet; the general attention layer
lives in :mod:`retouch.attention`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "GroundingProcessor",
    "install_grounding",
    "grounding_loss",
    "coverage_loss",
    "COVERAGE_LOSSES",
]

COVERAGE_LOSSES = ("bce", "kl")  # coverage_loss kinds


class GroundingProcessor:
    """Cross-attention that also keeps its head-averaged probabilities (B, N, T) for the loss."""

    def __init__(self, store: list):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        b = hidden_states.shape[0]
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        v = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(q, k, attention_mask)  # (B*heads, N, T)
        self.store.append(probs.view(b, attn.heads, *probs.shape[1:]).mean(1))
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out))


def install_grounding(unet, resolutions: tuple[int, ...]) -> list:
    """Route cross-attention at the given latent resolutions through GroundingProcessor (the
    mid block's too, if its resolution is listed)."""
    store: list = []
    size = unet.config.sample_size
    procs = dict(unet.attn_processors)
    depth = {
        "down_blocks": lambda i: i,
        "up_blocks": lambda i: len(unet.up_blocks) - 1 - i,
        "mid_block": lambda i: len(unet.down_blocks) - 1,
    }
    for name in procs:
        parts = name.split(".")
        if not name.endswith("attn2.processor") or parts[0] not in depth:
            continue
        index = int(parts[1]) if parts[1].isdigit() else 0
        res = size // 2 ** depth[parts[0]](index)
        if res in resolutions:
            procs[name] = GroundingProcessor(store)
    unet.set_attn_processor(procs)
    return store


def grounding_loss(store: list, masks: torch.Tensor, region: torch.Tensor):
    """TokenCompose token loss: mean over grounded tokens of -log(mass inside their region).

    ``masks`` (B, 3, M, M) soft regions; ``region`` (B, T) mask channel per token or -1.
    Returns (loss, mean mass) over all stored maps.
    """
    grounded = region >= 0
    if not grounded.any():
        zero = masks.new_zeros(())
        return zero, zero
    losses, masses = [], []
    for probs in store:
        p, target = _maps_and_targets(probs, masks, region)
        mass = (p * target).sum(-1) / p.sum(-1).clamp_min(1e-12)
        losses.append(-torch.log(mass[grounded].clamp_min(1e-6)).mean())
        masses.append(mass[grounded].mean())
    return torch.stack(losses).mean(), torch.stack(masses).mean().detach()


def _maps_and_targets(probs: torch.Tensor, masks: torch.Tensor, region: torch.Tensor):
    """Per-token maps ``p`` (B, T, N) and their regions' masks pooled to the maps' grid."""
    n = probs.shape[1]
    regions = F.adaptive_avg_pool2d(masks, int(math.isqrt(n))).flatten(2)  # (B, 3, N)
    target = torch.gather(regions, 1, region.clamp(min=0)[..., None].expand(-1, -1, n))
    return probs.transpose(1, 2), target


def coverage_loss(store: list, masks: torch.Tensor, region: torch.Tensor, kind: str):
    """Coverage loss of grounded tokens' maps, averaged over stored layers and tokens.

    ``kind`` "bce" (TokenCompose's pixel loss): mean over cells of the binary cross-entropy
    between ``a = p / max(p)`` and the soft mask ``m``; "kl": ``KL(q || p / sum(p))`` with
    ``q = m / sum(m)``, 0 exactly when the map is uniform over the mask. Masks (B, 3, M, M),
    ``region`` (B, T) as in :func:`grounding_loss`. Returns (loss, mean soft IoU
    ``sum(min(m, a)) / sum(max(m, a))``, detached).
    """
    if kind not in COVERAGE_LOSSES:
        raise ValueError(f"coverage loss must be one of {', '.join(COVERAGE_LOSSES)}, got {kind!r}")
    grounded = region >= 0
    if not grounded.any():
        zero = masks.new_zeros(())
        return zero, zero
    losses, ious = [], []
    for probs in store:
        p, m = _maps_and_targets(probs, masks, region)
        p, m = p[grounded], m[grounded]  # (G, N) grounded tokens only
        a = p / p.amax(-1, keepdim=True).clamp_min(1e-12)
        if kind == "bce":
            # eps inside the logs, not a clamp of a: a clamp has no gradient where a is ~0,
            # which is where a point-like map must grow.
            eps = 1e-6
            bce = -(m * torch.log(a + eps) + (1 - m) * torch.log(1 - a + eps))
            losses.append(bce.mean())
        else:
            q = m / m.sum(-1, keepdim=True).clamp_min(1e-12)
            p_hat = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
            kl = (q * (torch.log(q.clamp_min(1e-12)) - torch.log(p_hat.clamp_min(1e-12)))).sum(-1)
            losses.append(kl.mean())
        with torch.no_grad():
            ious.append((torch.minimum(a, m).sum(-1) / torch.maximum(a, m).sum(-1)).mean())
    return torch.stack(losses).mean(), torch.stack(ious).mean()
