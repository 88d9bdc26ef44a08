"""Loss guidance: steer sampling with the gradient of an energy on the model's own estimate.

At each call ``x0_hat = D(x_t, t)`` is computed with gradients, an energy ``E`` (of ``x0_hat``,
or of anything the model computed on the way, e.g. attention maps a controller stored) is
differentiated with respect to ``x_t``, and the prediction moves against it. In score form the
guided score is ``grad log p(x_t) - w grad E``, i.e. ``eps~ = eps + w sigma grad E``, which is

    ``x0~ = x0_hat - w (sigma^2 / alpha) grad_x E``.

The energy sees ``(x0_hat, x_t, t)``; self-guidance and SyncDiffusion are energies.

References: Dhariwal & Nichol 2021 (classifier guidance, eq. 14 in score form);
Epstein et al. 2023 (Diffusion Self-Guidance, eq. 3); Bansal et al. 2023 (universal guidance).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from retouch.denoiser import Prediction, x0_of

__all__ = ["LossGuidance"]


class LossGuidance:
    """``x0~ = x0_hat - w (sigma^2 / alpha) grad_x E(x0_hat, x_t, t)`` around ``inner``.

    ``energy(x0_hat, x, t) -> scalar`` (a sum over the batch); ``scale`` is ``w`` or a function
    ``w(t)`` (0 outside the window it should act in). ``rows``: the latent rows the guidance
    moves (default all; the others keep ``x0_hat``, e.g. an edit's source row). The inner
    denoiser runs with gradients, so use it under ``torch.no_grad()`` freely: this wrapper
    re-enables them for its call. A non-finite guided estimate raises FloatingPointError. At a
    pure-noise time (``alpha = 0``: rectified flow's ``t = 1``) the guided ``x0~`` is undefined
    (``eps = x`` there, whatever the guidance), so that call runs unguided.
    """

    def __init__(self, inner, energy: Callable[[Tensor, Tensor, float], Tensor], *,
                 scale: float | Callable[[float], float], rows: Sequence[int] | None = None):
        self.inner, self.schedule, self.energy = inner, inner.schedule, energy
        self.scale = scale if callable(scale) else (lambda t, w=float(scale): w)
        self.rows = None if rows is None else list(rows)  # latent rows moved (None: all)

    @property
    def halves(self):
        return getattr(self.inner, "halves", ("cond",))

    def __call__(self, x: Tensor, t: float) -> Tensor | Prediction:
        w = float(self.scale(t))
        alpha, sigma = self.schedule.coeffs(t)
        if w == 0.0 or alpha == 0:
            return self.inner(x, t)
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            pred = self.inner(x_in, t)
            x0 = x0_of(pred)
            energy = self.energy(x0, x_in, t)
            if energy.ndim != 0:
                raise ValueError(f"the energy must be a scalar, got shape {tuple(energy.shape)}")
            (grad,) = torch.autograd.grad(energy, [x_in])
        if self.rows is not None:
            keep = torch.ones(grad.shape[0], dtype=torch.bool, device=grad.device)
            keep[self.rows] = False
            grad = grad.masked_fill(keep.view(-1, *[1] * (grad.ndim - 1)), 0.0)
        guided = x0.detach() - w * (sigma**2 / alpha) * grad
        if not torch.isfinite(guided).all():
            raise FloatingPointError(
                f"loss guidance at t={t:g} gave a non-finite estimate (energy "
                f"{float(energy.detach()):.4g}, weight {w:g}): lower the guidance weights")
        if isinstance(pred, Prediction):  # keep the noise the inner guidance renoises with
            return Prediction(x0=guided, eps=pred.eps.detach())
        return guided
