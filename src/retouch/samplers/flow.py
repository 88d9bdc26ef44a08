"""Second-order solvers of the rectified-flow ODE: RF-Solver (midpoint) and FireFlow.

Both work in the flow view of any schedule (:func:`flow_view`): ``z = x / (alpha + sigma) =
(1 - tau) x0 + tau eps`` moves along ``dz/dtau = v``, with the velocity ``v = eps - x0 =
(z - x0_hat) / tau``. For a rectified-flow model (``alpha = 1 - t``, ``sigma = t``) this is the
model's own velocity and ``tau = t``; a VP model's probability-flow ODE is the same ODE in these
coordinates, so the solvers serve every family.

* **RF-Solver** (Wang et al. 2024, "Taming Rectified Flow for Inversion and Editing", eq. 8):
  ``z' = z + h v + h^2/2 v'``, with ``v'`` the finite difference of ``v`` over a half step
  ``z_m = z + h/2 v``. Written out, ``h v + h^2/2 (v_m - v)/(h/2) = h v_m``: the explicit
  midpoint rule, two network calls per step, second order.
* **FireFlow** (Deng et al. 2024, "FireFlow: Fast Inversion of Rectified Flow", Alg. 1): the
  same midpoint step, but the half step uses the *previous step's midpoint velocity* instead of
  a fresh ``v(z, tau)``; one network call per step after the first (which calls twice).

Both run with time going either way (``t_next > t`` is inversion); neither is exact.
"""

from __future__ import annotations

from torch import Tensor

from retouch.denoiser import Denoiser
from retouch.samplers.state import SamplerState
from retouch.schedules import Schedule

__all__ = ["flow_view", "time_at_tau", "flow_velocity", "midpoint_velocity", "rf_solver_step",
           "FireFlowStep"]

_VELOCITY = "fireflow.velocity"  # scratch key: (t it is reused at, the midpoint velocity)


def flow_view(schedule: Schedule, t: float) -> tuple[float, float]:
    """``(c, tau)`` with ``z = x / c = (1 - tau) x0 + tau eps`` at model time ``t``."""
    alpha, sigma = schedule.coeffs(t)
    return alpha + sigma, sigma / (alpha + sigma)


def time_at_tau(schedule: Schedule, tau: float) -> float:
    """The model time whose flow time is ``tau`` (0 < tau < 1)."""
    return float(schedule.t_from_k_sigma(tau / (1.0 - tau)))


def flow_velocity(denoiser: Denoiser, z: Tensor, t: float) -> Tensor:
    """The model's velocity ``v = (z - x0_hat) / tau`` at flow point ``z`` and model time ``t``
    (one denoiser call, on ``x = (alpha + sigma) z``). Shapes: z (B, ...)."""
    c, tau = flow_view(denoiser.schedule, t)
    return (z - denoiser(c * z, t)) / tau


def midpoint_velocity(
    denoiser: Denoiser, z: Tensor, tau: float, tau_n: float, v: Tensor
) -> Tensor:
    """The model's velocity at the midpoint ``(z + h/2 v, tau + h/2)``, ``h = tau_n - tau``
    (one denoiser call). Shapes: z, v (B, ...)."""
    tau_m = 0.5 * (tau + tau_n)
    return flow_velocity(denoiser, z + (tau_m - tau) * v, time_at_tau(denoiser.schedule, tau_m))


def rf_solver_step(
    denoiser: Denoiser, x: Tensor, t: float, t_next: float, x0_hat: Tensor, state: SamplerState
) -> Tensor:
    """RF-Solver-2: ``z' = z + h v(z_m, tau_m)``, ``z_m = z + h/2 v(z, tau)`` (flow view).

    Costs a second denoiser call at the midpoint time (2 NFE per step). Shapes: x (B, ...).
    References: Wang et al. 2024, "Taming Rectified Flow for Inversion and Editing", eq. 8.
    """
    return _midpoint_step(denoiser, x, t, t_next, x0_hat)[0]


def _midpoint_step(denoiser, x, t, t_next, x0_hat) -> tuple[Tensor, Tensor]:
    """``(x', v_m)``: the midpoint step from ``(x, t)`` whose half step takes the velocity
    ``x0_hat`` implies there, and the midpoint velocity it used."""
    c, tau = flow_view(denoiser.schedule, t)
    c_n, tau_n = flow_view(denoiser.schedule, t_next)
    if tau == 0:
        raise ValueError(f"cannot take the velocity at clean time t={t} (sigma = 0)")
    z = x / c
    v_m = midpoint_velocity(denoiser, z, tau, tau_n, (z - x0_hat) / tau)
    return c_n * (z + (tau_n - tau) * v_m), v_m


class FireFlowStep:
    """FireFlow: the midpoint step whose half step reuses the last midpoint velocity.

    ``predict`` (called by the sampling loop instead of the denoiser) returns the ``x0_hat``
    that the reused velocity implies at ``(x, t)``, so a step after the first costs one call.
    The first step (or one whose start is not the previous step's end) calls the model twice.
    Shapes: x (B, ...). References: Deng et al. 2024, "FireFlow", Alg. 1.
    """

    __name__ = "fireflow_step"

    def predict(self, denoiser: Denoiser, x: Tensor, t: float, state: SamplerState) -> Tensor:
        reused = state.scratch.get(_VELOCITY)
        if reused is None or reused[0] != t or reused[1].shape != x.shape:
            return denoiser(x, t)
        c, tau = flow_view(denoiser.schedule, t)
        return x / c - tau * reused[1]  # x0 = z - tau v

    def __call__(
        self, denoiser: Denoiser, x: Tensor, t: float, t_next: float, x0_hat: Tensor,
        state: SamplerState,
    ) -> Tensor:
        x_next, v_m = _midpoint_step(denoiser, x, t, t_next, x0_hat)
        state.scratch[_VELOCITY] = (t_next, v_m)  # the next step's half step reuses it
        return x_next
