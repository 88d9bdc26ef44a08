"""Cross-image attention (appearance transfer): the output's queries read the appearance image's
keys and values.

The batch holds three latent rows: ``appearance`` and ``structure`` (real images on their
inversions' trajectories) and ``output`` (starting from the structure's inverted noise). At the
decoder's self-attention layers of the finest resolutions (``windows``: rank 0 is the model's
finest decoder self-attention resolution, 1 the next), within each one's step window, the output
row attends ``Attention(Q_out, K_app, V_app)``; on every ``structure_every``-th step before
``structure_until`` it takes the structure's keys and values instead (the reference code's
periodic structure injection: every 5th of 100 steps; by default here every ``N / 20``-th of
``N`` steps, at least every 2nd). The output's attention probabilities are contrasted,
``clip((A - mean(A)) * contrast + mean(A), 0, 1)`` per query (the paper's eq. 4, sharper
correspondences), and not renormalised, as in the reference. ``enabled`` turns the controller
off for the unswapped half of swap guidance (:func:`retouch.recipes.transfer.appearance_transfer`).

References: Alaluf, Garibi et al. 2024, "Cross-Image Attention for Zero-Shot Appearance
Transfer" (SIGGRAPH), Sec. 4; garibida/cross-image-attention (``config.py``: 64x64 layers at
steps 10-90 of 100, 32x32 at 10-70, contrast 1.67; ``appearance_transfer_model.py``). The
reference's contrast subtracts ``tensor.mean(dim=-1)`` without ``keepdim``, which broadcasts one
query's mean over a key column; here each query's own mean is used, as the paper writes it.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

from torch import Tensor

from retouch.attention.control import AttnCall, Controller
from retouch.attention.sites import Site, Window, check_window, in_window

__all__ = ["CrossImageAttention", "DEFAULT_WINDOWS"]

#: Step windows (fractions) by resolution rank: the finest decoder resolution, then the next.
DEFAULT_WINDOWS = {0: (0.1, 0.9), 1: (0.1, 0.7)}


class CrossImageAttention(Controller):
    """The output row's decoder self-attention reads the appearance row (module doc)."""

    def __init__(self, *, contrast: float = 1.67, windows: Mapping[int, Window] | None = None,
                 structure_every: int | None = None, structure_until: float = 0.4,
                 halves: Collection[str] = ("uncond", "cond")):
        if not math.isfinite(contrast) or contrast <= 0:
            raise ValueError(f"contrast must be a positive number, got {contrast}; 1 is none, "
                             f"the paper uses 1.67")
        if structure_every is not None and (isinstance(structure_every, bool) or
                                            not isinstance(structure_every, int) or
                                            structure_every < 0):
            raise ValueError(f"structure_every must be a whole number >= 0 (0: never), got "
                             f"{structure_every!r}")
        self.contrast = contrast
        self.windows = dict(DEFAULT_WINDOWS if windows is None else windows)
        for rank, window in self.windows.items():
            if not isinstance(rank, int) or rank < 0:
                raise ValueError(f"windows are keyed by resolution rank (0 = finest), got "
                                 f"{rank!r}")
            check_window(window)
        self._factors: dict[int, int] = {}  # downsampling factor -> rank, set by bind
        self.structure_every, self.structure_until = structure_every, structure_until
        self.halves = tuple(halves)
        self.enabled = True
        self.uses_probs = contrast != 1.0  # contrast acts on the probabilities

    def bind(self, sites: list[Site]) -> list[Site]:
        up = sorted({s.factor for s in sites if s.kind == "self" and s.place == "up"})
        self._factors = {f: rank for rank, f in enumerate(up) if rank in self.windows}
        return [s for s in sites if s.kind == "self" and s.place == "up"
                and s.factor in self._factors]

    def missing_sites_message(self) -> str:
        return (f"cross-image attention wants decoder self-attention at resolution ranks "
                f"{sorted(self.windows)} (0 = finest)")

    def window(self, call: AttnCall):
        """The step window of this call's site (None outside the chosen resolutions)."""
        rank = self._factors.get(call.site.factor) if call.site is not None else None
        return None if rank is None else self.windows[rank]

    def active(self, call: AttnCall) -> bool:
        window = self.window(call)
        return self.enabled and window is not None and in_window(call.step, call.num_steps,
                                                                 window)

    def period(self, num_steps: int) -> int:
        """Steps between structure injections (0: never)."""
        if self.structure_every is not None:
            return self.structure_every
        return max(2, round(num_steps / 20))

    def _rows(self, call: AttnCall, role: str) -> list[int]:
        return [r for h in self.halves if h in call.layout.halves
                for r in call.layout.rows(role, h)]

    def qkv(self, call: AttnCall, q: Tensor, k: Tensor, v: Tensor):
        out = self._rows(call, "output")
        period = self.period(call.num_steps)
        structure_step = (period > 0 and call.step % period == 0
                          and call.step < self.structure_until * call.num_steps)
        src = self._rows(call, "structure" if structure_step else "appearance")
        k, v = k.clone(), v.clone()
        k[out], v[out] = k[src], v[src]
        return q, k, v

    def probs(self, call: AttnCall, p: Tensor) -> Tensor:
        if self.contrast == 1.0:
            return p
        out = self._rows(call, "output")
        p = p.clone()
        mean = p[out].mean(-1, keepdim=True)
        p[out] = ((p[out] - mean) * self.contrast + mean).clamp(0.0, 1.0)
        return p
