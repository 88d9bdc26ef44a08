"""Shared attention (StyleAligned): every image of a batch also attends to a reference image.

At each selected self-attention call, every row's queries and keys are AdaIN-normalised to the
statistics of its half's reference row (mean and std over tokens, per head and channel), and the
reference's keys and values are appended to every row's own:
``Attention(Q^, [K^; s K^_ref], [V; V_ref])``. The reference row then attends to two copies of
its own tokens, which leaves its softmax average unchanged: the reference is generated exactly
as it would be alone (to float round-off), and the other rows take its style. ``score_scale``
``s`` scales the reference keys seen by the other rows and ``score_shift`` adds to their scores
on the reference tokens (the strength of the reference's attention). ``share_group_norm``
(default, as the reference code's ``StyleAlignedArgs``; its SDXL demos turn it off) also
normalises every row's UNet group norms jointly with its reference's features.

References: Hertz et al. 2024, "Style Aligned Image Generation via Shared Attention" (CVPR),
Sec. 3 (AdaIN of queries and keys, eq. 2-4); google/style-aligned ``sa_handler.py``
(``adain_queries``, ``adain_keys``, ``shared_score_scale``, ``shared_score_shift``).
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch
import torch.nn.functional as F
from torch import Tensor

from retouch.attention.control import AttnCall, Controller
from retouch.attention.sites import Site, Window, in_window

__all__ = ["SharedAttention", "adain"]

EPS = 1e-5  # variance floor of the AdaIN statistics (reference implementation)


def adain(feat: Tensor, ref_of: Tensor) -> Tensor:
    """``(f - mu(f)) / sigma(f) * sigma(f_ref) + mu(f_ref)`` over the token axis; row ``r`` takes
    the statistics of row ``ref_of[r]``. Shapes: feat (B, H, N, d); ref_of (B,) int64."""
    mean = feat.mean(dim=-2, keepdim=True)
    std = (feat.var(dim=-2, keepdim=True) + EPS).sqrt()
    return (feat - mean) / std * std[ref_of] + mean[ref_of]


class SharedAttention(Controller):
    """StyleAligned's shared self-attention (see module doc).

    ``reference``: the batch-layout role of the reference row (the first row of that role in
    each guidance half is the reference of that half). ``start_layer``: first self-attention
    layer shared (0: all, as the reference code). ``steps``: the step window.
    """

    def __init__(
        self,
        *,
        reference: str = "reference",
        adain_queries: bool = True,
        adain_keys: bool = True,
        adain_values: bool = False,
        score_scale: float = 1.0,
        score_shift: float = 0.0,
        start_layer: int = 0,
        steps: Window = (0.0, 1.0),
        halves: Collection[str] = ("uncond", "cond"),
        share_group_norm: bool = True,
    ):
        if not math.isfinite(score_scale) or score_scale <= 0:
            raise ValueError(f"score_scale must be a positive number, got {score_scale}")
        if math.isnan(score_shift) or score_shift == math.inf:
            raise ValueError(f"score_shift must be a number below +inf, got {score_shift}")
        self.reference = reference  # role of the reference row
        self.adain_queries, self.adain_keys, self.adain_values = (
            adain_queries, adain_keys, adain_values)
        self.score_scale = score_scale  # s: the other rows see s K_ref
        self.score_shift = score_shift  # added to the other rows' scores on reference tokens
        self.start_layer = start_layer  # first shared self-attention layer
        self.steps = steps  # step window (fractions)
        self.halves = tuple(halves)  # guidance halves whose rows share (each with its own ref)
        self.uses_probs = score_shift != 0.0  # the shift acts on the probabilities
        self.share_group_norm = share_group_norm  # group norms see the reference's features

    def select(self, site: Site) -> bool:
        return site.kind == "self" and site.layer >= self.start_layer

    def missing_sites_message(self) -> str:
        return f"shared attention wants self-attention layers from {self.start_layer} on"

    def active(self, call: AttnCall) -> bool:
        return in_window(call.step, call.num_steps, self.steps)

    def hooks(self, unet: torch.nn.Module):
        """With ``share_group_norm``, every GroupNorm of the UNet normalises each row jointly
        with its reference row (the statistics of ``[x; x_ref]``), as the reference code's
        ``register_shared_norm``; the reference row sees itself twice, which keeps its own
        statistics. (The reference code's LayerNorm sharing normalises each token over its
        channels, which concatenating tokens does not change: a no-op, left out.)"""
        if not self.share_group_norm:
            return {}

        def shared_norm(norm: torch.nn.GroupNorm):
            def fn(info, out: Tensor, inputs) -> Tensor:
                x = inputs[0]
                ref_of, _ = self._reference_rows(info, x.device)
                joint = torch.cat([x, x[ref_of]], dim=-1)
                y = F.group_norm(joint, norm.num_groups, norm.weight, norm.bias, norm.eps)
                return y[..., : x.shape[-1]]

            return fn

        return {name: shared_norm(m) for name, m in unet.named_modules()
                if isinstance(m, torch.nn.GroupNorm)}

    def _reference_rows(self, call: AttnCall, device) -> tuple[Tensor, Tensor]:
        """``ref_of`` (B,): each row's reference row (itself outside the shared halves), and
        ``is_ref`` (B,): whether a row is its half's reference (or unshared)."""
        layout = call.layout
        ref_of = torch.arange(layout.size, device=device)
        for half in self.halves:
            if half in layout.halves:
                rows = layout.half_rows(half)
                ref_of[rows] = layout.rows(self.reference, half)[0]
        return ref_of, ref_of == torch.arange(layout.size, device=device)

    def qkv(self, call: AttnCall, q: Tensor, k: Tensor, v: Tensor):
        ref_of, is_ref = self._reference_rows(call, q.device)
        if self.adain_queries:
            q = adain(q, ref_of)
        if self.adain_keys:
            k = adain(k, ref_of)
        if self.adain_values:
            v = adain(v, ref_of)
        k_ref = k[ref_of]
        if self.score_scale != 1.0:  # the reference itself keeps an exact copy of its keys
            scale = torch.where(is_ref, 1.0, self.score_scale).to(k.dtype)
            k_ref = k_ref * scale.view(-1, 1, 1, 1)
        self._is_ref = is_ref
        return q, torch.cat([k, k_ref], dim=2), torch.cat([v, v[ref_of]], dim=2)

    def probs(self, call: AttnCall, p: Tensor) -> Tensor:
        # softmax(s + shift on the reference block) = p * e^shift there, renormalised
        own = p.shape[-1] // 2
        gain = torch.ones(p.shape[0], 1, 1, p.shape[-1], dtype=p.dtype, device=p.device)
        gain[~self._is_ref, :, :, own:] = math.exp(self.score_shift)
        p = p * gain
        return p / p.sum(-1, keepdim=True)
