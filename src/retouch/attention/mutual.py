"""Self-attention controllers that let the target read the source: MasaCtrl, Plug-and-Play and
RF-Solver's feature sharing.

* MasaCtrl, :class:`MutualSelfAttention`: after step ``S`` and from layer ``L`` on, the target's
  self-attention queries read the source's keys and values,
  ``Attention(Q*, K, V) = softmax(Q* K^T / sqrt(d)) V`` — the target keeps its own layout (from
  its queries) and takes the source's content. Both CFG halves, each from its own half.
* Plug-and-Play, :class:`PlugAndPlay`: during the first ``tau_A`` of the steps the target's
  decoder self-attention uses the source's queries and keys (``A* <- A``, values stay the
  target's), and during the first ``tau_f`` the residual features of one decoder block are the
  source's (``f*_t <- f_t``), injected through a scoped forward hook.

* RF-Solver's feature sharing, :class:`SharedValues`: during the first steps the target's
  self-attention values are the source's (``V* <- V``; queries and keys stay the target's), in
  the later layers of the network (the reference edits Flux's last single-stream blocks; on a
  UNet, the decoder's self-attention).

All rewrite queries/keys/values, so attention still runs through SDPA (no maps materialised).

References: Cao et al. 2023, "MasaCtrl: Tuning-free mutual self-attention control", Sec. 3.2-3.3
(S = 4, L = 10 of SD1.x's 16 layers); Tumanyan et al. 2023, "Plug-and-Play Diffusion Features",
Sec. 4 (f^4 injection, tau_f = 0.8, self-attention of decoder layers 4-11, tau_A = 0.5);
Wang et al. 2024, "Taming Rectified Flow for Inversion and Editing", Sec. 3.3 (feature
sharing); TencentARC/MasaCtrl; MichalGeyer/pnp-diffusers; wangjiangshan0725/RF-Solver-Edit.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import Tensor

from retouch.attention.control import AttnCall, Controller, StepInfo
from retouch.attention.sites import Site, Window, check_window, in_window

__all__ = ["MutualSelfAttention", "PlugAndPlay", "SharedValues"]


class MutualSelfAttention(Controller):
    """MasaCtrl: target self-attention reads the source's keys and values (see module doc).

    ``start_layer`` counts self-attention layers in forward order (SD1.x has 16, SDXL 70);
    steps ``start_step <= i < end_step`` (``end_step=None``: to the end).
    """

    def __init__(
        self,
        *,
        start_step: int = 4,
        start_layer: int = 10,
        end_step: int | None = None,
        source: str = "source",
        target: str = "target",
        halves: Collection[str] = ("uncond", "cond"),
    ):
        self.start_step = start_step  # S: first controlled step index
        self.start_layer = start_layer  # L: first controlled self-attention layer
        self.end_step = end_step  # first uncontrolled step after S (None: none)
        self.source, self.target = source, target
        self.halves = tuple(halves)  # each half's target reads the same half's source

    def select(self, site: Site) -> bool:
        return site.kind == "self" and site.layer >= self.start_layer

    def missing_sites_message(self) -> str:
        return f"MasaCtrl controls self-attention layers from start_layer={self.start_layer} on"

    def active(self, call: AttnCall) -> bool:
        return self.start_step <= call.step and (self.end_step is None or call.step < self.end_step)

    def qkv(self, call: AttnCall, q: Tensor, k: Tensor, v: Tensor):
        src, tgt = call.pair_rows(self.source, self.target, self.halves, k.device)
        return q, k.index_copy(0, tgt, k[src]), v.index_copy(0, tgt, v[src])


class PlugAndPlay(Controller):
    """Plug-and-Play: inject the source's self-attention (q, k) and decoder features.

    Attention: decoder self-attention layers from ``first_layer`` on (SD1.x: layers 4-11 of the
    decoder = up-block self-attention 1..8) during ``attention_steps``. Features: the output of
    module ``feature_module`` (default the residual branch of SD's 4th decoder block,
    ``up_blocks.1.resnets.1.conv2``) during ``feature_steps``; ``None`` disables it.
    ``source_half=None`` pairs each target row with the source row of its own CFG half (a
    generated source; identical prompts then reproduce the source); ``"uncond"`` feeds both
    target halves from the source's unconditional row, as the reference code, whose source
    branch is an inversion run with the empty prompt.
    """

    def __init__(
        self,
        *,
        attention_steps: Window = 0.5,
        feature_steps: Window = 0.8,
        feature_module: str | None = "up_blocks.1.resnets.1.conv2",
        first_layer: int = 1,
        source: str = "source",
        target: str = "target",
        source_half: str | None = None,
    ):
        self.attention_steps = attention_steps  # tau_A window (fractions of the steps)
        self.feature_steps = feature_steps  # tau_f window
        self.feature_module = feature_module  # module path whose output is injected
        self.first_layer = first_layer  # first decoder self-attention layer injected
        self.source, self.target = source, target
        self.source_half = source_half

    def select(self, site: Site) -> bool:
        return site.kind == "self" and site.place == "up" and site.place_layer >= self.first_layer

    def missing_sites_message(self) -> str:
        return f"PnP injects decoder self-attention from decoder layer {self.first_layer} on"

    def active(self, call: AttnCall | StepInfo) -> bool:
        window = self.attention_steps if isinstance(call, AttnCall) else self.feature_steps
        return in_window(call.step, call.num_steps, window)

    def _rows(self, info: StepInfo, device):
        """(src, tgt): target rows of both halves and the source rows they read."""
        src, tgt = info.pair_rows(self.source, self.target, info.layout.halves, device)
        if self.source_half is not None:
            half = self.source_half if self.source_half in info.layout.halves else "cond"
            src = torch.full_like(tgt, info.layout.rows(self.source, half)[0])
        return src, tgt

    def qkv(self, call: AttnCall, q: Tensor, k: Tensor, v: Tensor):
        src, tgt = self._rows(call, q.device)
        return q.index_copy(0, tgt, q[src]), k.index_copy(0, tgt, k[src]), v

    def hooks(self, unet):
        if self.feature_module is None:
            return {}

        def inject(info: StepInfo, out: Tensor, inputs) -> Tensor:
            src, tgt = self._rows(info, out.device)
            return out.index_copy(0, tgt, out[src])

        return {self.feature_module: inject}


class SharedValues(Controller):
    """RF-Solver feature sharing: the target's self-attention values are the source's during
    ``steps`` (fractions of the steps; a non-empty window covers at least one step), at
    self-attention sites in ``places``. Each CFG half's
    target reads the same half's source, so identical prompts reproduce the source."""

    def __init__(
        self,
        *,
        steps: Window = 0.2,
        places: Collection[str] = ("up",),
        source: str = "source",
        target: str = "target",
    ):
        self.steps = steps  # the injection window (the paper: the first few of 25-30 steps)
        self.places = tuple(places)  # "down", "mid", "up": where values are shared
        self.source, self.target = source, target

    def select(self, site: Site) -> bool:
        return site.kind == "self" and site.place in self.places

    def missing_sites_message(self) -> str:
        return f"feature sharing replaces self-attention values in {', '.join(self.places)}"

    def active(self, call: AttnCall) -> bool:
        # A non-empty window shares at least one step, however few steps there are.
        a, b = check_window(self.steps)
        first = int(a * call.num_steps)
        last = max(int(b * call.num_steps), first + 1) if b > a else first
        return first <= call.step < last

    def qkv(self, call: AttnCall, q: Tensor, k: Tensor, v: Tensor):
        src, tgt = call.pair_rows(self.source, self.target, call.layout.halves, v.device)
        return q, k, v.index_copy(0, tgt, v[src])
