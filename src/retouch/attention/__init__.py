"""Attention control: one diffusers processor at every site, routing to a stack of controllers.

* :mod:`~retouch.attention.sites` — where a call happens (:class:`Site`) and which batch rows are
  source / target / reference in which CFG half (:class:`BatchLayout`).
* :mod:`~retouch.attention.control` — :class:`Controller`, the processor, and
  :func:`attention_control` (scoped installation; step and time via ``session.denoiser``).
* :mod:`~retouch.attention.maps`, :mod:`~retouch.attention.segment` — map store, heatmaps,
  self-attention segmentation.
* :mod:`~retouch.attention.p2p`, :mod:`~retouch.attention.blend` — Prompt-to-Prompt.
* :mod:`~retouch.attention.mutual` — MasaCtrl and Plug-and-Play.
* :mod:`~retouch.attention.shared` — shared attention across a batch (StyleAligned).
* :mod:`~retouch.attention.cross_image` — cross-image attention (appearance transfer).
* :mod:`~retouch.attention.frames` — keyframe attention across frames (Text2Video-Zero,
  Pix2Video).
"""

from retouch.attention.blend import LocalBlend, local_blend
from retouch.attention.control import AttnCall, Controller, ControlProcessor, StepInfo
from retouch.attention.cross_image import CrossImageAttention
from retouch.attention.frames import KEYFRAME_SCHEMES, FrameAttention
from retouch.attention.maps import (
    AttentionStore,
    MapRecorder,
    resize_maps,
    save_heatmaps,
    token_heatmaps,
)
from retouch.attention.mutual import MutualSelfAttention, PlugAndPlay, SharedValues
from retouch.attention.p2p import (
    CrossAttentionInjection,
    Reweight,
    SelfAttentionInjection,
    refinement,
    reweight,
    word_swap,
)
from retouch.attention.segment import kmeans, label_segments, segment_self_attention
from retouch.attention.session import AttentionSession, ControlledDenoiser, attention_control
from retouch.attention.shared import SharedAttention, adain
from retouch.attention.sites import (
    BatchLayout,
    Site,
    coarse_resolution,
    find_sites,
    guidance_halves,
    in_window,
)
from retouch.attention.tokens import refinement_map, swap_map, token_ids, word_positions

__all__ = [
    "AttentionSession",
    "AttentionStore",
    "AttnCall",
    "BatchLayout",
    "ControlProcessor",
    "ControlledDenoiser",
    "FrameAttention",
    "KEYFRAME_SCHEMES",
    "Controller",
    "CrossAttentionInjection",
    "CrossImageAttention",
    "LocalBlend",
    "MapRecorder",
    "MutualSelfAttention",
    "PlugAndPlay",
    "SharedValues",
    "Reweight",
    "SelfAttentionInjection",
    "SharedAttention",
    "adain",
    "Site",
    "StepInfo",
    "attention_control",
    "coarse_resolution",
    "find_sites",
    "guidance_halves",
    "in_window",
    "kmeans",
    "label_segments",
    "local_blend",
    "refinement",
    "refinement_map",
    "resize_maps",
    "reweight",
    "save_heatmaps",
    "segment_self_attention",
    "swap_map",
    "token_heatmaps",
    "token_ids",
    "word_positions",
    "word_swap",
]
