"""Analytic ground truth: a Gaussian mixture whose exact denoiser is closed-form.

Data ``x0 ~ sum_k pi_k N(mu_k, diag(c_k))``. For ``x = alpha x0 + sigma eps`` (any schedule,
VP or flow) each component gives ``x | k ~ N(alpha mu_k, alpha^2 c_k + sigma^2)`` and, with
``r_k = (x - alpha mu_k) / (alpha^2 c_k + sigma^2)``,

    E[x0 | x, k] = mu_k + alpha c_k r_k,      E[eps | x, k] = sigma r_k,

mixed with the posterior weights ``w_k(x)``. Both forms stay finite at ``alpha = 0`` (flow
``t = 1``) and at ``sigma = 0`` (clean). The probability-flow ODE is integrated in the flow view
``z = x / (alpha + sigma)``, ``tau = sigma / (alpha + sigma)``: ``dz/dtau = E[eps - x0 | z]``,
which is the same ODE for every schedule (only the start and end noise levels matter).

References: Song et al. 2021 (probability-flow ODE); Karras et al. 2022 (EDM, sec. 2);
Dormand & Prince 1980 (DOP853 via scipy.integrate.solve_ivp).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from retouch.schedules import Schedule, to_prediction

__all__ = ["GaussianMixture", "GMMDenoiser", "ClassConditionalGMM", "reference_solution"]


@dataclass(frozen=True)
class GaussianMixture:
    """Diagonal Gaussian mixture in ``dim`` dimensions (float64 tensors)."""

    means: Tensor  # (K, d) component means mu_k
    variances: Tensor  # (K, d) per-dimension variances c_k > 0
    log_weights: Tensor  # (K,) log pi_k, normalised

    @classmethod
    def random(
        cls,
        *,
        dim: int = 64,
        components: int = 8,
        seed: int = 0,
        mean_scale: float = 0.3,
        std_range: tuple[float, float] = (0.3, 0.8),
    ) -> GaussianMixture:
        """A fixed random mixture: ``mu_k ~ N(0, mean_scale^2 I)``, per-dimension stds
        ``~ U(std_range)``, ``pi_k ~ U(0.5, 1.5)`` normalised. The defaults give modes about
        six stds apart: multimodal, yet smooth enough that solver orders are measurable."""
        g = torch.Generator().manual_seed(seed)
        means = mean_scale * torch.randn(components, dim, generator=g, dtype=torch.float64)
        lo, hi = std_range
        stds = lo + (hi - lo) * torch.rand(components, dim, generator=g, dtype=torch.float64)
        weights = 0.5 + torch.rand(components, generator=g, dtype=torch.float64)
        return cls(means, stds**2, torch.log(weights / weights.sum()))

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws of ``x0``, shape (n, d), float64."""
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.variances[k].sqrt() * z

    def posterior(self, x: Tensor, alpha: float, sigma: float) -> tuple[Tensor, Tensor]:
        """``(E[x0 | x], E[eps | x])`` at ``x = alpha x0 + sigma eps``; x (B, d) float64."""
        var = alpha**2 * self.variances + sigma**2  # (K, d)
        diff = x[:, None, :] - alpha * self.means  # (B, K, d)
        r = diff / var
        logp = self.log_weights - 0.5 * ((diff * r).sum(-1) + var.log().sum(-1))  # (B, K)
        w = torch.softmax(logp, dim=-1)[..., None]
        x0 = (w * (self.means + alpha * self.variances * r)).sum(1)
        eps = (w * (sigma * r)).sum(1)
        return x0, eps


    def log_prob(self, x: Tensor) -> Tensor:
        """``log p(x0)`` of each row of ``x`` (B, d), float64."""
        return torch.logsumexp(self.component_log_probs(x), dim=-1)

    def component_log_probs(self, x: Tensor) -> Tensor:
        """``log pi_k + log N(x; mu_k, c_k)`` per row and component, (B, K)."""
        x = x.to(torch.float64)
        diff = x[:, None, :] - self.means
        quad = (diff**2 / self.variances).sum(-1)
        logdet = self.variances.log().sum(-1)
        return self.log_weights - 0.5 * (quad + logdet + self.dim * math.log(2 * math.pi))

    def subset(self, components) -> GaussianMixture:
        """The mixture of ``components`` only (their weights renormalised)."""
        idx = torch.as_tensor(list(components))
        return GaussianMixture(self.means[idx], self.variances[idx],
                               torch.log_softmax(self.log_weights[idx], 0))


class GMMDenoiser:
    """The exact denoiser ``E[x0 | x_t]`` of a :class:`GaussianMixture` under ``schedule``.

    ``denoiser(x, t) -> x0_hat`` (the retouch contract). :meth:`predict` returns any
    diffusers prediction type to drive diffusers schedulers. ``x`` may be (B, d) or any
    (B, ...) with ``d`` elements per sample; computed in float64, returned in ``x.dtype``.
    """

    def __init__(self, gmm: GaussianMixture, schedule: Schedule):
        self.gmm = gmm
        self.schedule = schedule

    def _posterior(self, x: Tensor, t: float) -> tuple[Tensor, Tensor]:
        alpha, sigma = self.schedule.coeffs(float(t))
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        x0, eps = self.gmm.posterior(flat, alpha, sigma)
        return x0.reshape(x.shape).to(x.dtype), eps.reshape(x.shape).to(x.dtype)

    def __call__(self, x: Tensor, t: float) -> Tensor:
        return self._posterior(x, t)[0]

    def predict(self, x: Tensor, t: float, *, kind: str = "epsilon") -> Tensor:
        """Exact prediction of type ``kind`` (``epsilon``, ``sample``, ``v_prediction``,
        ``flow_prediction``) at model time ``t``, computed without dividing by sigma."""
        x0, eps = self._posterior(x, t)
        alpha, sigma = self.schedule.coeffs(float(t))
        if kind == "epsilon":
            return eps
        if kind == "v_prediction":
            return alpha * eps - sigma * x0
        if kind == "flow_prediction":
            return eps - x0
        return to_prediction(x0, x, alpha, sigma, kind)


def reference_solution(
    gmm: GaussianMixture,
    schedule: Schedule,
    x: Tensor,
    t_start: float,
    t_end: float | None = None,
    *,
    rtol: float = 1e-10,
    atol: float = 1e-10,
    method: str = "DOP853",
) -> Tensor:
    """Solve the probability-flow ODE from ``x`` at ``t_start`` to ``t_end`` (default clean).

    Integrates ``dz/dtau = E[eps | z] - E[x0 | z]`` (alpha = 1 - tau, sigma = tau) in float64
    with scipy's ``solve_ivp`` and returns ``x(t_end)`` in ``x.dtype``; x (B, ...).
    """
    from scipy.integrate import solve_ivp

    t_end = schedule.t_clean if t_end is None else t_end
    alpha0, sigma0 = schedule.coeffs(t_start)
    alpha1, sigma1 = schedule.coeffs(t_end)
    tau0, tau1 = sigma0 / (alpha0 + sigma0), sigma1 / (alpha1 + sigma1)
    shape = x.shape
    z0 = (x.reshape(shape[0], -1).to(torch.float64) / (alpha0 + sigma0)).numpy().ravel()

    def velocity(tau: float, z: np.ndarray) -> np.ndarray:
        zt = torch.from_numpy(z.reshape(shape[0], -1))
        x0, eps = gmm.posterior(zt, 1.0 - tau, tau)
        return (eps - x0).numpy().ravel()

    sol = solve_ivp(velocity, (tau0, tau1), z0, method=method, rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"reference ODE solve failed: {sol.message}")
    z1 = torch.from_numpy(sol.y[:, -1].reshape(shape[0], -1))
    return (z1 * (alpha1 + sigma1)).reshape(shape).to(x.dtype)


class ClassConditionalGMM:
    """An exact class-conditional denoiser: ``D(x, t | label)`` is the denoiser of the mixture's
    ``components`` (the "class") where ``label = 1`` and of the whole mixture (the unconditional
    model) where ``label = 0``; ``label`` (1 or B,) may be fractional (a blend)."""

    def __init__(self, gmm: GaussianMixture, schedule: Schedule, components=(0, 1)):
        self.gmm, self.schedule, self.components = gmm, schedule, tuple(components)
        self.full = GMMDenoiser(gmm, schedule)
        self.part = GMMDenoiser(gmm.subset(self.components), schedule)

    def __call__(self, x: Tensor, t: float, *, label: Tensor) -> Tensor:
        pick = label.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        return pick * self.part(x, t) + (1 - pick) * self.full(x, t)

    def class_probability(self, x0: Tensor) -> Tensor:
        """``p(class | x0)`` under the clean mixture, per row (B,)."""
        logp = self.gmm.component_log_probs(x0.reshape(x0.shape[0], -1))
        return torch.softmax(logp, -1)[:, list(self.components)].sum(-1)
