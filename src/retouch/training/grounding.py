"""Token-level grounding of cross-attention for training (TokenCompose, Wang et al., CVPR 2024).

A training-only attention processor keeps the head-averaged cross-attention probabilities of
chosen layers, and ``grounding_loss`` asks each attribute word's attention to fall inside the
region it names. ToyWorld's renderer gives those regions for free. At inference the model is a
plain diffusers UNet; the general attention layer lives in :mod:`retouch.attention`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["GroundingProcessor", "install_grounding", "grounding_loss"]


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
    """Route cross-attention at the given latent resolutions through GroundingProcessor."""
    store: list = []
    size = unet.config.sample_size
    procs = dict(unet.attn_processors)
    depth = {"down_blocks": lambda i: i, "up_blocks": lambda i: len(unet.up_blocks) - 1 - i}
    for name in procs:
        parts = name.split(".")
        if not name.endswith("attn2.processor") or parts[0] not in depth:
            continue
        res = size // 2 ** depth[parts[0]](int(parts[1]))
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
        n = probs.shape[1]
        m = int(math.isqrt(n))
        regions = F.adaptive_avg_pool2d(masks, m).flatten(2)  # (B, 3, N)
        target = torch.gather(regions, 1, region.clamp(min=0)[..., None].expand(-1, -1, n))
        p = probs.transpose(1, 2)  # (B, T, N)
        mass = (p * target).sum(-1) / p.sum(-1).clamp_min(1e-12)
        losses.append(-torch.log(mass[grounded].clamp_min(1e-6)).mean())
        masses.append(mass[grounded].mean())
    return torch.stack(losses).mean(), torch.stack(masses).mean().detach()
