"""What the sampling loop owns and shows: the per-run state every step function receives,
the context callbacks see, and the helpers multistep solvers share."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from retouch.denoiser import Denoiser

__all__ = ["LOWER_ORDER_FINAL_STEPS", "HISTORY_LEN", "SamplerState", "StepContext", "Step",
           "log_snr_at", "usable_history", "step_at", "Window", "check_window", "in_window"]

#: A window of sampling steps as fractions: ``e`` means ``(0, e)``; ``(a, b)`` the steps
#: ``int(a N) <= i < int(b N)`` of N (Prompt-to-Prompt's injection schedules).
Window = float | tuple[float, float]

#: diffusers' DPM-Solver/UniPC ``lower_order_final`` applies below this many steps.
LOWER_ORDER_FINAL_STEPS = 15
#: How many past ``(t, x0_hat)`` pairs the loop keeps for multistep solvers.
HISTORY_LEN = 3


@dataclass
class SamplerState:
    """Per-run memory the loop owns and passes to every step."""

    times: list[float]  # the whole time grid, t_0 ... t_N
    index: int = 0  # current step i (from times[i] to times[i + 1])
    history: list[tuple[float, Tensor]] = field(default_factory=list)  # past (t_j, x0_hat_j)
    generator: torch.Generator | None = None  # randomness of stochastic steps
    noises: Sequence[Tensor | None] | None = None  # caller-supplied noise per step, or None
    noise: Tensor | None = None  # noise the current step injected (set by stochastic steps)
    renoise: Tensor | None = None  # eps the step must renoise with (a guided Prediction's)
    scratch: dict[str, Any] = field(default_factory=dict)  # a step function's own memory

    @property
    def steps_left(self) -> int:
        """Steps remaining including the current one."""
        return len(self.times) - 1 - self.index

    def draw_noise(self, like: Tensor) -> Tensor:
        """The supplied noise for this step, else ``N(0, I)`` from ``generator``; recorded."""
        z = self.noises[self.index] if self.noises is not None else None
        if z is None:
            z = torch.randn(like.shape, generator=self.generator, dtype=like.dtype, device="cpu")
        self.noise = z.to(device=like.device, dtype=like.dtype)
        return self.noise


@dataclass
class StepContext:
    """What a callback sees after step ``i``; it may return a replacement for ``x``."""

    i: int  # step index
    t: float  # time the model was evaluated at
    t_next: float  # time of ``x``
    x: Tensor  # latent after the step (at t_next), shape (B, ...)
    x_prev: Tensor  # latent the model saw (at t)
    x0_hat: Tensor  # denoiser output at (x_prev, t)
    noise: Tensor | None  # noise injected by a stochastic step, else None
    denoiser: Denoiser

    @property
    def eps_hat(self) -> Tensor:
        """The model output in eps form, ``(x_prev - alpha x0_hat) / sigma``."""
        alpha, sigma = self.denoiser.schedule.coeffs(self.t)
        return (self.x_prev - alpha * self.x0_hat) / sigma


Step = Callable[[Denoiser, Tensor, float, float, Tensor, SamplerState], Tensor]


def log_snr_at(denoiser: Denoiser, t: float) -> float:
    return float(denoiser.schedule.log_snr(t))



def usable_history(denoiser: Denoiser, history: list, lam: float, k: int) -> list:
    """Up to ``k`` most recent ``(lambda_j, x0_hat_j)`` of ``history``, newest first, while the
    log-SNR gaps to ``lam`` stay finite and non-zero."""
    out = []
    for t_j, x0_j in reversed(history[-k:] if k > 0 else []):
        lam_j = log_snr_at(denoiser, t_j)
        if not (math.isfinite(lam_j) and math.isfinite(lam) and lam_j != lam):
            break
        out.append((lam_j, x0_j))
    return out


def step_at(times: Sequence[float], t: float) -> int | None:
    """The step of a grid ``times`` that model time ``t`` belongs to: its index on the grid, or
    the step whose interval holds it (a solver's in-between call: Heun's ``t'`` is the next
    step's, RF-Solver's and FireFlow's midpoints their own step's); None off the grid."""
    t = float(t)
    for i, ti in enumerate(times):
        if float(ti) == t:
            return i
    for i in range(len(times) - 1):
        a, b = float(times[i]), float(times[i + 1])
        if min(a, b) < t < max(a, b):
            return i
    return None


def check_window(window: Window, name: str = "a step window") -> tuple[float, float]:
    """``window`` as ``(start, end)``; refused unless ``0 <= start <= end <= 1`` (fractions of
    the steps; a number ``e`` means ``(0, e)``)."""
    pair = (0.0, window) if isinstance(window, int | float) else window
    ok = (not isinstance(window, bool) and isinstance(pair, tuple | list) and len(pair) == 2
          and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                  for v in pair))
    if not ok or not 0 <= pair[0] <= pair[1] <= 1:
        raise ValueError(f"{name} must be a fraction of the steps, e or (start, end) with "
                         f"0 <= start <= end <= 1, got {window!r}")
    return float(pair[0]), float(pair[1])


def in_window(step: int, num_steps: int, window: Window) -> bool:
    """Whether step ``step`` of ``num_steps`` lies in ``window`` (fractions of the steps).

    ``0.8`` means ``(0, 0.8)``; ``(a, b)`` covers steps ``int(a N) <= i < int(b N)``, as
    Prompt-to-Prompt's injection schedules.
    """
    a, b = check_window(window)
    return int(a * num_steps) <= step < int(b * num_steps)
