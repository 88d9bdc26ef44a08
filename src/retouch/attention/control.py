"""One attention processor for every site, routing calls to a stack of controllers.

::

    with attention_control(unet, [store, p2p], layout=BatchLayout(("source", "target"))) as s:
        den = s.denoiser(model.denoiser(prompts, cfg=7.5), times)   # tells s the step and time
        x = sample(den, x, times, callbacks=[s.callback])            # s.callback: local blending

:class:`ControlProcessor` is installed (through diffusers' ``set_attn_processor``) under the
name of every attention module some controller selected, and knows its
:class:`~retouch.attention.sites.Site`; every other module keeps its processor. Per call it reads
the query grid and the row count from the call itself (so controllers work on crops, tiles,
frame batches and any resolution) and asks the site's controllers whether they are active
(step windows). With none active, the processor that was installed before runs unchanged
(diffusers' own, or one with weights such as IP-Adapter's or a LoRA loader's). Otherwise
controllers may rewrite queries/keys/values (:meth:`Controller.qkv`, still SDPA), read and
rewrite the probabilities (:meth:`Controller.probs`, which materialises ``softmax(q k^T /
sqrt(d))`` at that site only), or add an output term (:meth:`Controller.output`, e.g. a
decoupled cross-attention). Where the previous processor is not diffusers' stock one, only
controllers that read (``rewrites = False``) may act: the previous processor computes the output
and the readers see the probabilities computed beside it. The step index and time come from
:meth:`~retouch.attention.session.AttentionSession.denoiser` (:mod:`.session`), a denoiser
wrapper that looks ``t`` up on the sampling grid; nothing counts calls.

References: diffusers ``models/attention_processor.py`` (``AttnProcessor2_0``); Hertz et al. 2022
(Prompt-to-Prompt, controllers over attention).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from retouch.attention.sites import BatchLayout, Site

__all__ = [
    "Controller",
    "StepInfo",
    "AttnCall",
    "ControlProcessor",
]


@dataclass(frozen=True)
class StepInfo:
    """Where the sampling loop is when the model runs."""

    step: int  # index i of the grid time the model is evaluated at
    t: float  # that time
    num_steps: int  # steps of the grid (len(times) - 1)
    layout: BatchLayout  # roles of the rows of the model call
    latent_hw: tuple[int, int]  # spatial size of the latents

    def pair_rows(self, source: str, target: str, halves, device=None) -> tuple[Tensor, Tensor]:
        """Model rows ``(src, tgt)`` (int64) pairing each ``target`` row with the ``source``
        row of its half, over the requested ``halves`` present in the layout."""
        src, tgt = self.layout.pairs(source, target, halves)
        if not tgt:
            raise ValueError(f"the batch layout {self.layout} has none of the halves {halves}")
        return torch.tensor(src, device=device), torch.tensor(tgt, device=device)


@dataclass(frozen=True)
class AttnCall(StepInfo):
    """One attention call: the step, the site and the query grid."""

    site: Site | None = None  # the attention site (None for feature hooks)
    hw: tuple[int, int] = (0, 0)  # query grid (h, w) at this site
    heads: int = 0  # attention heads


class Controller:
    """Base class: a controller reads or rewrites attention at the sites it selects.

    Override :meth:`select` (static choice of sites) or :meth:`bind` (a choice that depends on
    the whole model), :meth:`active` (per call, e.g. a step window), and any of :meth:`qkv`,
    :meth:`probs`, :meth:`after_step`, :meth:`hooks`. Set ``uses_probs = True`` if
    :meth:`probs` must see the attention probabilities.
    """

    uses_probs: bool = False  # materialise softmax(q k^T / sqrt(d)) at active sites
    rewrites: bool = True  # False: only reads (may run beside a processor with weights)

    def select(self, site: Site) -> bool:
        """Whether this controller acts at ``site`` at all (decided once, at installation)."""
        return True

    def bind(self, sites: list[Site]) -> list[Site]:
        """Choose this controller's sites among all the model's ``sites`` (default: those
        passing :meth:`select`). Called once at installation; per-model setup goes here."""
        return [s for s in sites if self.select(s)]

    def active(self, call: AttnCall | StepInfo) -> bool:
        """Whether to act on this call (default: always)."""
        return True

    def qkv(self, call: AttnCall, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Rewrite queries (B, H, N, d), keys and values (B, H, M, d); default: unchanged."""
        return q, k, v

    def probs(self, call: AttnCall, p: Tensor) -> Tensor:
        """Read or rewrite attention probabilities (B, H, N, M); default: unchanged."""
        return p

    def output(self, call: AttnCall, attn, q: Tensor, out: Tensor) -> Tensor | None:
        """An extra attention output (B, H, N, d) added before the output projection (e.g.
        IP-Adapter's decoupled cross-attention, regional prompting); ``out`` is the attention
        output so far (B, H, N, d), with the terms of earlier controllers. Default: none."""
        return None

    def after_step(self, ctx, layout: BatchLayout) -> Tensor | None:
        """Sampling-loop callback after each step (``ctx``: StepContext); may return new x."""
        return None

    def hooks(self, unet: torch.nn.Module) -> dict[str, Callable[..., Tensor]]:
        """Forward hooks by module path of ``unet``: ``fn(info, output, inputs) -> output``
        (``inputs``: the module's positional arguments), e.g. feature injection or a norm
        whose statistics span several rows."""
        return {}

    def missing_sites_message(self) -> str:
        """Why :meth:`select` matched nothing (shown with the model's available sites)."""
        return f"{type(self).__name__} selects no attention site of this model"


def _attend(q, k, v, mask, probs_fn: Callable[[Tensor], Tensor] | None) -> Tensor:
    """``softmax(q k^T / sqrt(d) + mask) v``; through SDPA unless probabilities are needed."""
    if probs_fn is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0)
    # SDPA's default scale 1/sqrt(d), which diffusers' AttnProcessor2_0 relies on too.
    # At least float32 (half precision upcast), never below the input's (float64 stays exact).
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(dtype) @ k.to(dtype).transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else (
            scores + mask.to(dtype)
        )
    p = probs_fn(scores.softmax(-1))
    return (p @ v.to(dtype)).to(q.dtype)


def _is_stock(processor) -> bool:
    """Whether ``processor`` is diffusers' own weightless attention (whose computation the
    controlled path reproduces)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    return type(processor) in (AttnProcessor, AttnProcessor2_0)


class ControlProcessor:
    """The attention processor installed at one site; routes calls to the session's controllers.

    With an active controller it follows diffusers' ``AttnProcessor2_0`` step by step (spatial /
    group norm, projections, q/k norms, output projection, residual, rescale), so that
    controllers that change nothing give the same computation; with none, ``previous`` runs.
    """

    def __init__(self, site: Site, session, previous):  # an AttentionSession (.session)
        self.site = site
        self.session = session
        self.previous = previous  # the processor installed before (runs when none is active)
        self.stock = _is_stock(previous)
        self.controllers = session.controllers_at(site)  # selected at installation
        if not self.stock:
            writers = [type(c).__name__ for c in self.controllers if c.rewrites]
            if writers:
                raise ValueError(
                    f"{', '.join(writers)} rewrites attention at {site.name}, where a "
                    f"{type(previous).__name__} is installed; retouch can combine only "
                    "controllers that read (e.g. AttentionStore) with another processor"
                )

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kwargs):
        active = self._active(attn, hidden_states) if self.controllers else []
        if not active or not self.stock:
            extra = {"temb": temb} if temb is not None else {}
            out = self.previous(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                attention_mask=attention_mask, **extra, **kwargs)
            if active:
                text = encoder_hidden_states
                if isinstance(text, tuple):  # IP-Adapter: (text tokens, [image tokens])
                    text = text[0]
                self._attention(attn, hidden_states, text, attention_mask, temb, active)
            return out
        return self._attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                               active)

    def _attention(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                   active: list[tuple[Controller, AttnCall]]) -> Tensor:
        """diffusers' AttnProcessor2_0 with the active controllers acting inside it."""
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, seq_len, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        call = active[0][1]
        for ctrl, _ in active:
            query, key, value = ctrl.qkv(call, query, key, value)
        readers = [ctrl for ctrl, _ in active if ctrl.uses_probs]

        def probs_fn(p: Tensor) -> Tensor:
            for ctrl in readers:
                p = ctrl.probs(call, p)
            return p

        out = _attend(query, key, value, attention_mask, probs_fn if readers else None)
        for ctrl, _ in active:
            term = ctrl.output(call, attn, query, out)
            if term is not None:
                out = out + term.to(out.dtype)

        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _active(self, attn, hidden_states: Tensor) -> list[tuple[Controller, AttnCall]]:
        """The controllers acting on this call, with the call's rows, grid and step."""
        info = self.session.require_step(self.site)
        rows = hidden_states.shape[0]
        if rows != info.layout.size:
            raise ValueError(
                f"attention call at {self.site.name} has {rows} rows but the batch "
                f"layout {info.layout} has {info.layout.size} (latent rows x guidance halves)"
            )
        n = hidden_states.shape[2] * hidden_states.shape[3] if hidden_states.ndim == 4 else (
            hidden_states.shape[1])
        call = AttnCall(**vars(info), site=self.site, hw=self.site.grid_of(n, info.latent_hw),
                        heads=attn.heads)
        active = [(c, call) for c in self.controllers if c.active(call)]
        for c, _ in active:
            self.session.record(c)
        return active
