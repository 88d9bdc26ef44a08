"""Regional prompting in the cross-attention: each region's queries read its own sub-prompt.

At every cross-attention site, the conditional rows' queries attend to each region's sub-prompt
(the region's token embeddings through the site's own key and value projections); each query
takes the output of the region it lies in (the region masks resized to the call's query grid),
and the result is mixed with the attention output to the call's own (base) prompt (as any
earlier controller left it): ``out = r out_base + (1 - r) out_regions`` with ``r =
base_ratio``. Queries in no region keep the base output; a query a region covers only in part
(a coarse grid cell on a region's edge) mixes in that share. The unconditional half is
untouched. Masks are given per latent row, so the same controller works on whole images and on
MultiDiffusion's windows (each row a window with its crop of the masks).

References: Yang et al. 2024 (RPG, ICML: complementary regional diffusion, Sec. 3.3, base
ratio); the Regional Prompter extension (per-region attention outputs composed by mask).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from retouch.attention.control import AttnCall, Controller
from retouch.attention.sites import Site
from retouch.checks import finite, finite_tensor

__all__ = ["RegionalPrompting"]


class RegionalPrompting(Controller):
    """``embeds`` (R, L, D): the sub-prompts' token embeddings; ``masks`` (rows, R, h, w): each
    latent row's region weights at latent resolution (rows of one mask broadcast); see the
    module doc."""

    def __init__(self, embeds: Tensor, masks: Tensor, *, base_ratio: float = 0.3):
        finite_tensor("the regional embeddings", embeds)
        if embeds.ndim != 3:
            raise ValueError(f"regional embeddings must be (regions, tokens, dim), got "
                             f"{tuple(embeds.shape)}")
        if masks.ndim != 4 or masks.shape[1] != embeds.shape[0]:
            raise ValueError(f"region masks must be (rows, {embeds.shape[0]}, h, w) for "
                             f"{embeds.shape[0]} sub-prompts, got {tuple(masks.shape)}")
        finite_tensor("the region masks", masks)
        if bool((masks < 0).any()):
            raise ValueError("region masks must be non-negative weights")
        self.embeds, self.masks = embeds, masks.float()
        self.base_ratio = finite("base_ratio", base_ratio, low=0, high=1)

    def select(self, site: Site) -> bool:
        return site.kind == "cross"

    def missing_sites_message(self) -> str:
        return "RegionalPrompting needs cross-attention sites"

    def _region_weights(self, call: AttnCall, rows: int, device) -> Tensor:
        """(rows, R, N) weights of each query's regions at the call's grid, summing to the
        share of the query the regions cover (at most 1)."""
        m = self.masks.to(device)
        if m.shape[0] not in (1, rows):
            raise ValueError(f"region masks for {m.shape[0]} rows, the call has {rows} latent "
                             "rows: give one mask set, or one per row")
        m = F.interpolate(m, size=call.hw, mode="area").expand(rows, -1, -1, -1).flatten(2)
        return m / m.sum(1, keepdim=True).clamp_min(1.0)

    def output(self, call: AttnCall, attn, q: Tensor, out: Tensor) -> Tensor | None:
        rows = torch.tensor(call.layout.half_rows("cond"), device=q.device)
        qc = q[rows]
        e = self.embeds.to(q.device, attn.to_k.weight.dtype)
        if attn.norm_cross:
            e = attn.norm_encoder_hidden_states(e)
        heads, d = attn.heads, q.shape[-1]
        k = attn.to_k(e).view(e.shape[0], -1, heads, d).transpose(1, 2)  # (R, H, L, d)
        v = attn.to_v(e).view(e.shape[0], -1, heads, d).transpose(1, 2)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        w = self._region_weights(call, len(rows), q.device).to(q.dtype)  # (rows, R, N)
        covered = w.sum(1)[:, None, :, None]  # (rows, 1, N, 1): the share regions cover
        regional = sum(
            w[:, r, None, :, None] * F.scaled_dot_product_attention(
                qc, k[r : r + 1].expand(len(rows), -1, -1, -1),
                v[r : r + 1].expand(len(rows), -1, -1, -1))
            for r in range(e.shape[0])
        )
        term = torch.zeros_like(q)
        term[rows] = (1 - self.base_ratio) * (regional - covered * out[rows].to(q.dtype))
        return term
