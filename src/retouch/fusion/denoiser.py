"""MultiDiffusion as a denoiser: a canvas's ``x0_hat`` fused from its views' predictions.

:class:`FusedDenoiser` crops every view's window out of the canvas latent, denoises all of them
in one batched call of a view-level denoiser (each row under its view's prompt), and returns the
per-pixel weighted average of the views' ``x0_hat`` (MultiDiffusion, eq. 5). Bar-Tal et al.
average the windows' *stepped* latents; every sampler step is affine in ``x0_hat`` for a given
``x`` and all windows share the canvas's ``x``, so averaging ``x0_hat`` and stepping the canvas
once is the same update, and it works with every sampler of :mod:`retouch.samplers`.
It is exact for single-step and multistep solvers (their history averages alike); Heun's second
evaluation is taken at the canvas's Euler point rather than at each window's own, and a
stochastic step (DDPM) draws one noise for the canvas where averaging windows that each drew
their own would shrink the noise in the overlaps.

Two per-step additions, both in the paper's form:

* **bootstrapping** (region-based generation, Sec. 4.2): during the first steps a view marked
  ``bootstrap`` sees, outside its weight mask, a random constant-colour image noised to the
  current time, so its object forms inside the region;
* **SyncDiffusion** (:class:`~retouch.fusion.sync.SyncDiffusion`): before the step, a gradient
  step on every view's latent toward the anchor view's predicted image; the prediction then
  renoises with the averaged noise of the shifted views (a :class:`~retouch.denoiser.Prediction`,
  so the ddim or ddpm sampler), which is exactly the average of the views' DDIM steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..denoiser import Prediction, eps_from_x0
from ..samplers.state import step_at
from .views import View, coverage

__all__ = ["Bootstrap", "FusedDenoiser"]


@dataclass
class Bootstrap:
    """MultiDiffusion's bootstrapping: for the first ``steps`` steps, views marked
    ``bootstrap`` see ``alpha(t) c + sigma(t) noise`` outside their mask, ``c`` one of the
    constant-colour latents ``backgrounds`` (P, C, h, w), drawn per view and step."""

    steps: int
    backgrounds: Tensor  # (P, C, h, w) latents of constant-colour images
    noise: Tensor  # (B, C, H, W) canvas noise the backgrounds are noised with
    seed: int = 0


class FusedDenoiser:
    """``x0_hat`` of canvas latents (B, C, H, W) fused from ``views`` (see the module doc).

    ``inner`` denoises the stacked windows: row ``v * B + b`` is view ``v`` of canvas ``b``,
    conditioned on that view's prompt. To bound memory, ``inner`` may instead be a list of
    denoisers, each for ``views_per_call`` consecutive views (the last for the rest), called
    one after the other; attention controllers need one call (their batch layout is one call's
    rows). ``times`` is the sampling grid (for the step index of bootstrapping and
    SyncDiffusion).
    """

    def __init__(self, inner, views: Sequence[View], *, canvas_hw: Sequence[int], times,
                 bootstrap: Bootstrap | None = None, sync=None,
                 views_per_call: int | None = None):
        if not views:
            raise ValueError("a fusion needs at least one view; give the canvas's windows")
        sizes = {(v.height, v.width) for v in views}
        if len(sizes) != 1:
            raise ValueError(f"all views must have one window size to batch, got {sorted(sizes)}:"
                             " give every view the model's native window")
        inners = list(inner) if isinstance(inner, (list, tuple)) else [inner]
        self.views_per_call = len(views) if len(inners) == 1 else views_per_call
        if len(inners) > 1 and (views_per_call is None or
                                len(inners) != -(-len(views) // views_per_call)):
            raise ValueError(f"{len(inners)} denoisers for {len(views)} views: give one per "
                             f"{views_per_call} views (views_per_call)")
        self.inners, self.schedule = inners, inners[0].schedule
        self.views, self.canvas_hw = list(views), tuple(int(s) for s in canvas_hw)
        self.total = coverage(self.views, self.canvas_hw)  # (H, W) summed weights
        ts = [float(t) for t in (times.tolist() if isinstance(times, Tensor) else times)]
        self.times = ts
        self.num_steps = len(ts) - 1
        self.bootstrap, self.sync = bootstrap, sync

    @property
    def halves(self):
        return getattr(self.inners[0], "halves", ("cond",))

    # --- windows ---------------------------------------------------------------------------

    def crops(self, x: Tensor) -> Tensor:
        """The views' windows of ``x`` stacked view-major: (V * B, C, h, w)."""
        return torch.cat([x[:, :, v.box[0], v.box[1]] for v in self.views])

    def fold(self, per_view: Tensor, batch: int) -> Tensor:
        """The weighted average over views of a (V * B, C, h, w) tensor, on the canvas."""
        h, w = self.canvas_hw
        out = per_view.new_zeros(batch, per_view.shape[1], h, w)
        for v, part in zip(self.views, per_view.split(batch), strict=True):
            out[:, :, v.box[0], v.box[1]] += v.weights(out.device, out.dtype) * part
        return out / self.total.to(out.device, out.dtype)

    def chunks(self, crops: Tensor, batch: int) -> list[tuple[object, Tensor]]:
        """``(denoiser, its windows)`` for each model call of a step."""
        return list(zip(self.inners, crops.split(self.views_per_call * batch), strict=True))

    def _inner(self, crops: Tensor, t: float, batch: int):
        """The inner denoiser(s) over the stacked windows (V * B, C, h, w)."""
        outs = [den(c, t) for den, c in self.chunks(crops, batch)]
        if isinstance(outs[0], Prediction):
            return Prediction(torch.cat([o.x0 for o in outs]), torch.cat([o.eps for o in outs]))
        return torch.cat(outs)

    def _bootstrapped(self, crops: Tensor, t: float, step: int, batch: int) -> Tensor:
        b = self.bootstrap
        if b is None or step >= b.steps or not any(v.bootstrap for v in self.views):
            return crops
        alpha, sigma = self.schedule.coeffs(t)
        gen = torch.Generator().manual_seed(b.seed * 100_003 + step)
        picks = torch.randint(0, b.backgrounds.shape[0], (len(self.views),), generator=gen)
        parts = list(crops.split(batch))
        for k, v in enumerate(self.views):
            if v.bootstrap:
                w = v.weights(crops.device, crops.dtype)
                m = (w / w.max().clamp_min(1e-12)).clamp(0, 1)  # the mask, whatever its scale
                behind = alpha * b.backgrounds[picks[k]].to(crops) + sigma * (
                    b.noise[:, :, v.box[0], v.box[1]].to(crops))
                parts[k] = m * parts[k] + (1 - m) * behind
        return torch.cat(parts)

    # --- the call --------------------------------------------------------------------------

    def __call__(self, x: Tensor, t: float) -> Tensor | Prediction:
        batch = x.shape[0]
        if tuple(x.shape[-2:]) != self.canvas_hw:
            raise ValueError(f"the latent is {tuple(x.shape[-2:])}, the canvas {self.canvas_hw}: "
                             "sample the canvas latent this fusion was built for")
        step = step_at(self.times, t)  # a solver's midpoint call counts as its step
        if step is None:
            raise ValueError(f"time {t} is not on this fusion's time grid: sample with the "
                             "times it was built with")
        crops = self._bootstrapped(self.crops(x), t, step, batch)
        if self.sync is not None and self.sync.active(step):
            crops = self.sync.shift(self, crops, t, step, batch)
            pred = self._inner(crops, t, batch)
            x0 = pred.x0 if isinstance(pred, Prediction) else pred
            eps = pred.eps if isinstance(pred, Prediction) else eps_from_x0(
                self.schedule, crops, t, x0)
            return Prediction(self.fold(x0, batch), self.fold(eps, batch))
        pred = self._inner(crops, t, batch)
        if isinstance(pred, Prediction):
            return Prediction(self.fold(pred.x0, batch), self.fold(pred.eps, batch))
        return self.fold(pred, batch)
