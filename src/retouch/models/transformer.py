"""Adapter from a diffusers rectified-flow transformer (SD3 MMDiT, Flux) to the denoiser contract.

``TransformerDenoiser(transformer, schedule, family=...)(x, t, cond=...) -> x0_hat``: the
network's flow velocity ``u = eps - x0`` is converted to ``x0`` once, here. ``x`` is always the
spatial latent (B, C, h, w); Flux's 2x2 token packing and its position ids live inside this
adapter, so samplers and inversions never see packed latents. The family's conventions, as in
diffusers' pipelines:

==========  ==================  ====================================================
family      transformer input   timestep input (model time ``t`` = flow ``sigma``)
==========  ==================  ====================================================
``"sd3"``   (B, C, h, w)        ``t * num_train_timesteps`` (``StableDiffusion3Pipeline``)
``"flux"``  (B, hw/4, 4C)       ``t`` (``FluxPipeline`` passes ``timestep / 1000``; the
            + ``img_ids``,      transformer multiplies by 1000 itself); guidance-distilled
            ``txt_ids``         transformers also read ``guidance`` (B,)
==========  ==================  ====================================================

The :class:`~retouch.models.conditioning.Conditioning` gives the token embeddings
(``embeds`` -> ``encoder_hidden_states``) and, in ``added``, the transformer's other keyword
inputs per row: ``pooled_projections`` and, for guidance-distilled Flux, ``guidance``.

References: Esser et al. 2024 (SD3, rectified-flow MMDiT); Black Forest Labs 2024 (Flux);
Liu et al. 2023 (rectified flow); Karras et al. 2022 (one conversion in the model wrapper).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from retouch.models.conditioning import Conditioning
from retouch.schedules import FlowSchedule, Schedule, to_x0

__all__ = ["FAMILIES", "TransformerDenoiser", "pack_latents", "unpack_latents",
           "latent_image_ids"]

#: Transformer families and their input conventions (see the module table).
FAMILIES = ("sd3", "flux")
#: Side of Flux's latent patches: 2x2 latent pixels make one token of 4C channels.
FLUX_PATCH = 2


def pack_latents(x: Tensor) -> Tensor:
    """Flux tokens (B, h/2 * w/2, 4C) from latents (B, C, h, w): each 2x2 patch, row-major."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // FLUX_PATCH, FLUX_PATCH, w // FLUX_PATCH, FLUX_PATCH)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // FLUX_PATCH) * (w // FLUX_PATCH),
                                               c * FLUX_PATCH ** 2)


def unpack_latents(tokens: Tensor, h: int, w: int) -> Tensor:
    """Latents (B, C, h, w) from Flux tokens (B, h/2 * w/2, 4C) (inverse of pack_latents)."""
    b, _, d = tokens.shape
    c = d // FLUX_PATCH ** 2
    x = tokens.reshape(b, h // FLUX_PATCH, w // FLUX_PATCH, c, FLUX_PATCH, FLUX_PATCH)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def latent_image_ids(h: int, w: int, *, device=None, dtype=torch.float32) -> Tensor:
    """Flux's rotary position ids of the image tokens, (h/2 * w/2, 3): ``(0, row, column)``."""
    rows, cols = h // FLUX_PATCH, w // FLUX_PATCH
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3).to(device=device, dtype=dtype)


class TransformerDenoiser:
    """``denoiser(x, t, cond=...) -> x0_hat`` around an SD3 or Flux transformer.

    ``cond`` is a :class:`~retouch.models.conditioning.Conditioning` (the default one given
    here, or one per call, which lets guidance batch its branches into one network call); a
    1-row conditioning is shared by all latents. ``encoder_hidden_states=`` replaces the token
    embeddings and keeps the added inputs (null-text's tuned ∅); ``joint_attention_kwargs=`` is
    passed to the attention processors. Shapes: x (B, C, h, w).
    """

    prediction_type = "flow_prediction"  # what both families' transformers output

    def __init__(
        self,
        transformer: torch.nn.Module,
        schedule: Schedule,
        *,
        family: str,
        cond: Conditioning | None = None,
        joint_attention_kwargs: Mapping[str, Any] | None = None,
    ):
        if family not in FAMILIES:
            raise ValueError(f"unknown transformer family {family!r}; valid: {', '.join(FAMILIES)}")
        if not isinstance(schedule, FlowSchedule):
            raise ValueError(f"a rectified-flow transformer needs a FlowSchedule, got "
                             f"{type(schedule).__name__}: build it from a FlowMatch scheduler "
                             "config")
        self.transformer = transformer
        self.schedule = schedule
        self.family = family  # input conventions (see the module table)
        self.cond = cond  # default conditioning
        self.joint_attention_kwargs = joint_attention_kwargs  # passed to attention processors
        self.guided = bool(transformer.config.get("guidance_embeds", False))  # Flux-dev style

    def model_timestep(self, t: float) -> float:
        """The transformer's timestep input for model time ``t`` (see the module table)."""
        return float(t) * (self.schedule.num_train_timesteps if self.family == "sd3" else 1.0)

    def _inputs(self, cond: Conditioning | None) -> dict[str, Tensor]:
        if cond is None:
            raise ValueError("a transformer denoiser needs a conditioning: pass cond= (e.g. "
                             "model.encode(prompts)) here or when building it")
        added = dict(cond.added)
        if "pooled_projections" not in added:
            raise ValueError("the conditioning lacks added['pooled_projections']: encode prompts "
                             "with the model (model.encode(prompts))")
        if self.family == "flux" and self.guided != ("guidance" in added):
            raise ValueError(
                "this Flux transformer reads a guidance scale (guidance_embeds): put it in "
                "added['guidance'] (model.denoiser(prompts, cfg=...) does)" if self.guided else
                "this Flux transformer has no guidance embedding: drop added['guidance']")
        if self.family == "sd3" and "guidance" in added:
            raise ValueError("SD3 transformers take no guidance input: drop added['guidance']")
        return {"encoder_hidden_states": cond.embeds, **added}

    def __call__(self, x: Tensor, t: float, **overrides: Any) -> Tensor:
        unknown = set(overrides) - {"cond", "encoder_hidden_states", "joint_attention_kwargs"}
        if unknown:
            raise TypeError(f"unexpected conditioning arguments: {sorted(unknown)}")
        if x.ndim != 4:
            raise ValueError(f"a latent must be (B, C, h, w), got shape {tuple(x.shape)}")
        cond = overrides.get("cond", self.cond)
        if "encoder_hidden_states" in overrides and cond is not None:
            cond = cond.with_embeds(overrides["encoder_hidden_states"])  # keep added inputs
        b, _, h, w = x.shape
        param = next(self.transformer.parameters())
        # As the pipelines: the guidance scale stays float32 (FluxPipeline), SD3's timestep too
        # (t x 1000 in half precision would round 999.7 to 999.5); Flux's follows the latents.
        inputs = {k: v.to(param.dtype) if v.is_floating_point() and k != "guidance" else v
                  for k, v in self._inputs(None if cond is None else cond.expand(b)).items()}
        extra = dict(cond.extra)
        timestep = torch.full((b,), self.model_timestep(t), device=x.device,
                              dtype=torch.float32 if self.family == "sd3" else param.dtype)
        hidden = x.to(param.dtype).contiguous()
        if self.family == "flux":
            if h % FLUX_PATCH or w % FLUX_PATCH:
                raise ValueError(f"a Flux latent needs even sides, got {w}x{h}")
            hidden = pack_latents(hidden)
            extra["img_ids"] = latent_image_ids(h, w, device=x.device, dtype=param.dtype)
            text_len = inputs["encoder_hidden_states"].shape[1]
            extra["txt_ids"] = torch.zeros(text_len, 3, device=x.device, dtype=param.dtype)
        out = self.transformer(
            hidden_states=hidden,
            timestep=timestep,
            joint_attention_kwargs=overrides.get("joint_attention_kwargs",
                                                 self.joint_attention_kwargs),
            return_dict=False,
            **inputs,
            **extra,
        )[0]
        if self.family == "flux":
            out = unpack_latents(out, h, w)
        alpha, sigma = self.schedule.coeffs(t)
        return to_x0(out.to(x.dtype), x, alpha, sigma, self.prediction_type)
