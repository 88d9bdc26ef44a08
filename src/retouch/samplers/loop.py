"""The one sampling loop, the time-grid check and the step functions by name."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from retouch.denoiser import Denoiser, Prediction
from retouch.samplers.flow import FireFlowStep, rf_solver_step
from retouch.samplers.state import HISTORY_LEN, SamplerState, Step, StepContext
from retouch.samplers.steps import (
    ddim_step,
    ddpm_step,
    dpmpp_2m_step,
    dpmpp_3m_step,
    euler_step,
    heun_step,
)

__all__ = ["SAMPLERS", "check_grid", "sample", "get_step"]


def check_grid(times: Sequence[float] | Tensor, *, inverse: bool = False) -> list[float]:
    """Validate a time grid: >= 2 finite times, strictly decreasing (increasing if ``inverse``)."""
    ts = [float(t) for t in (times.tolist() if isinstance(times, Tensor) else times)]
    if len(ts) < 2:
        raise ValueError(f"a time grid needs at least 2 times (NFE >= 1), got {len(ts)}")
    for i, (a, b) in enumerate(zip(ts[:-1], ts[1:], strict=True)):
        if not (math.isfinite(a) and math.isfinite(b)):
            raise ValueError(f"non-finite time at grid index {i}: {a} -> {b}")
        if (b <= a) if inverse else (b >= a):
            word = "increasing (inversion)" if inverse else "decreasing (sampling)"
            raise ValueError(
                f"time grid must be strictly {word}; times[{i}]={a}, times[{i + 1}]={b}"
            )
    return ts


def sample(
    denoiser: Denoiser,
    x: Tensor,
    times: Sequence[float] | Tensor,
    *,
    step: Step = ddim_step,
    callbacks: Sequence[Callable[[StepContext], Tensor | None]] = (),
    progress: bool = True,
    inverse: bool = False,
    noises: Sequence[Tensor | None] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Run ``step`` along ``times`` from ``x`` at ``times[0]``; return ``x`` at ``times[-1]``.

    Each step: ``x0_hat = denoiser(x, t_i)`` (or ``step.predict(denoiser, x, t_i, state)`` when
    the step has one), ``x = step(...)``, then every callback sees a
    :class:`StepContext` and may return a new ``x`` (or None). ``inverse=True`` runs time
    upwards (deterministic steps only). ``noises[i]`` (if given) is the noise a stochastic
    step injects at step i (edit-friendly DDPM); otherwise it is drawn from ``generator`` and
    shown to callbacks as ``ctx.noise``. Raises FloatingPointError naming the step if the
    latent becomes non-finite. Shapes: x (B, ...).
    """
    ts = check_grid(times, inverse=inverse)
    if noises is not None and len(noises) != len(ts) - 1:
        raise ValueError(f"noises has {len(noises)} entries for {len(ts) - 1} steps")
    if not _finite(x):
        raise ValueError("the start latent holds NaN or Inf values; pass finite values")
    state = SamplerState(times=ts, generator=generator, noises=noises)
    # A step may supply its own prediction at (x, t) (FireFlow reuses a velocity).
    own = getattr(getattr(step, "func", step), "predict", None)
    predict = own if own is not None else (lambda den, x, t, state: den(x, t))
    for i in tqdm(range(len(ts) - 1), disable=not progress, desc="sampling", leave=False):
        t, t_next = ts[i], ts[i + 1]
        where = f"at step {i} (t={t:g} -> {t_next:g})"
        state.index, state.noise = i, None
        x0_hat, state.renoise = _split(predict(denoiser, x, t, state), step)
        if not _finite(x0_hat):
            raise FloatingPointError(f"the denoiser returned NaN or Inf {where}: check the model "
                                     "weights and the guidance scale")
        x_next = step(denoiser, x, t, t_next, x0_hat, state)
        if not _finite(x_next):
            raise FloatingPointError(f"the {_name(step)} step produced NaN or Inf {where}")
        state.history = [*state.history[-(HISTORY_LEN - 1) :], (t, x0_hat)]
        ctx = StepContext(i, t, t_next, x_next, x, x0_hat, state.noise, denoiser)
        for callback in callbacks:
            out = callback(ctx)
            if out is not None:
                if not _finite(out):
                    raise FloatingPointError(f"the callback {_name(callback)} returned NaN or "
                                             f"Inf {where}")
                ctx.x = out
        x = ctx.x
    return x


def _split(prediction: Tensor | Prediction, step: Step) -> tuple[Tensor, Tensor | None]:
    """``(x0_hat, eps to renoise with or None)``; a Prediction needs a step that renoises."""
    if not isinstance(prediction, Prediction):
        return prediction, None
    if not getattr(getattr(step, "func", step), "renoises", False):
        raise ValueError(f"this guidance (e.g. CFG++) renoises with its own eps, which the "
                         f"{_name(step)} step cannot take; use the ddim or ddpm sampler")
    return prediction.x0, prediction.eps


def _finite(x: Tensor) -> bool:
    return bool(torch.isfinite(x).all())


def _name(fn: Any) -> str:
    """A readable name of a step function or callback (partials and bound methods too)."""
    fn = getattr(fn, "func", fn)
    return getattr(fn, "__name__", None) or type(fn).__name__


def _unipc() -> Step:
    from retouch.samplers.unipc import unipc_step

    return unipc_step


#: Step functions by name (``unipc`` lives in :mod:`retouch.samplers.unipc`).
SAMPLERS: dict[str, Callable[[], Step]] = {
    "ddim": lambda: ddim_step,
    "ddpm": lambda: ddpm_step,
    "euler": lambda: euler_step,
    "heun": lambda: heun_step,
    "dpmpp_2m": lambda: dpmpp_2m_step,
    "dpmpp_3m": lambda: dpmpp_3m_step,
    "unipc": _unipc,
    "rf_solver": lambda: rf_solver_step,
    "fireflow": FireFlowStep,
}


def get_step(name: str, **options: Any) -> Step:
    """Step function by name, with keyword options bound (``get_step("ddim", eta=1.0)``)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid names: {', '.join(SAMPLERS)}")
    fn = SAMPLERS[name]()
    return partial(fn, **options) if options else fn
