"""RF-Inversion: inversion and editing by controlled rectified-flow ODEs.

In the flow view (``z = x / (alpha + sigma)``, ``tau`` from 0 = clean to 1 = noise, velocity
``v = (z - x0_hat) / tau``):

* **Inversion** runs the *unconditional* velocity up from the image, pulled towards a fixed
  noise sample ``y1`` with strength ``gamma``: ``dz/dtau = v + gamma (u - v)``, where
  ``u = (y1 - z) / (1 - tau)`` is the straight path's velocity to ``y1``.
* **Reconstruction and editing** run the (guided, prompted) velocity down, pulled towards the
  image ``y0`` with strength ``eta`` from ``eta_start`` to ``eta_end`` of the steps:
  ``dz/dtau = v + eta (u' - v)`` with ``u' = (z - y0) / tau``, which is Euler with ``x0_hat``
  replaced by ``(1 - eta) x0_hat + eta y0``. ``eta`` trades faithfulness to the image against
  the edit.

Not exact: with ``gamma = eta = 0`` it is DDIM (Euler) inversion of the unconditional flow.
Network calls: N to invert, N to reconstruct.

References: Rout et al. 2024, "Semantic Image Inversion and Editing using Rectified Stochastic
Differential Equations" (RF-Inversion), Alg. 1 and 2 (defaults as diffusers' community
pipeline: gamma 0.5, eta 0.9 over the first quarter of the steps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from retouch.denoiser import Denoiser
from retouch.inversion.core import DenoiserFactory, corrections, record_inversion, rows
from retouch.inversion.result import Inversion
from retouch.samplers import SamplerState, flow_view
from retouch.samplers.flow import flow_velocity
from retouch.samplers.state import Window, check_window, in_window

__all__ = ["RFInversionConfig", "invert_rf_inversion", "replay_rf_inversion", "RFInversionStep"]


@dataclass(frozen=True)
class RFInversionConfig:
    """Options of ``rf_inversion``."""

    gamma: float = 0.5  # pull of the inversion towards the noise sample y1 (0: plain Euler)
    eta: float = 0.9  # pull of the reconstruction / edit towards the image y0
    eta_start: float = 0.0  # eta acts from this fraction of the sampling steps ...
    eta_end: float = 0.25  # ... to this one
    seed: int = 0  # seed of the noise sample y1


class RFInversionStep:
    """The controlled Euler step of the reconstruction: ``x0_hat <- (1 - eta) x0_hat + eta y0``
    inside the ``window``; ``y0`` (B, ...) is the image's latent, one row per latent row."""

    __name__ = "rf_inversion_step"

    def __init__(self, y0: Tensor, *, eta: float, window: Window):
        self.y0, self.eta, self.window = y0, float(eta), window

    def __call__(self, denoiser: Denoiser, x: Tensor, t: float, t_next: float, x0_hat: Tensor,
                 state: SamplerState) -> Tensor:
        c, tau = flow_view(denoiser.schedule, t)
        c_n, tau_n = flow_view(denoiser.schedule, t_next)
        if in_window(state.index, len(state.times) - 1, self.window):
            x0_hat = (1 - self.eta) * x0_hat + self.eta * self.y0.to(x0_hat)
        z = x / c
        return c_n * (z + (tau_n - tau) * (z - x0_hat) / tau)


def _check(config: RFInversionConfig) -> None:
    for name in ("gamma", "eta"):
        value = getattr(config, name)
        if not 0 <= value <= 1:
            raise ValueError(f"rf_inversion needs 0 <= {name} <= 1, got {value}")
    check_window((config.eta_start, config.eta_end), "rf_inversion's (eta_start, eta_end)")


@torch.no_grad()
def invert_rf_inversion(factory: DenoiserFactory, x: Tensor, times: Tensor, *, cfg: float,
                        config: RFInversionConfig, progress: bool = True) -> Inversion:
    """The controlled inversion of ``x`` (at ``times[-1]``) with the unconditional velocity;
    the model at the step's start (at its end for the step off the clean time)."""
    _check(config)
    calls0 = factory.calls
    den = factory.branch(factory.uncond) if factory.conditional else factory.denoiser(cfg=1.0)
    y1 = torch.randn(x.shape, generator=torch.Generator().manual_seed(config.seed)).to(x)
    ts = [float(t) for t in times]
    n = len(ts) - 1
    traj: list[Tensor] = [x] * (n + 1)
    for k in tqdm(range(n - 1, -1, -1), desc="invert rf_inversion", disable=not progress,
                  leave=False):
        (c, tau), (c_n, tau_n) = flow_view(den.schedule, ts[k + 1]), flow_view(den.schedule, ts[k])
        z = traj[k + 1] / c
        v = flow_velocity(den, z, ts[k + 1] if tau > 0 else ts[k])
        if tau < 1:  # the pull to y1: u = (y1 - z) / (1 - tau)
            v = v + config.gamma * ((y1 - z) / (1 - tau) - v)
        traj[k] = c_n * (z + (tau_n - tau) * v)
    return record_inversion(factory, "rf_inversion", times, torch.stack(traj), cfg, calls0,
                            config)


def replay_rf_inversion(inv: Inversion, den: Denoiser, *, copies: int, callbacks,
                        progress: bool):
    """Reconstruct (or edit) with the controlled Euler step pulled to the image
    (``trajectory[-1]``), every row to its own image."""
    from retouch.samplers import sample

    o = inv.options
    step = RFInversionStep(rows(inv.trajectory[-1], inv.batch, copies), eta=o["eta"],
                           window=(o["eta_start"], o["eta_end"]))
    return sample(den, rows(inv.trajectory[0], inv.batch, copies), inv.times, step=step,
                  callbacks=[*corrections(inv, copies), *callbacks], progress=progress)
