"""Noise schedules in one continuous-time view, and prediction conversions.

Time grids over these schedules are in :mod:`retouch.grids`.

Every schedule describes ``x_t = alpha(t) * x0 + sigma(t) * eps``. Two families:

* :class:`DiscreteVPSchedule` — Stable Diffusion's discrete variance-preserving schedules.
  **Model time** ``t`` is the UNet's own timestep, ``t in [0, T-1]`` (``T`` =
  ``num_train_timesteps``), with ``alpha(t)^2 = alphas_cumprod[t]`` at integer ``t``. For
  fractional ``t`` the Karras sigma ``s = sigma / alpha = sqrt((1 - abar) / abar)`` is
  interpolated *linearly in t*, exactly as diffusers' ``EulerDiscreteScheduler`` does, so
  Euler/DPM parity holds on fractional grids too. The interval ``[-1, 0)`` extends the same
  rule down to ``s(-1) = 0``: **t = -1 is "fully clean"** (alpha = 1, sigma = 0), which is
  DDIM's ``set_alpha_to_one`` final step and the ``final_sigmas_type="zero"`` step of
  Euler/DPM-Solver/UniPC.
* :class:`FlowSchedule` — rectified flow, ``alpha = 1 - t``, ``sigma = t``, ``t in [0, 1]``;
  ``t = 0`` is clean. diffusers' flow-matching models take ``1000 * t`` as their timestep;
  that mapping lives in the model adapter (:mod:`retouch.models.unet`), not here.

``prediction_type`` is a property of the *model*, not of the schedule: it goes to the model
adapter (``UNetDenoiser(..., prediction_type=scheduler.config.prediction_type)``), which
converts the network output to ``x0`` once with :func:`to_x0`.

References: Ho et al. 2020 (DDPM); Song et al. 2021 (DDIM); Karras et al. 2022 (EDM);
Lu et al. 2022 (DPM-Solver, log-SNR); Liu et al. 2023 (rectified flow);
Lin et al. 2024 ("Common diffusion noise schedules and sample steps are flawed", spacings).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "PREDICTION_TYPES",
    "SCHEDULES",
    "Schedule",
    "DiscreteVPSchedule",
    "FlowSchedule",
    "get_schedule",
    "to_x0",
    "to_eps",
    "to_prediction",
]

#: Prediction types, named as in diffusers' ``scheduler.config.prediction_type``.
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")
#: Names accepted by :func:`get_schedule`.
SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2", "rectified_flow")


def _as_t(t: float | Tensor) -> Tensor:
    return torch.as_tensor(t, dtype=torch.float64).cpu()


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation of ``fp`` over increasing ``xp`` at ``x`` (like np.interp)."""
    idx = torch.searchsorted(xp, x.contiguous(), right=True).clamp(1, len(xp) - 1)
    x_lo, x_hi = xp[idx - 1], xp[idx]
    w = (x - x_lo) / (x_hi - x_lo)
    return fp[idx - 1] + w * (fp[idx] - fp[idx - 1])


class Schedule:
    """Continuous view ``x_t = alpha(t) x0 + sigma(t) eps``; subclasses define ``alpha_sigma``.

    Attributes: ``t_max`` (pure-noise end of the model time range), ``t_clean`` (the time at
    which ``sigma = 0``), ``num_train_timesteps`` (the model's timestep range).
    """

    name: str
    t_max: float
    t_clean: float
    num_train_timesteps: int

    def alpha_sigma(self, t: float | Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(alpha(t), sigma(t))`` as float64 tensors of ``t``'s shape."""
        raise NotImplementedError

    def t_from_k_sigma(self, s: float | Tensor) -> Tensor:
        """Inverse of :meth:`k_sigma`: the model time whose ``sigma / alpha`` equals ``s``."""
        raise NotImplementedError

    def coeffs(self, t: float) -> tuple[float, float]:
        """``(alpha(t), sigma(t))`` as Python floats, for the scalar maths of a solver step."""
        alpha, sigma = self.alpha_sigma(t)
        return float(alpha), float(sigma)

    def k_sigma(self, t: float | Tensor) -> Tensor:
        """Karras/VE noise level ``s = sigma / alpha`` (infinite where ``alpha = 0``)."""
        alpha, sigma = self.alpha_sigma(t)
        return sigma / alpha

    def log_snr(self, t: float | Tensor) -> Tensor:
        """Half log-SNR ``lambda(t) = log(alpha / sigma)`` (Lu et al. 2022); +inf when clean."""
        alpha, sigma = self.alpha_sigma(t)
        return torch.log(alpha) - torch.log(sigma)

    def t_from_log_snr(self, lam: float | Tensor) -> Tensor:
        """Inverse of :meth:`log_snr`."""
        return self.t_from_k_sigma(torch.exp(-_as_t(lam)))

    def _check(self, t: Tensor) -> Tensor:
        lo, hi = min(self.t_clean, self.t_max), max(self.t_clean, self.t_max)
        if not bool(((t >= lo) & (t <= hi)).all()):
            raise ValueError(f"time {t.tolist()} outside [{lo}, {hi}] for schedule {self.name!r}")
        return t

    @staticmethod
    def from_diffusers_config(config: Mapping[str, Any]) -> Schedule:
        """Build the schedule a diffusers scheduler config describes (``scheduler.config``).

        Reads ``beta_schedule``, ``beta_start``, ``beta_end``, ``num_train_timesteps`` and
        ``trained_betas``; a ``FlowMatch*`` config (or ``use_flow_sigmas``) gives
        :class:`FlowSchedule`. ``prediction_type`` is not part of the schedule: pass it to the
        model adapter. Spacing options (``timestep_spacing``, ``steps_offset``, ``shift``) pick
        a time grid: see :func:`discrete_grid`.
        """
        cfg = dict(config)
        flow_class = str(cfg.get("_class_name", "")).startswith("FlowMatch")
        if (
            flow_class
            or cfg.get("use_flow_sigmas")
            or ("shift" in cfg and "beta_schedule" not in cfg)
        ):
            return FlowSchedule(num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)))
        if cfg.get("rescale_betas_zero_snr"):
            raise ValueError(
                "rescale_betas_zero_snr=True is not supported by retouch schedules yet"
            )
        num = int(cfg.get("num_train_timesteps", 1000))
        if cfg.get("trained_betas") is not None:
            return DiscreteVPSchedule.from_betas(
                torch.tensor(cfg["trained_betas"], dtype=torch.float32), name="trained_betas"
            )
        return get_schedule(
            cfg.get("beta_schedule", "linear"),
            num_train_timesteps=num,
            beta_start=float(cfg.get("beta_start", 0.0001)),
            beta_end=float(cfg.get("beta_end", 0.02)),
        )


class DiscreteVPSchedule(Schedule):
    """Discrete VP schedule from ``alphas_cumprod``; model time ``t in [-1, T-1]``, -1 = clean.

    ``alphas_cumprod`` are kept in float64 but computed in float32 exactly as diffusers does,
    so both libraries see bit-identical ``alpha_bar`` values.
    """

    def __init__(self, alphas_cumprod: Tensor, *, name: str = "custom"):
        abar = torch.as_tensor(alphas_cumprod).to(torch.float64).cpu()
        self.name = name
        self.alphas_cumprod = abar
        self.num_train_timesteps = len(abar)
        self.t_max = float(len(abar) - 1)
        self.t_clean = -1.0
        # Tables of the Karras sigma s = sqrt((1 - abar) / abar) on t = -1, 0, ..., T-1.
        self._t_table = torch.arange(-1, len(abar), dtype=torch.float64)
        self._s_table = torch.cat([torch.zeros(1, dtype=torch.float64), ((1 - abar) / abar).sqrt()])

    @classmethod
    def from_betas(cls, betas: Tensor, *, name: str = "custom") -> DiscreteVPSchedule:
        """``alphas_cumprod = cumprod(1 - beta)`` in float32, as diffusers computes it."""
        return cls(torch.cumprod(1.0 - betas.to(torch.float32), dim=0), name=name)

    def k_sigma(self, t: float | Tensor) -> Tensor:
        return _interp(self._check(_as_t(t)), self._t_table, self._s_table)

    def alpha_sigma(self, t: float | Tensor) -> tuple[Tensor, Tensor]:
        s = self.k_sigma(t)
        alpha = torch.rsqrt(1 + s**2)
        return alpha, s * alpha

    def t_from_k_sigma(self, s: float | Tensor) -> Tensor:
        s = _as_t(s)
        if bool((s < 0).any() | (s > self._s_table[-1] * (1 + 1e-12)).any()):
            raise ValueError(f"sigma/alpha {s.tolist()} outside [0, {float(self._s_table[-1])}]")
        return _interp(s, self._s_table, self._t_table)


class FlowSchedule(Schedule):
    """Rectified flow: ``alpha = 1 - t``, ``sigma = t``, ``t in [0, 1]`` (0 = clean)."""

    def __init__(self, *, num_train_timesteps: int = 1000):
        self.name = "rectified_flow"
        self.num_train_timesteps = num_train_timesteps
        self.t_max = 1.0
        self.t_clean = 0.0

    def alpha_sigma(self, t: float | Tensor) -> tuple[Tensor, Tensor]:
        t = self._check(_as_t(t))
        return 1 - t, t

    def t_from_k_sigma(self, s: float | Tensor) -> Tensor:
        s = _as_t(s)
        return torch.where(torch.isinf(s), torch.ones_like(s), s / (1 + s))


def _cosine_betas(num: int, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal 2021 cosine schedule, discretised as diffusers' betas_for_alpha_bar."""

    def abar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - abar((i + 1) / num) / abar(i / num), max_beta) for i in range(num)]
    return torch.tensor(betas, dtype=torch.float32)


def get_schedule(
    name: str,
    *,
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
) -> Schedule:
    """Schedule by name: ``scaled_linear`` (SD: betas = linspace(sqrt b0, sqrt b1)^2),
    ``linear``, ``squaredcos_cap_v2`` (cosine) or ``rectified_flow``.

    Defaults are Stable Diffusion's (beta 0.00085 -> 0.012 over 1000 steps).
    References: Rombach et al. 2022 (LDM); Nichol & Dhariwal 2021 (cosine).
    """
    n = num_train_timesteps
    if name == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
    elif name == "linear":
        betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    elif name == "squaredcos_cap_v2":
        betas = _cosine_betas(n)
    elif name == "rectified_flow":
        return FlowSchedule(num_train_timesteps=n)
    else:
        raise ValueError(f"unknown schedule {name!r}; valid names: {', '.join(SCHEDULES)}")
    return DiscreteVPSchedule.from_betas(betas, name=name)


# --- prediction conversions ---------------------------------------------------------------


def _coef(c: float | Tensor, x: Tensor) -> float | Tensor:
    """Broadcast a scalar or per-sample (B,) coefficient against ``x`` of shape (B, ...)."""
    if isinstance(c, Tensor):
        c = c.to(device=x.device, dtype=x.dtype)
        if c.ndim == 1 and x.ndim > 1:
            c = c.view(-1, *([1] * (x.ndim - 1)))
    return c


def _check_kind(kind: str) -> None:
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {kind!r}; valid: {', '.join(PREDICTION_TYPES)}")


def to_x0(
    pred: Tensor, x: Tensor, alpha: float | Tensor, sigma: float | Tensor, kind: str
) -> Tensor:
    """Convert a model prediction of type ``kind`` at ``x = alpha x0 + sigma eps`` to ``x0``.

    ``v = alpha eps - sigma x0`` (Salimans & Ho 2022) and the flow velocity
    ``u = eps - x0`` (Liu et al. 2023) are inverted for a general (not only VP) schedule.
    Shapes: ``pred``, ``x`` (B, ...); ``alpha``, ``sigma`` scalars or (B,).
    """
    _check_kind(kind)
    a, s = _coef(alpha, x), _coef(sigma, x)
    if kind == "epsilon":
        return (x - s * pred) / a
    if kind == "sample":
        return pred
    if kind == "v_prediction":
        return (a * x - s * pred) / (a * a + s * s)
    return (x - s * pred) / (a + s)


def to_eps(
    pred: Tensor, x: Tensor, alpha: float | Tensor, sigma: float | Tensor, kind: str
) -> Tensor:
    """Convert a prediction of type ``kind`` to ``eps`` (see :func:`to_x0`)."""
    _check_kind(kind)
    a, s = _coef(alpha, x), _coef(sigma, x)
    if kind == "epsilon":
        return pred
    if kind == "sample":
        return (x - a * pred) / s
    if kind == "v_prediction":
        return (s * x + a * pred) / (a * a + s * s)
    return (x + a * pred) / (a + s)


def to_prediction(
    x0: Tensor, x: Tensor, alpha: float | Tensor, sigma: float | Tensor, kind: str
) -> Tensor:
    """Express an ``x0`` estimate at ``x`` as a prediction of type ``kind`` (inverse of to_x0)."""
    _check_kind(kind)
    a, s = _coef(alpha, x), _coef(sigma, x)
    if kind == "sample":
        return x0
    eps = (x - a * x0) / s
    if kind == "epsilon":
        return eps
    if kind == "v_prediction":
        return a * eps - s * x0
    return eps - x0
