"""``invert`` and ``reconstruct``: one entry point for every method, at denoiser or pipeline level.

``model`` may be a :class:`~retouch.models.pipeline.PipelineModel` (images are VAE-encoded,
the prompt is encoded, the scheduler's own grid is used), a :class:`DenoiserFactory` (a
conditional network plus the source / null embeddings) or a plain denoiser (``cfg = 1`` only,
e.g. the analytic GMM). A ``torch.Tensor`` input is always a latent; PIL images and uint8
arrays are images.

**Editing.** ``reconstruct(..., target=E)`` runs a batch of ``2B`` rows: the ``B`` source rows
get the method's corrections (Direct Inversion's offsets go to the source rows only), the ``B``
target rows start from the same latent(s) and are conditioned on ``E``. Per-step null
embeddings, edit-friendly noise maps and EDICT / BDIA coupling apply to both branches, as the
papers' editing procedures do; negative-prompt inversion uses the source prompt as the target
rows' unconditional embedding. Callbacks (local blending, ...) see every row of every step
(with CFG the network sees ``[uncond rows; cond rows]``); EDICT's two-chain loop takes none.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from retouch.checks import count, finite, finite_tensor, prompt_list
from retouch.guidance import NullTextGuidance
from retouch.inversion.core import (
    DenoiserFactory,
    MethodRefused,
    embeds_of,
    replay_ddim,
    rows,
    stack,
    with_embeds,
)
from retouch.inversion.ddim import (
    DDIMConfig,
    DirectConfig,
    NegativePromptConfig,
    ReNoiseConfig,
    invert_ddim,
    invert_direct,
    invert_negative_prompt,
    invert_renoise,
)
from retouch.inversion.exact import (
    BDIAConfig,
    EDICTConfig,
    EditFriendlyConfig,
    invert_bdia,
    invert_ddpm_edit_friendly,
    invert_edict,
    replay_bdia,
    replay_edict,
    replay_edit_friendly,
)
from retouch.inversion.flow import (
    FireFlowConfig,
    RFSolverConfig,
    invert_fireflow,
    invert_rf_solver,
    replay_fireflow,
    replay_rf_solver,
)
from retouch.inversion.null_text import NullTextConfig, invert_null_text
from retouch.inversion.result import Inversion
from retouch.inversion.rf_inversion import (
    RFInversionConfig,
    invert_rf_inversion,
    replay_rf_inversion,
)
from retouch.samplers import StepContext, check_grid

__all__ = ["METHODS", "invert", "reconstruct", "as_factory", "method_config", "fingerprint_of"]


@dataclass(frozen=True)
class _Method:
    invert: Callable[..., Inversion]  # invert_xxx(factory, x, times, *, cfg, config, progress)
    config: type  # the method's options dataclass
    # replay_xxx(inv, den, *, copies, callbacks, progress) -> latents: its reconstruction
    replay: Callable[..., Tensor] = replay_ddim


_REGISTRY = {
    "ddim": _Method(invert_ddim, DDIMConfig),
    "null_text": _Method(invert_null_text, NullTextConfig),
    "negative_prompt": _Method(invert_negative_prompt, NegativePromptConfig),
    "edict": _Method(invert_edict, EDICTConfig, replay_edict),
    "bdia": _Method(invert_bdia, BDIAConfig, replay_bdia),
    "direct": _Method(invert_direct, DirectConfig),
    "ddpm_edit_friendly": _Method(invert_ddpm_edit_friendly, EditFriendlyConfig,
                                  replay_edit_friendly),
    "renoise": _Method(invert_renoise, ReNoiseConfig),
    "rf_solver": _Method(invert_rf_solver, RFSolverConfig, replay_rf_solver),
    "fireflow": _Method(invert_fireflow, FireFlowConfig, replay_fireflow),
    "rf_inversion": _Method(invert_rf_inversion, RFInversionConfig, replay_rf_inversion),
}
#: Inversion methods by name.
METHODS = tuple(_REGISTRY)
#: Methods that tune or replace the unconditional branch of classifier-free guidance.
NEGATIVE_BRANCH = ("null_text", "negative_prompt")


def _method(name: str) -> _Method:
    if name not in _REGISTRY:
        raise ValueError(f"unknown inversion method {name!r}; valid: {', '.join(METHODS)}")
    return _REGISTRY[name]


def method_config(method: str, config: Any = None) -> Any:
    """The options dataclass of ``method`` from None (defaults), a dict or an instance."""
    cls = _method(method).config
    if config is None:
        return cls()
    if isinstance(config, cls):
        return config
    if isinstance(config, dict):
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - valid)
        if unknown:
            raise ValueError(
                f"unknown option(s) {', '.join(unknown)} for {method}; "
                f"valid: {', '.join(sorted(valid)) or 'none'}"
            )
        return cls(**config)
    raise TypeError(f"config for {method} must be a {cls.__name__} or a dict")


def _is_pipeline(model: Any) -> bool:
    from retouch.models.pipeline import PipelineModel

    return isinstance(model, PipelineModel)


def as_factory(model: Any, prompt: str | list[str] | None = None) -> DenoiserFactory:
    """A :class:`DenoiserFactory` for a PipelineModel (with ``prompt``), a factory or a plain
    denoiser."""
    if isinstance(model, DenoiserFactory):
        if prompt is not None:
            raise ValueError("a DenoiserFactory carries its embeddings; do not pass a prompt")
        return model
    if _is_pipeline(model):
        if prompt is None:
            raise ValueError("inverting with a pipeline model needs the source prompt")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        return DenoiserFactory(
            model.unet_denoiser(),
            cond=model.encode(prompts),
            uncond=model.encode_negative([""]),
            time_grid=model.time_grid,
            embed_guidance=model.embed_guidance,
        )
    if callable(model) and hasattr(model, "schedule"):
        if prompt is not None:
            raise ValueError("a plain denoiser has no text conditioning; do not pass a prompt")
        return DenoiserFactory(model)
    raise TypeError(f"cannot invert with a {type(model).__name__}")


def fingerprint_of(model: Any) -> str:
    """The fingerprint inversions made with ``model`` carry (see :func:`model_fingerprint`)."""
    if isinstance(model, DenoiserFactory):
        return model.fingerprint
    if _is_pipeline(model):
        from retouch.inversion.core import model_fingerprint

        return model_fingerprint(model.unet_denoiser())
    return as_factory(model).fingerprint


def invert(
    model: Any,
    image_or_latent: Any,
    prompt: str | list[str] | None = None,
    *,
    method: str = "ddim",
    steps: int | None = None,
    cfg: float = 1.0,
    times: Tensor | None = None,
    config: Any = None,
    progress: bool = True,
) -> Inversion:
    """Invert an image or latent (B, C, H, W) with ``method`` (one of :data:`METHODS`).

    ``steps`` (default 50) picks the model's sampling grid, or pass ``times`` (decreasing,
    ending at the input's time). ``cfg`` is the guidance the reconstruction will use;
    ``config`` the method's options (its dataclass or a dict).
    """
    entry = _method(method)
    options = method_config(method, config)
    if method in NEGATIVE_BRANCH and getattr(model, "embed_guidance", None) is not None:
        raise MethodRefused(f"{method} works on the unconditional branch of classifier-free "
                         "guidance, which this guidance-distilled model (it reads cfg as an "
                         "input, as FLUX.1-dev) does not have: use rf_solver, fireflow, ddim, "
                         "bdia, direct or ddpm_edit_friendly")
    finite("cfg", cfg)
    if steps is not None:
        count("steps", steps)
    if times is not None:
        check_grid(times)
        if steps is not None and steps != len(times) - 1:
            raise ValueError(f"steps={steps} disagrees with a grid of {len(times) - 1} steps")
    pipeline = _is_pipeline(model)
    if isinstance(image_or_latent, Tensor):
        x = model.check_latent(image_or_latent) if pipeline else finite_tensor(
            "the latent", image_or_latent)
    elif pipeline:
        x = None  # encoded below, once the prompts are known to be right
    else:
        raise TypeError("without a pipeline model the input must be a latent tensor")
    if pipeline:
        batch = x.shape[0] if x is not None else _batch_of(image_or_latent)
        for p in prompt_list(prompt, batch=batch, name="source prompt"):
            model.check_prompt(p)
    factory = as_factory(model, prompt)
    if x is None:
        x = model.encode_image(image_or_latent)
    if times is None:
        times = factory.time_grid(50 if steps is None else steps)
    inv = entry.invert(factory, x, times, cfg=cfg, config=options, progress=progress)
    inv.check_finite(f"the {method} inversion it computed",
                     f"the computation diverged at cfg={cfg:g}: try a lower cfg or more steps")
    inv.prompt = prompt if _is_pipeline(model) else None
    if factory.conditional:
        inv.conditioning = (factory.cond, factory.uncond)
    return inv


def _batch_of(images: Any) -> int:
    """How many images ``images`` holds (a PIL image, a list, an (H, W, 3) or (B, ...) array)."""
    if isinstance(images, list):
        return len(images)
    ndim = getattr(images, "ndim", None)
    return images.shape[0] if ndim == 4 else 1


def _denoiser(inv: Inversion, factory: DenoiserFactory, target: Any):
    b, copies = inv.batch, 1 if target is None else 2
    if not factory.conditional:
        if target is not None:
            raise ValueError("a target branch needs a text-conditional model")
        return factory.denoiser(cfg=inv.cfg)
    cond = rows(factory.cond, b)
    if target is not None:
        if isinstance(target, Tensor) and not isinstance(cond, Tensor):  # bare embeddings
            target = with_embeds(rows(factory.cond, target.shape[0]), target)
        cond = stack([cond, rows(target, b)])
    if factory.embed_guidance is not None:  # guidance-distilled: cfg is an input, one branch
        return factory.denoiser(cfg=inv.cfg, cond=cond)
    if inv.cfg == 1.0:
        return factory.branch(cond)
    like = embeds_of(cond)
    nulls = inv.uncond_embeddings
    uncond = rows(factory.uncond, b, copies)
    if nulls is not None and len(nulls) > 1:
        embeddings = [with_embeds(uncond, rows(e.to(like), b, copies)) for e in nulls]
        return NullTextGuidance(
            factory.inner, cond=cond, embeddings=embeddings, times=inv.times, scale=inv.cfg
        )
    if nulls is not None:
        uncond = with_embeds(uncond, rows(nulls[0].to(like), b, copies))
    return factory.denoiser(cfg=inv.cfg, cond=cond, uncond=uncond)


def reconstruct(
    inversion: Inversion,
    model: Any,
    *,
    target: Tensor | str | list[str] | None = None,
    callbacks: Sequence[Callable[[StepContext], Tensor | None]] = (),
    guide: Callable[[Any], Any] | None = None,
    progress: bool = True,
) -> Tensor:
    """The latents the inversion's sampler lands on: (B, ...), or (2B, ...) = [source; target]
    rows when a ``target`` embedding (or prompt, for a pipeline model) is given.

    Refuses an inversion made with another model. ``callbacks`` are run after the method's own
    per-step corrections (BDIA's loop starts at step 1, so its ``ctx.i`` is ``k - 1``).
    ``guide`` wraps the method's guided denoiser (e.g. in a
    :class:`~retouch.guidance.LossGuidance`: self-guidance on an inverted image).
    """
    inv = inversion
    inv.check_finite()
    factory = as_factory(model, inv.prompt if _is_pipeline(model) else None)
    inv.check_compatible(fingerprint=factory.fingerprint)
    if isinstance(target, str | list):
        if not _is_pipeline(model):
            raise ValueError("a target prompt needs a pipeline model; pass an embedding")
        target = model.encode(target)
    copies = 1 if target is None else 2
    with torch.no_grad():
        den = _denoiser(inv, factory, target)
        if guide is not None:
            den = guide(den)
        return _method(inv.method).replay(inv, den, copies=copies, callbacks=list(callbacks),
                                          progress=progress)
