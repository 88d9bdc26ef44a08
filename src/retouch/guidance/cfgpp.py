"""CFG++: guidance that stays on the data manifold by renoising with the unconditional noise.

A DDIM step with CFG moves ``x`` to ``alpha' x0_w + sigma' eps_w`` with both parts guided.
CFG++ keeps the guided clean estimate but renoises with the *unconditional* noise:
``x' = alpha' x0_lambda + sigma' eps_u``, ``x0_lambda = x0_u + lambda (x0_c - x0_u)``, with
``lambda`` in [0, 1] (``lambda = 0`` is unconditional DDIM). The guided output is a
:class:`~retouch.denoiser.Prediction` carrying both, and the DDIM step uses its ``eps``.

References: Chung et al. 2024 ("CFG++: Manifold-constrained Classifier Free Guidance for
Diffusion Models", Algorithm 1 (DDIM), Sec. 3).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from retouch.denoiser import Prediction, eps_from_x0
from retouch.guidance.cfg import _branches, as_kwargs, combine

__all__ = ["CFGPlusPlus"]


class CFGPlusPlus:
    """CFG++ (see module doc): ``Prediction(x0 = x0_u + lambda (x0_c - x0_u), eps = eps_u)``."""

    halves = ("uncond", "cond")

    def __init__(self, inner: Callable[..., Tensor], *, cond: Any, uncond: Any, scale: float):
        if not 0.0 <= scale <= 1.0:
            raise ValueError(f"CFG++ takes a guidance scale lambda in [0, 1], got {scale}; "
                             "(CFG's w = 7.5 corresponds to a lambda well below 1)")
        cond, uncond = as_kwargs(cond), as_kwargs(uncond)
        if set(cond) != set(uncond):
            raise ValueError(f"cond keys {sorted(cond)} differ from uncond keys {sorted(uncond)}")
        self.inner, self.schedule = inner, inner.schedule
        self.cond, self.uncond, self.scale = cond, uncond, scale

    def __call__(self, x: Tensor, t: float) -> Prediction:
        x0_u, x0_c = _branches(self.inner, x, t, [self.uncond, self.cond], True)
        return Prediction(x0=combine(x0_u, x0_c, self.scale),
                          eps=eps_from_x0(self.schedule, x, t, x0_u))
