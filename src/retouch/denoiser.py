"""The one denoiser contract every sampler, inversion and guidance method speaks.

A denoiser is a callable ``denoiser(x, t) -> x0_hat`` with a ``schedule`` attribute:

* ``x``: latents ``x_t = alpha(t) x0 + sigma(t) eps``, shape (B, ...).
* ``t``: model time of ``denoiser.schedule`` (a Python float; see :mod:`retouch.schedules`).
* returns ``x0_hat = E[x0 | x_t]``, same shape and dtype as ``x`` (k-diffusion style).
* ``eps_hat`` is derived, never stored: ``(x - alpha x0_hat) / sigma`` (:func:`eps_from_x0`).

Model adapters (:mod:`retouch.models`) convert eps / v / flow predictions to ``x0`` once.
Conditioning is the denoiser's business: a wrapper denoiser (e.g. :class:`CFGDenoiser`) may
call an inner denoiser with extra keyword arguments (``encoder_hidden_states=...``).

References: Karras et al. 2022 (EDM, "denoiser" D(x; sigma)); Ho & Salimans 2022 (CFG).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from retouch.schedules import Schedule

__all__ = ["Denoiser", "CFGDenoiser", "CountedDenoiser", "eps_from_x0"]


@runtime_checkable
class Denoiser(Protocol):
    """``denoiser(x, t) -> x0_hat``; ``denoiser.schedule`` gives ``alpha(t)``, ``sigma(t)``."""

    schedule: Schedule

    def __call__(self, x: Tensor, t: float) -> Tensor: ...


def eps_from_x0(schedule: Schedule, x: Tensor, t: float, x0_hat: Tensor) -> Tensor:
    """``eps_hat = (x - alpha(t) x0_hat) / sigma(t)``; undefined at a clean time (sigma = 0)."""
    alpha, sigma = schedule.coeffs(t)
    if sigma == 0:
        raise ValueError(f"eps is undefined at clean time t={t} (sigma = 0)")
    return (x - alpha * x0_hat) / sigma


class CountedDenoiser:
    """A denoiser wrapper counting network evaluations in ``calls`` (NFE; a batched CFG pair
    counts once)."""

    def __init__(self, inner: Denoiser):
        self.inner, self.schedule, self.calls = inner, inner.schedule, 0

    def __call__(self, x: Tensor, t: float, **cond: Any) -> Tensor:
        self.calls += 1
        return self.inner(x, t, **cond)


def _cat(a: Any, b: Any) -> Any:
    """Concatenate two conditioning trees (tensors, or dicts of them) along the batch axis."""
    if isinstance(a, Tensor):
        return torch.cat([a, b])
    if isinstance(a, Mapping):
        return {k: _cat(a[k], b[k]) for k in a}
    raise TypeError(f"cannot batch conditioning of type {type(a).__name__}")


def _expand(c: Any, batch: int) -> Any:
    """Repeat a batch-1 conditioning tree to ``batch`` rows (a prompt shared by all latents)."""
    if isinstance(c, Tensor):
        return c.expand(batch, *c.shape[1:]) if c.shape[0] == 1 and batch > 1 else c
    if isinstance(c, Mapping):
        return {k: _expand(v, batch) for k, v in c.items()}
    return c


class CFGDenoiser:
    """Classifier-free guidance: ``x0 = x0_u + w (x0_c - x0_u)``, one batched inner call.

    ``inner(x, t, **cond)`` is a conditional denoiser (e.g. :class:`~retouch.models.UNetDenoiser`
    called with ``encoder_hidden_states=``). Guiding ``x0`` equals guiding ``eps`` or ``v``:
    each is affine in the other with the same ``x``, and the weights sum to one.
    The unconditional half comes FIRST in the batch (as in diffusers' SD pipelines).

    References: Ho & Salimans 2022, eq. 6.
    """

    def __init__(
        self,
        inner: Callable[..., Tensor],
        *,
        cond: Mapping[str, Any],
        uncond: Mapping[str, Any],
        scale: float,
        batched: bool = True,
    ):
        if set(cond) != set(uncond):
            raise ValueError(f"cond keys {sorted(cond)} differ from uncond keys {sorted(uncond)}")
        self.inner = inner
        self.schedule = inner.schedule
        self.cond = dict(cond)  # keyword arguments of the conditional branch
        self.uncond = dict(uncond)  # keyword arguments of the unconditional branch
        self.scale = scale  # guidance weight w; 1 = conditional only, 0 = unconditional only
        self.batched = batched  # one inner call on [uncond; cond] rows (what SD does)

    def __call__(self, x: Tensor, t: float) -> Tensor:
        b = x.shape[0]
        cond = {k: _expand(v, b) for k, v in self.cond.items()}
        uncond = {k: _expand(v, b) for k, v in self.uncond.items()}
        if self.batched:
            both = {k: _cat(uncond[k], cond[k]) for k in cond}
            x0_u, x0_c = self.inner(torch.cat([x, x]), t, **both).chunk(2)
        else:
            x0_u = self.inner(x, t, **uncond)
            x0_c = self.inner(x, t, **cond)
        return x0_u + self.scale * (x0_c - x0_u)
