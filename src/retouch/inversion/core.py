"""What every inversion method shares: the model factory, fingerprints, and DDIM run upwards.

**Time and indices.** An inversion works on the *sampling* grid ``t_0 > t_1 > ... > t_N``
(``t_N`` the final, usually clean, time) and its trajectory is stored in sampling order:
``x_k`` is the latent at ``t_k``, ``x_N`` the input latent, ``x_0`` where reconstruction starts.
An inversion step goes from ``t_{k+1}`` up to ``t_k`` and evaluates the model at the **target**
time ``t_k`` (on the latent it has, ``x_{k+1}``) -- the convention of diffusers'
``DDIMInverseScheduler`` and of the null-text / EDICT reference code. It is the one that can
leave a clean time: the model is evaluated only at ``t_0 ... t_{N-1}``, the times the sampler
will evaluate it at when reconstructing.

**Which prediction is held.** A DDIM step keeps ``(x0_hat, eps_hat)`` fixed while it moves
``x = alpha x0_hat + sigma eps_hat`` from ``t`` to ``t'``. Run upwards with a prediction made at
the target time, part of it must be re-derived at the current latent ``x``; ``hold`` names the
part that is kept, and the step is then :func:`retouch.samplers.ddim_step` with time running up:

* ``"eps"`` (default for discrete VP): diffusers' ``DDIMInverseScheduler`` and the papers'
  code. Its error coefficient grows like ``h / alpha``, so near ``alpha = 0`` (rectified flow
  at ``t = 1``) it is poor; at a pure-noise target ``eps_hat`` is the input itself and ``x0_hat``
  is kept instead.
* ``"velocity"`` (default for rectified flow): keep the flow velocity ``eps - x0`` of the view
  ``z = x / (alpha + sigma) = (1 - tau) x0 + tau eps``: Euler in ``tau``, first order all the
  way from clean to pure noise.
* ``"x0"``: keep ``x0_hat``; cannot leave a clean time.

``"eps"`` and ``"velocity"`` leave a clean time (``x0 = x`` there) by the DDIM formula itself.

References: Song et al. 2021 (DDIM, eq. 13 as an ODE run backwards); Dhariwal & Nichol 2021
(DDIM inversion for editing); diffusers ``DDIMInverseScheduler``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from retouch.denoiser import CountedDenoiser, Denoiser, eps_from_x0
from retouch.grids import discrete_grid, uniform_grid
from retouch.guidance import CFGDenoiser, as_kwargs
from retouch.inversion.result import Inversion
from retouch.samplers import SamplerState, ddim_step
from retouch.schedules import DiscreteVPSchedule, Schedule

__all__ = [
    "MethodRefused",
    "DenoiserFactory",
    "embeds_of",
    "with_embeds",
    "rows",
    "stack",
    "model_fingerprint",
    "default_grid",
    "predict",
    "ddim_eps_step",
    "inverse_ddim_step",
    "default_hold",
    "step_state",
    "HOLDS",
    "record_inversion",
]

#: What an inversion step keeps of the model's prediction at the target time.
HOLDS = ("eps", "x0", "velocity")


class MethodRefused(ValueError):
    """An inversion method this model cannot run (e.g. EDICT on a rectified-flow grid), refused
    before any work, with the reason and what to use instead."""


class _Bound:
    """The conditional denoiser for one conditioning: ``x0_hat(x, t | c)``."""

    def __init__(self, inner: CountedDenoiser, cond: Any):
        self.inner, self.cond, self.schedule = inner, cond, inner.schedule

    def __call__(self, x: Tensor, t: float) -> Tensor:
        if self.cond is None:
            return self.inner(x, t)
        return self.inner(x, t, **as_kwargs(self.cond))


def embeds_of(cond: Any) -> Tensor:
    """The token embeddings (B, L, D) of a conditioning (a tensor is its own)."""
    return cond if isinstance(cond, Tensor) else cond.embeds


def with_embeds(cond: Any, embeds: Tensor) -> Any:
    """``cond`` with other token embeddings (a tensor conditioning is replaced)."""
    return embeds if isinstance(cond, Tensor) else cond.with_embeds(embeds)


def rows(cond: Any, b: int, copies: int = 1) -> Any:
    """A (1 or b)-row conditioning (tensor or typed) as ``copies`` stacked blocks of b rows."""
    if isinstance(cond, Tensor):
        if cond.shape[0] not in (1, b):
            raise ValueError(f"a conditioning of {cond.shape[0]} rows for {b} latent rows; "
                             "pass one row or one per latent")
        e = cond.expand(b, *cond.shape[1:]) if cond.shape[0] == 1 else cond
        return torch.cat([e] * copies) if copies > 1 else e
    return cond.expand(b).repeat(copies)


def stack(conds: list[Any]) -> Any:
    """Conditionings (tensors or typed) stacked along the batch."""
    return torch.cat(conds) if isinstance(conds[0], Tensor) else type(conds[0]).cat(conds)


class DenoiserFactory:
    """Makes the denoisers an inversion needs from one text-conditional network.

    ``inner(x, t, cond=C) -> x0_hat`` (e.g. a model adapter's
    :class:`~retouch.models.UNetDenoiser`); ``cond`` is the source prompt's conditioning ``c``
    and ``uncond`` the empty prompt's ``∅``, each with 1 or B rows: a
    :class:`~retouch.models.conditioning.Conditioning`, or a bare (1 or B, L, D) embedding for
    a network that takes ``encoder_hidden_states=``. A plain denoiser (no conditioning, e.g.
    the analytic GMM) is accepted too; it supports ``cfg = 1`` only. Counts network
    evaluations in :attr:`calls`.
    """

    def __init__(
        self,
        inner: Callable[..., Tensor],
        *,
        cond: Any = None,
        uncond: Any = None,
        fingerprint: str | None = None,
        time_grid: Callable[[int], Tensor] | None = None,
        embed_guidance: Callable[[Any, float], Any] | None = None,
    ):
        if (cond is None) != (uncond is None):
            raise ValueError("give both cond and uncond conditionings, or neither")
        self.inner = CountedDenoiser(inner)
        self.schedule: Schedule = inner.schedule
        self.cond = cond  # source-prompt conditioning c
        self.uncond = uncond  # null-text conditioning ∅
        self.fingerprint = fingerprint or model_fingerprint(inner)  # identifies the network
        self._time_grid = time_grid  # the model's own sampling grid for N steps, if it has one
        # A guidance-distilled model's (cond, w) -> cond reading scale w: no negative branch
        self.embed_guidance = embed_guidance

    @property
    def conditional(self) -> bool:
        return self.cond is not None

    @property
    def calls(self) -> int:
        """Network evaluations so far."""
        return self.inner.calls

    def require_conditional(self, what: str) -> None:
        if not self.conditional:
            raise ValueError(
                f"{what} needs a text-conditional model (a DenoiserFactory with cond/uncond "
                "conditionings); got a plain denoiser"
            )

    def uncond_with(self, embeds: Tensor) -> Any:
        """The unconditional conditioning with other token embeddings (null-text's ∅_k)."""
        self.require_conditional("an unconditional embedding")
        return with_embeds(self.uncond, embeds)

    def branch(self, cond: Any) -> Denoiser:
        """The conditional denoiser ``x0_hat(x, t | cond)`` (one network call)."""
        if cond is not None:
            self.require_conditional("a conditioning")
        return _Bound(self.inner, cond)

    def denoiser(self, *, cfg: float, cond: Any = None, uncond: Any = None) -> Denoiser:
        """CFG ``x0 = x0(∅) + w (x0(c) - x0(∅))`` in one batched call; ``cfg = 1`` is ``x0(c)``.

        ``cond`` / ``uncond`` default to the factory's conditionings. A guidance-distilled
        model (``embed_guidance``) reads ``w`` as an input instead: one call, no ``uncond``.
        """
        cond = self.cond if cond is None else cond
        if self.embed_guidance is not None:
            if uncond is not None:
                raise ValueError("this model is guidance-distilled (it reads cfg as an input): it "
                                 "has no unconditional branch to condition")
            return self.branch(self.embed_guidance(cond, cfg))
        if cfg == 1.0:
            return self.branch(cond)
        self.require_conditional(f"classifier-free guidance (cfg={cfg:g})")
        uncond = self.uncond if uncond is None else uncond
        return CFGDenoiser(self.inner, cond=cond, uncond=uncond, scale=cfg)

    def time_grid(self, steps: int) -> Tensor:
        """The model's sampling grid for ``steps`` steps (else :func:`default_grid`)."""
        if self._time_grid is not None:
            return self._time_grid(steps)
        return default_grid(self.schedule, steps)


def default_grid(schedule: Schedule, steps: int) -> Tensor:
    """``steps`` DDIM steps ending clean: ``leading`` spacing for VP, uniform for flow."""
    if isinstance(schedule, DiscreteVPSchedule):
        return discrete_grid(schedule, steps)
    return uniform_grid(schedule, steps)


def _tensor_digest(h: Any, name: str, p: Tensor) -> None:
    h.update(f"{name}:{tuple(p.shape)}".encode())
    h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())


def model_fingerprint(model: Any) -> str:
    """A short hash naming a network: its config, its schedule and three of its weight tensors.

    Understands :class:`~retouch.models.UNetDenoiser`, :class:`~retouch.models.TransformerDenoiser`
    (or a bare ``torch.nn.Module``) and
    :class:`~retouch.analytic.GMMDenoiser`; anything else is named by its class only.
    Weights are hashed as float32, so the same model loaded in another dtype matches.
    """
    h = hashlib.sha256()
    schedule = getattr(model, "schedule", None)
    if schedule is not None:
        h.update(f"{type(schedule).__name__}:{schedule.name}".encode())
    h.update(str(getattr(model, "prediction_type", "")).encode())
    net = getattr(model, "unet", None) or getattr(model, "transformer", model)
    if isinstance(net, torch.nn.Module):
        config = getattr(net, "config", None)
        h.update(json.dumps(dict(config) if config else {}, sort_keys=True, default=str).encode())
        params = list(net.named_parameters())
        for i in sorted({0, len(params) // 2, len(params) - 1} if params else ()):
            _tensor_digest(h, *params[i])
    elif hasattr(model, "gmm"):
        for name in ("means", "variances", "log_weights"):
            _tensor_digest(h, name, getattr(model.gmm, name))
    else:
        h.update(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    return h.hexdigest()[:16]


# --- DDIM with time running either way ------------------------------------------------------


def step_state(noise: Tensor | None = None) -> SamplerState:
    """A one-step :class:`SamplerState` for calling a step function outside the loop."""
    return SamplerState(times=[], noises=None if noise is None else [noise])


def predict(denoiser: Denoiser, z: Tensor, t: float) -> tuple[Tensor, Tensor]:
    """``(x0_hat, eps_hat)`` of the model at ``(z, t)``, ``eps_hat = (z - alpha x0_hat)/sigma``.

    Shapes: z (B, ...). ``t`` must not be clean (the model is never evaluated there).
    """
    x0 = denoiser(z, t)
    return x0, eps_from_x0(denoiser.schedule, z, t, x0)


def ddim_eps_step(denoiser: Denoiser, x: Tensor, t: float, t_next: float, eps: Tensor) -> Tensor:
    """DDIM with ``eps_hat`` held: ``x' = alpha' x0 + sigma' eps``, ``x0 = (x - sigma eps)/alpha``.

    Works in either direction and is its own inverse with the same ``eps`` (EDICT's affine
    step ``a x + b eps``). Shapes: x, eps (B, ...). References: Song et al. 2021, eq. 12.
    """
    alpha, sigma = denoiser.schedule.coeffs(t)
    if alpha == 0:
        raise ValueError(f"an eps-held DDIM step needs alpha(t) > 0; t={t} is pure noise")
    x0 = (x - sigma * eps) / alpha
    if sigma == 0:  # ddim_step cannot leave a clean time; there x0 = x and the formula is direct
        alpha_n, sigma_n = denoiser.schedule.coeffs(t_next)
        return alpha_n * x0 + sigma_n * eps
    return ddim_step(denoiser, x, t, t_next, x0, step_state())


def default_hold(schedule: Schedule) -> str:
    """``"eps"`` for discrete VP schedules (diffusers' convention), ``"velocity"`` otherwise."""
    return "eps" if isinstance(schedule, DiscreteVPSchedule) else "velocity"


def inverse_ddim_step(
    denoiser: Denoiser,
    x: Tensor,
    t: float,
    t_next: float,
    x0_hat: Tensor,
    eps_hat: Tensor,
    *,
    hold: str | None = None,
) -> Tensor:
    """One DDIM inversion step from ``x`` at ``t`` to ``t_next > t``.

    ``(x0_hat, eps_hat)`` is the model's prediction at the target time ``t_next``; ``hold``
    (see the module docstring; default :func:`default_hold`) says which part of it is kept
    while ``(x0, eps)`` are re-derived at ``x``; then it is ``ddim_step`` with time running up.
    Shapes: (B, ...).
    """
    schedule = denoiser.schedule
    hold = default_hold(schedule) if hold is None else hold
    alpha, sigma = schedule.coeffs(t)
    alpha_n, sigma_n = schedule.coeffs(t_next)
    if hold == "eps" and alpha_n == 0:
        hold = "x0"  # at a pure-noise target eps_hat is the input itself: keep x0_hat there
    if hold == "eps":
        x0, eps = (x - sigma * eps_hat) / alpha, eps_hat
    elif hold == "x0":
        if sigma == 0:
            raise ValueError("an x0-held inversion step cannot leave a clean time")
        x0, eps = x0_hat, (x - alpha * x0_hat) / sigma
    elif hold == "velocity":  # flow view z = x / (alpha + sigma) = (1 - tau) x0 + tau eps
        c, tau = alpha + sigma, sigma / (alpha + sigma)
        v = eps_hat - x0_hat  # dz/dtau, the flow velocity
        x0, eps = x / c - tau * v, x / c + (1 - tau) * v
    else:
        raise ValueError(f"unknown hold {hold!r}; valid: {', '.join(HOLDS)}")
    if sigma == 0:  # ddim_step cannot leave a clean time; there x0 = x and the formula is direct
        return alpha_n * x0 + sigma_n * eps
    return ddim_step(denoiser, x, t, t_next, x0, step_state())


def record_inversion(
    factory: DenoiserFactory, method: str, times: Tensor, traj: Tensor, cfg: float,
    calls0: int, config: Any, **extra: Any,
) -> Inversion:
    """The :class:`Inversion` of ``method``: trajectory, float64 grid, the factory's
    fingerprint, the config's options, and the network calls made since ``calls0``."""
    from dataclasses import asdict

    return Inversion(
        method=method,
        times=times.to(torch.float64).cpu(),
        trajectory=traj,
        cfg=float(cfg),
        fingerprint=factory.fingerprint,
        options=asdict(config),
        nfe=factory.calls - calls0,
        **extra,
    )


# --- replay: the sampler an inversion lands on -----------------------------------------------


def corrections(inv: Inversion, copies: int, shift: int = 0) -> list[Callable]:
    """The per-step callback that adds ``o_k`` after step ``k`` (none without offsets): the
    stored offsets to every row (``offset_rows="all"``), or Direct Inversion's
    ``o_k = x*_{k+1} - x`` to the source rows, written as the stored trajectory ``x*_{k+1}``
    itself (it cannot drift by round-off amplified over the steps, nor by the source rows being
    batched with target rows in an edit). ``shift``: grid index of the loop's step 0."""
    if inv.offsets is None and inv.method != "direct":
        return []
    b = inv.batch

    def add_offset(ctx) -> Tensor:
        k = ctx.i + shift
        x = ctx.x.clone()
        if inv.offset_rows == "all":
            return x + rows(inv.offsets[k].to(x), b, copies)
        x[:b] = inv.trajectory[k + 1].to(x)  # = x[:b] + o_k, o_k = x*_{k+1} - x[:b]
        return x

    return [add_offset]


def replay_ddim(inv: Inversion, den: Denoiser, *, copies: int, callbacks, progress: bool):
    """Reconstruct by DDIM along the inversion's grid from ``x_0`` (ddim, null-text,
    negative-prompt, direct and ReNoise inversions), with the stored corrections."""
    from retouch.samplers import sample

    x0 = rows(inv.trajectory[0], inv.batch, copies)
    return sample(den, x0, inv.times, step=ddim_step,
                  callbacks=[*corrections(inv, copies), *callbacks], progress=progress)
