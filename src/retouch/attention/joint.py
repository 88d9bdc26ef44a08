"""Attention control on MMDiT joint attention (SD3): the image tokens' self- and cross-attention
inside one joint call.

An MMDiT block runs one attention over the concatenated image and text tokens (SD3: image
first). The controllers written for UNets act on its two *views*:

* ``"self"``: image queries over image keys. :meth:`Controller.qkv` gets the image tokens'
  ``(q, k, v)`` (B, H, N, d); :meth:`Controller.probs` the image-to-image block of the joint
  probabilities, renormalised over the image keys (B, H, N, N).
* ``"cross"``: image queries over text keys. ``qkv`` gets ``(q_image, k_text, v_text)``;
  ``probs`` the image-to-text block renormalised over the text keys (B, H, N, M): the
  cross-attention maps of an MMDiT (text tokens in the order the model reads them; SD3: the
  CLIP positions first, as the CLIP tokenizer numbers them, then T5's).

A rewritten block goes back scaled by the share of the joint softmax row it had, so each row
still sums to 1 and the other block is untouched; the text tokens' own attention is never
changed. Both views of a site run in one :class:`JointControlProcessor`, which follows
diffusers' ``JointAttnProcessor2_0`` step by step (with no controller acting, that processor
itself runs). A controller selects a view by its kind, as on a UNet (:func:`site_views`).

References: Esser et al. 2024 (SD3, MMDiT joint attention); diffusers
``JointAttnProcessor2_0``; Hertz et al. 2022 (Prompt-to-Prompt maps).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from retouch.attention.control import AttnCall, Controller
from retouch.attention.sites import Site

__all__ = ["JointControlProcessor", "is_stock_joint"]


def is_stock_joint(processor) -> bool:
    """Whether ``processor`` is diffusers' own weightless joint attention."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    return type(processor) is JointAttnProcessor2_0


def _heads(x: Tensor, heads: int) -> Tensor:
    """(B, N, H d) -> (B, H, N, d)."""
    return x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)


def _renormalised(p: Tensor, n: int, views: dict[str, list]) -> Tensor:
    """The joint probabilities with each image-query block passed through its readers:
    ``views[kind]`` = [(controller, call)] for "self" (keys :n) and "cross" (keys n:)."""
    blocks = []
    for kind, keys in (("self", slice(None, n)), ("cross", slice(n, None))):
        part = p[:, :, :n, keys]
        if views[kind]:
            mass = part.sum(-1, keepdim=True)  # the block's share of each softmax row
            view = part / mass
            for ctrl, call in views[kind]:
                view = ctrl.probs(call, view)
            part = view * mass
        blocks.append(part)
    return torch.cat([torch.cat(blocks, -1), p[:, :, n:]], 2)


class JointControlProcessor:
    """The processor installed at one joint site; its controllers act on the site's views."""

    def __init__(self, site: Site, session, previous):
        self.site = site
        self.session = session
        self.previous = previous  # diffusers' JointAttnProcessor2_0 (runs when none is active)
        self.views = session.views_at(site)  # [(controller, view site)]
        if not is_stock_joint(previous):
            raise ValueError(f"attention controllers act at {site.name} only over diffusers' "
                             f"JointAttnProcessor2_0, not a {type(previous).__name__}")
        extra = [type(c).__name__ for c, _ in self.views
                 if type(c).output is not Controller.output]
        if extra:
            raise ValueError(f"{', '.join(extra)} adds an attention output term, which joint "
                             f"attention ({site.name}) does not support yet")

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 *args, **kwargs):
        active = self._active(attn, hidden_states) if self.views else []
        if not active or encoder_hidden_states is None:
            return self.previous(attn, hidden_states, encoder_hidden_states, attention_mask,
                                 *args, **kwargs)
        return self._attention(attn, hidden_states, encoder_hidden_states, active)

    def _active(self, attn, hidden_states: Tensor) -> list[tuple[Controller, AttnCall]]:
        info = self.session.require_step(self.site)
        if hidden_states.shape[0] != info.layout.size:
            raise ValueError(
                f"attention call at {self.site.name} has {hidden_states.shape[0]} rows but the "
                f"batch layout {info.layout} has {info.layout.size}")
        hw = self.site.grid_of(hidden_states.shape[1], info.latent_hw)
        active = []
        for ctrl, view in self.views:
            call = AttnCall(**vars(info), site=view, hw=hw, heads=attn.heads)
            if ctrl.active(call):
                active.append((ctrl, call))
                self.session.record(ctrl)
        return active

    def _attention(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor,
                   active: list[tuple[Controller, AttnCall]]):
        """diffusers' JointAttnProcessor2_0 with the controllers acting on the image queries."""
        n = hidden_states.shape[1]
        q, k, v = (_heads(f(hidden_states), attn.heads) for f in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        eq, ek, ev = (_heads(f(encoder_hidden_states), attn.heads)
                      for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_added_q is not None:
            eq = attn.norm_added_q(eq)
        if attn.norm_added_k is not None:
            ek = attn.norm_added_k(ek)
        for ctrl, call in active:
            if call.site.kind == "self":
                q, k, v = ctrl.qkv(call, q, k, v)
            else:
                q, ek, ev = ctrl.qkv(call, q, ek, ev)
        query, key, value = torch.cat([q, eq], 2), torch.cat([k, ek], 2), torch.cat([v, ev], 2)
        readers = {kind: [(c, call) for c, call in active
                          if c.uses_probs and call.site.kind == kind] for kind in ("self", "cross")}
        if readers["self"] or readers["cross"]:
            # SDPA's scale 1/sqrt(d), at least float32 (float64 stays exact).
            dtype = torch.promote_types(query.dtype, torch.float32)
            scores = (query.to(dtype) @ key.to(dtype).transpose(-1, -2)) * query.shape[-1] ** -0.5
            p = _renormalised(scores.softmax(-1), n, readers)
            out = (p @ value.to(dtype)).to(query.dtype)
        else:
            out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0)
        out = out.transpose(1, 2).reshape(out.shape[0], -1, out.shape[1] * out.shape[-1])
        out = out.to(query.dtype)
        image, text = out[:, :n], out[:, n:]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        image = attn.to_out[1](attn.to_out[0](image))
        return image, text
