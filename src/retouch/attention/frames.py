"""Keyframe attention for frame sequences: each frame's self-attention reads keyframes' keys and
values instead of (or beside) its own.

The frames of a clip are the rows of one model call (role ``frame``, in order, per guidance
half). At each selected self-attention call, frame ``j`` attends to
``Attention(Q_j, [K_a; K_b; ...], [V_a; V_b; ...])`` over its keyframes:

* ``first`` (Text2Video-Zero, Khachatryan et al. ICCV 2023, Sec. 3.3 "cross-frame attention"):
  the first frame only, ``Attention(Q_j, K_1, V_1)``;
* ``first+previous`` (Pix2Video, Ceylan et al. ICCV 2023, Sec. 3.2 "self-attention feature
  injection"): the first and the previous frame, ``[K_1; K_{j-1}]``;
* ``previous``: the previous frame alone (a chain, for comparison).

The first frame's keyframes are itself (twice where a scheme names two: the softmax average
over two copies of the same tokens is unchanged), so frame 1 is generated exactly as it would be
alone, and a clip of identical frames from identical noise is unchanged by the controller.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import Tensor

from retouch.attention.control import AttnCall, Controller
from retouch.attention.sites import Site, Window, in_window

__all__ = ["KEYFRAME_SCHEMES", "FrameAttention", "keyframe_rows"]

KEYFRAME_SCHEMES = {
    "first": ("first",),  # Text2Video-Zero
    "first+previous": ("first", "previous"),  # Pix2Video
    "previous": ("previous",),
}


def check_scheme(scheme: str) -> None:
    if scheme not in KEYFRAME_SCHEMES:
        raise ValueError(f"unknown keyframe scheme {scheme!r}; choose one of "
                         f"{', '.join(KEYFRAME_SCHEMES)} (or 'none' in the video recipe)")


def keyframe_rows(scheme: str, frames: list[int]) -> list[list[int]]:
    """For each of ``frames`` (model rows in frame order), the rows of its keyframes."""
    check_scheme(scheme)
    pick = {"first": lambda j: frames[0], "previous": lambda j: frames[max(j - 1, 0)]}
    return [[pick[k](j) for k in KEYFRAME_SCHEMES[scheme]] for j in range(len(frames))]


class FrameAttention(Controller):
    """Keyframe self-attention (module doc). ``scheme``: a key of :data:`KEYFRAME_SCHEMES`;
    ``role``: the batch-layout role of the frames; ``start_layer``: first self-attention layer
    controlled; ``steps``: the step window; rows outside ``halves`` or ``role`` keep their own."""

    def __init__(self, scheme: str = "first", *, role: str = "frame", start_layer: int = 0,
                 steps: Window = (0.0, 1.0), halves: Collection[str] = ("uncond", "cond")):
        check_scheme(scheme)
        self.scheme, self.role, self.start_layer = scheme, role, start_layer
        self.steps, self.halves = steps, tuple(halves)

    def select(self, site: Site) -> bool:
        return site.kind == "self" and site.layer >= self.start_layer

    def missing_sites_message(self) -> str:
        return f"keyframe attention wants self-attention layers from {self.start_layer} on"

    def active(self, call: AttnCall) -> bool:
        return in_window(call.step, call.num_steps, self.steps)

    def _sources(self, call: AttnCall, device) -> Tensor:
        """(B, n) model rows whose keys and values each row attends to."""
        layout, n = call.layout, len(KEYFRAME_SCHEMES[self.scheme])
        if self.role not in layout.roles or not set(self.halves) & set(layout.halves):
            raise ValueError(f"keyframe attention acts on {self.role!r} rows of the halves "
                             f"{self.halves}; the batch layout {layout} has none: pass role= "
                             f"and halves= of this batch")
        src = torch.arange(layout.size).unsqueeze(1).repeat(1, n)
        for half in self.halves:
            if half in layout.halves and self.role in layout.roles:
                rows = layout.rows(self.role, half)
                src[rows] = torch.tensor(keyframe_rows(self.scheme, rows))
        return src.to(device)

    def qkv(self, call: AttnCall, q: Tensor, k: Tensor, v: Tensor):
        src = self._sources(call, q.device)  # (B, n)
        b, h, m, d = k.shape

        def gather(t: Tensor) -> Tensor:  # (B, n, H, M, d) -> (B, H, n M, d)
            return t[src].permute(0, 2, 1, 3, 4).reshape(b, h, src.shape[1] * m, d)

        return q, gather(k), gather(v)
