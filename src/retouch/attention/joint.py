"""Attention control on MMDiT joint attention (SD3, Flux): the image tokens' self- and
cross-attention inside one joint call.

An MMDiT block runs one attention over the concatenated image and text tokens (SD3: image
first; Flux: text first, with rotary positions on both, and in its single-stream blocks the
two streams arrive already concatenated, the image tokens being the latent's grid). The
controllers written for UNets act on its two *views*:

* ``"self"``: image queries over image keys. :meth:`Controller.qkv` gets the image tokens'
  ``(q, k, v)`` (B, H, N, d); :meth:`Controller.probs` the image-to-image block of the joint
  probabilities, renormalised over the image keys (B, H, N, N).
* ``"cross"``: image queries over text keys. ``qkv`` gets ``(q_image, k_text, v_text)``;
  ``probs`` the image-to-text block renormalised over the text keys (B, H, N, M): the
  cross-attention maps of an MMDiT (text tokens in the order the model reads them; SD3: the
  CLIP positions first, as the CLIP tokenizer numbers them, then T5's; Flux: T5's). Flux's
  queries and keys reach controllers with their rotary positions applied.

A rewritten block goes back scaled by the share of the joint softmax row it had, so each row
still sums to 1 and the other block is untouched. A self-view controller may append image keys
(StyleAligned's reference tokens); the text keys then keep their share of the softmax (their
scores raised by the log of the ratio, :func:`_text_bias`), so a reference attending to a copy
of its own tokens is computed exactly as alone, as on a UNet. The text queries' probabilities
are never rewritten, but they read the keys and values as the controllers left them: a
controller that gives the target the source's image keys and values changes what its text stream
reads too. Both views of a site run in one :class:`JointControlProcessor`, which follows
diffusers' ``JointAttnProcessor2_0`` step by step (with no controller acting, that processor
itself runs; Flux's sites follow ``FluxAttnProcessor`` likewise). A controller selects a view by
its kind, as on a UNet (:func:`site_views`).

References: Esser et al. 2024 (SD3, MMDiT joint attention); Black Forest Labs 2024 (Flux);
diffusers ``JointAttnProcessor2_0``, ``FluxAttnProcessor``; Hertz et al. 2022
(Prompt-to-Prompt maps).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from retouch.attention.control import AttnCall, Controller
from retouch.attention.sites import Site

__all__ = ["JointControlProcessor", "is_stock_joint"]


def is_stock_joint(processor) -> bool:
    """Whether ``processor`` is diffusers' own weightless joint attention (SD3's or Flux's)."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    return type(processor) in (JointAttnProcessor2_0, FluxAttnProcessor)


def _heads(x: Tensor, heads: int) -> Tensor:
    """(B, N, H d) -> (B, H, N, d)."""
    return x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)


def _renormalised(p: Tensor, image: slice, text: slice, views: dict[str, list],
                  key_image: slice, key_text: slice) -> Tensor:
    """The joint probabilities (B, H, N, K) with the image queries' blocks passed through their
    readers: ``views[kind]`` = [(controller, call)] for "self" (image keys) and "cross" (text
    keys). ``image`` and ``text`` are the two contiguous query ranges, in either order;
    ``key_image`` and ``key_text`` the key ranges (the image's longer when a controller
    appended keys)."""
    rows = p[:, :, image]
    blocks = {}
    for kind, keys in (("self", key_image), ("cross", key_text)):
        part = rows[..., keys]
        if views[kind]:
            mass = part.sum(-1, keepdim=True)  # the block's share of each softmax row
            view = part / mass
            for ctrl, call in views[kind]:
                view = ctrl.probs(call, view)
            part = view * mass
        blocks[kind] = part
    first, second = ("self", "cross") if image.start == 0 else ("cross", "self")
    rows = torch.cat([blocks[first], blocks[second]], -1)
    ordered = [rows, p[:, :, text]] if image.start == 0 else [p[:, :, text], rows]
    return torch.cat(ordered, 2)


def _text_bias(keys: int, text: slice, ratio: float, dtype, device) -> Tensor:
    """An additive score bias (1, 1, 1, keys): ``log(ratio)`` on the text keys, 0 elsewhere.

    A self-view controller that appends image keys (StyleAligned's reference tokens: ``ratio``
    = image keys / image tokens) would otherwise shift every query's softmax mass from the text
    to the image. Raising the text scores by ``log(ratio)`` keeps the text keys' share as it
    was when the appended keys copy the row's own (the reference row is then computed exactly
    as alone, as on a UNet's self-attention) and as it would be for image keys of the same
    scores in general."""
    bias = torch.zeros(1, 1, 1, keys, dtype=dtype, device=device)
    bias[..., text] = torch.log(torch.tensor(ratio, dtype=torch.float64)).item()
    return bias


class JointControlProcessor:
    """The processor installed at one joint site; its controllers act on the site's views.

    SD3 (``JointAttnProcessor2_0``): image tokens first. Flux (``FluxAttnProcessor``): text
    first, rotary positions applied to queries and keys, and in single-stream blocks one input
    holding text then image tokens (the image's are the latent grid's, the rest are text).
    """

    def __init__(self, site: Site, session, previous):
        self.site = site
        self.session = session
        self.previous = previous  # diffusers' processor (runs when no controller is active)
        self.views = session.views_at(site)  # [(controller, view site)]
        if not is_stock_joint(previous):
            raise ValueError(f"attention controllers act at {site.name} only over diffusers' "
                             f"joint attention processors, not a {type(previous).__name__}")
        self.flux = type(previous).__name__ == "FluxAttnProcessor"
        extra = [type(c).__name__ for c, _ in self.views
                 if type(c).output is not Controller.output]
        if extra:
            raise ValueError(f"{', '.join(extra)} adds an attention output term, which joint "
                             f"attention ({site.name}) does not support yet")

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 *args, **kwargs):
        single = self.flux and encoder_hidden_states is None  # Flux's single-stream blocks
        if attention_mask is not None and self.views:
            raise ValueError(f"attention controllers at {self.site.name} do not take an attention "
                             "mask (joint attention is run unmasked by SD3 and Flux pipelines)")
        active = self._active(attn, hidden_states, single) if self.views else []
        if not active or (encoder_hidden_states is None and not single):
            return self.previous(attn, hidden_states, encoder_hidden_states, attention_mask,
                                 *args, **kwargs)
        # Flux's attention passes its rotary embedding positionally, after the mask.
        rotary = args[0] if args else kwargs.get("image_rotary_emb")
        return self._attention(attn, hidden_states, encoder_hidden_states, active, rotary)

    def _image_tokens(self, hidden_states: Tensor, single: bool, info) -> int:
        if not single:
            return hidden_states.shape[1]
        h, w = self.site.grid(info.latent_hw)  # the single stream ends with the image tokens
        return h * w

    def _active(self, attn, hidden_states: Tensor, single: bool):
        info = self.session.require_step(self.site)
        if hidden_states.shape[0] != info.layout.size:
            raise ValueError(
                f"attention call at {self.site.name} has {hidden_states.shape[0]} rows but the "
                f"batch layout {info.layout} has {info.layout.size}")
        n = self._image_tokens(hidden_states, single, info)
        hw = self.site.grid_of(n, info.latent_hw)
        active = []
        for ctrl, view in self.views:
            call = AttnCall(**vars(info), site=view, hw=hw, heads=attn.heads)
            if ctrl.active(call):
                active.append((ctrl, call))
                self.session.record(ctrl)
        return active

    def _project(self, attn, hidden_states, encoder_hidden_states):
        """Queries, keys, values (B, H, N, d) of the image and of the text stream, normed."""
        q, k, v = (_heads(f(hidden_states), attn.heads) for f in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if encoder_hidden_states is None:
            return q, k, v, None
        text = [_heads(f(encoder_hidden_states), attn.heads)
                for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)]
        if attn.norm_added_q is not None:
            text[0] = attn.norm_added_q(text[0])
        if attn.norm_added_k is not None:
            text[1] = attn.norm_added_k(text[1])
        return q, k, v, text

    def _attention(self, attn, hidden_states: Tensor, encoder_hidden_states, active, rotary):
        """diffusers' joint attention with the controllers acting on the image queries."""
        single = encoder_hidden_states is None
        info = active[0][1]
        q, k, v, text = self._project(attn, hidden_states, encoder_hidden_states)
        if single:  # text then image, already one sequence
            n_img = self._image_tokens(hidden_states, True, info)
            n_txt = q.shape[2] - n_img
        else:
            n_img, n_txt = q.shape[2], text[0].shape[2]
            first, second = (text, (q, k, v)) if self.flux else ((q, k, v), text)
            q, k, v = (torch.cat([first[i], second[i]], 2) for i in range(3))
        if rotary is not None:  # Flux: rotary positions over the whole sequence
            from diffusers.models.embeddings import apply_rotary_emb

            q, k = (apply_rotary_emb(x.transpose(1, 2), rotary, sequence_dim=1).transpose(1, 2)
                    for x in (q, k))
        image = slice(n_txt, n_txt + n_img) if self.flux else slice(0, n_img)
        words = slice(0, n_txt) if self.flux else slice(n_img, n_img + n_txt)
        qi, ki, vi, kt, vt = q[:, :, image], k[:, :, image], v[:, :, image], k[:, :, words], (
            v[:, :, words])
        for ctrl, call in active:
            if call.site.kind == "self":
                qi, ki, vi = ctrl.qkv(call, qi, ki, vi)
            else:
                qi, kt, vt = ctrl.qkv(call, qi, kt, vt)
        order = (lambda img, txt: [txt, img]) if self.flux else (lambda img, txt: [img, txt])
        query = torch.cat(order(qi, q[:, :, words]), 2)
        key, value = torch.cat(order(ki, kt), 2), torch.cat(order(vi, vt), 2)
        m_img = ki.shape[2]  # image keys: more than n_img when a controller appended some
        key_image = slice(n_txt, n_txt + m_img) if self.flux else slice(0, m_img)
        key_words = slice(0, n_txt) if self.flux else slice(m_img, m_img + n_txt)
        bias = None
        if m_img != n_img:  # keep the text keys' share: see _text_bias
            bias = _text_bias(key.shape[2], key_words, m_img / n_img, query.dtype, query.device)
        readers = {kind: [(c, call) for c, call in active
                          if c.uses_probs and call.site.kind == kind] for kind in ("self", "cross")}
        if readers["self"] or readers["cross"]:
            # SDPA's scale 1/sqrt(d), at least float32 (float64 stays exact).
            dtype = torch.promote_types(query.dtype, torch.float32)
            scores = (query.to(dtype) @ key.to(dtype).transpose(-1, -2)) * query.shape[-1] ** -0.5
            if bias is not None:
                scores = scores + bias.to(dtype)
            p = _renormalised(scores.softmax(-1), image, words, readers, key_image, key_words)
            out = (p @ value.to(dtype)).to(query.dtype)
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias,
                                                 dropout_p=0.0)
        out = out.transpose(1, 2).reshape(out.shape[0], -1, out.shape[1] * out.shape[-1])
        out = out.to(query.dtype)
        if single:  # Flux's single stream: no output projection here
            return out
        img_out, txt_out = out[:, image], out[:, words]
        if not getattr(attn, "context_pre_only", False):
            txt_out = attn.to_add_out(txt_out)
        img_out = attn.to_out[1](attn.to_out[0](img_out))
        return img_out, txt_out
