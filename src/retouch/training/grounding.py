"""Grounding of cross-attention for training (TokenCompose, Wang et al., CVPR 2024).

:func:`grounded` records the head-averaged cross-attention probabilities of chosen layers
through :mod:`retouch.attention` (a :class:`~retouch.attention.MapRecorder`, gradients kept).
``grounding_loss`` (TokenCompose's token loss) asks each attribute word's attention to fall
inside the region it names; a point at the region's centre satisfies it fully.
``coverage_loss`` asks the map to *cover* the region: TokenCompose's pixel loss (binary
cross-entropy between the map scaled to max 1 and the mask, per layer), or the KL divergence
from the mask-uniform distribution ``q = m / sum(m)`` to the map. ToyWorld's renderer gives the
regions for free. At inference the model is a plain diffusers UNet.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..attention import BatchLayout, MapRecorder, attention_control

__all__ = [
    "grounded",
    "grounding_loss",
    "coverage_loss",
    "COVERAGE_LOSSES",
]

COVERAGE_LOSSES = ("bce", "kl")  # coverage_loss kinds


@contextmanager
def grounded(unet, resolutions: Collection[int], *, rows: int,
             call: Callable | None = None) -> Iterator[tuple[list, Callable]]:
    """Record the cross-attention maps of ``unet`` at the given resolutions (down, mid and up
    blocks) through :mod:`retouch.attention`'s one processor, for calls of ``rows`` rows.

    Yields ``(maps, forward)``: ``forward(x, *args, **kw)`` runs the network on latents ``x``
    (a UNet, or SD3's transformer, whose cross views of joint attention are recorded), and
    ``maps`` then holds each recorded call's head-averaged probabilities (B, N, T), with
    gradients when the call has them. ``call`` (default: the network itself) is what
    ``forward`` runs, e.g. the model adapter's denoiser, which speaks every family's inputs.
    The previous processors are restored on exit.
    """
    call = unet if call is None else call
    recorder = MapRecorder(kinds=("cross",), resolutions=resolutions)
    layout = BatchLayout(("image",) * rows, ("cond",))
    with attention_control(unet, [recorder], layout=layout) as session:
        def forward(x, *args, **kw):
            recorder.clear()
            with session.at_step(0, 0.0, num_steps=1, latent_hw=x.shape[-2:]):  # no sampling
                return call(x, *args, **kw)

        yield recorder.maps, forward


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
