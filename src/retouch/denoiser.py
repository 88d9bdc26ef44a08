"""The one denoiser contract every sampler, inversion and guidance method speaks.

A denoiser is a callable ``denoiser(x, t) -> x0_hat`` with a ``schedule`` attribute:

* ``x``: latents ``x_t = alpha(t) x0 + sigma(t) eps``, shape (B, ...).
* ``t``: model time of ``denoiser.schedule`` (a Python float; see :mod:`retouch.schedules`).
* returns ``x0_hat = E[x0 | x_t]``, same shape and dtype as ``x`` (k-diffusion style).
* ``eps_hat`` is derived, never stored: ``(x - alpha x0_hat) / sigma`` (:func:`eps_from_x0`).

Model adapters (:mod:`retouch.models`) convert eps / v / flow predictions to ``x0`` once.
Conditioning is the denoiser's business: a wrapper denoiser (guidance, :mod:`retouch.guidance`)
may call an inner denoiser with extra keyword arguments (``encoder_hidden_states=...``).

A guidance method may return a :class:`Prediction` instead of a bare ``x0_hat`` when the step
must renoise with another noise than the one ``x0_hat`` implies (CFG++ renoises with the
unconditional ``eps``). A denoiser that stacks guidance branches in one call says so in its
``halves`` attribute (the row blocks of that call, unconditional first); plain denoisers have
one half, ``("cond",)``.

References: Karras et al. 2022 (EDM, "denoiser" D(x; sigma)); Ho & Salimans 2022 (CFG).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from retouch.schedules import Schedule

__all__ = ["Denoiser", "Prediction", "CountedDenoiser", "eps_from_x0", "halves_of", "x0_of"]


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


@dataclass(frozen=True)
class Prediction:
    """A guided prediction that renoises with its own noise: the step moves ``x`` to
    ``alpha' x0 + sigma' eps`` instead of deriving ``eps`` from ``x0`` (CFG++)."""

    x0: Tensor  # x0_hat, (B, ...)
    eps: Tensor  # the noise the step renoises with, (B, ...)


def x0_of(prediction: Tensor | Prediction) -> Tensor:
    """The ``x0_hat`` of a denoiser's output (a tensor or a :class:`Prediction`)."""
    return prediction.x0 if isinstance(prediction, Prediction) else prediction


def halves_of(denoiser: Any) -> tuple[str, ...]:
    """The guidance halves a denoiser stacks the rows of its model call into (its ``halves``
    attribute, read through wrappers; ``("cond",)`` for a plain denoiser)."""
    halves = getattr(denoiser, "halves", ("cond",))
    if halves is None:
        raise ValueError(
            f"{type(denoiser).__name__} calls the model once per guidance branch, so the rows of "
            "a call change between calls; attention control needs one batched call "
            "(e.g. CFGDenoiser(batched=True))"
        )
    return tuple(halves)


class CountedDenoiser:
    """A denoiser wrapper counting network evaluations in ``calls`` (NFE; a batched CFG pair
    counts once)."""

    def __init__(self, inner: Denoiser):
        self.inner, self.schedule, self.calls = inner, inner.schedule, 0

    @property
    def halves(self) -> tuple[str, ...] | None:
        return getattr(self.inner, "halves", ("cond",))

    def __call__(self, x: Tensor, t: float, **cond: Any) -> Tensor:
        self.calls += 1
        return self.inner(x, t, **cond)


