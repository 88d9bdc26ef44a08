"""Adapter from a diffusers ``UNet2DConditionModel`` to the retouch denoiser contract.

``UNetDenoiser(unet, schedule, prediction_type=...)(x, t) -> x0_hat``: the network's eps /
v / sample / flow-velocity output is converted to ``x0`` once, here, with the schedule's
``alpha(t)``, ``sigma(t)``. Model time maps to the UNet's timestep input as:

=========================  ===================================================
schedule                   UNet timestep
=========================  ===================================================
``DiscreteVPSchedule``     ``t`` itself (fractional t allowed, as diffusers' Euler)
``FlowSchedule``           ``t * num_train_timesteps`` (diffusers' flow-matching
                           convention ``sigma * 1000``)
=========================  ===================================================

References: Karras et al. 2022 (EDM, preconditioning = one conversion in the model wrapper).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from retouch.models.conditioning import Conditioning
from retouch.schedules import PREDICTION_TYPES, FlowSchedule, Schedule, to_x0

__all__ = ["UNetDenoiser"]


class UNetDenoiser:
    """``denoiser(x, t, cond=...) -> x0_hat`` around a diffusers ``UNet2DConditionModel``.

    ``cond`` is a :class:`~retouch.models.conditioning.Conditioning` (the default one given
    here, or one per call, which lets guidance batch its branches into one UNet call); a 1-row
    conditioning is shared by all latents. The UNet's own keyword arguments
    (``encoder_hidden_states=``, ``added_cond_kwargs=``, ``cross_attention_kwargs=``) are
    accepted too, as overrides of the defaults. Shapes: x (B, C, H, W).
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        schedule: Schedule,
        *,
        prediction_type: str = "epsilon",
        cond: Conditioning | None = None,
        encoder_hidden_states: Tensor | None = None,
        added_cond_kwargs: Mapping[str, Tensor] | None = None,
        cross_attention_kwargs: Mapping[str, Any] | None = None,
    ):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"unknown prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}"
            )
        self.unet = unet
        self.schedule = schedule
        self.prediction_type = prediction_type  # what the network outputs (scheduler config)
        self.cond = cond  # default conditioning
        self.encoder_hidden_states = encoder_hidden_states  # default text conditioning
        self.added_cond_kwargs = added_cond_kwargs  # SDXL-style extra conditioning
        self.cross_attention_kwargs = cross_attention_kwargs  # passed to attention processors

    def model_timestep(self, t: float) -> float:
        """The UNet's timestep input for model time ``t`` (see the module table)."""
        if isinstance(self.schedule, FlowSchedule):
            return float(t) * self.schedule.num_train_timesteps
        return float(t)

    def __call__(self, x: Tensor, t: float, **overrides: Any) -> Tensor:
        unknown = set(overrides) - {
            "cond",
            "encoder_hidden_states",
            "added_cond_kwargs",
            "cross_attention_kwargs",
        }
        if unknown:
            raise TypeError(f"unexpected conditioning arguments: {sorted(unknown)}")
        cond = overrides.get("cond", self.cond)
        if "encoder_hidden_states" in overrides and "cond" not in overrides and cond is not None:
            cond = cond.with_embeds(overrides["encoder_hidden_states"])  # keep added conditions
        extra: dict[str, Any] = {}
        if cond is not None:
            cond = cond.expand(x.shape[0])
            ehs, added, extra = cond.embeds, dict(cond.added) or None, dict(cond.extra)
        else:
            ehs = overrides.get("encoder_hidden_states", self.encoder_hidden_states)
            if ehs is not None and ehs.shape[0] == 1 and x.shape[0] > 1:
                ehs = ehs.expand(x.shape[0], *ehs.shape[1:])
            added = overrides.get("added_cond_kwargs", self.added_cond_kwargs)
        timestep = torch.tensor(self.model_timestep(t), dtype=torch.float32, device=x.device)
        param = next(self.unet.parameters())
        # Standard layout in: the same values then run the same kernels, whatever the caller's
        # strides (a channels-last latent would pick other convolution kernels, other bits).
        out = self.unet(
            x.to(param.dtype).contiguous(),
            timestep,
            encoder_hidden_states=None if ehs is None else ehs.to(param.dtype),
            added_cond_kwargs=added,
            cross_attention_kwargs=overrides.get(
                "cross_attention_kwargs", self.cross_attention_kwargs
            ),
            return_dict=False,
            **extra,
        )[0].to(x.dtype)
        alpha, sigma = self.schedule.coeffs(t)
        return to_x0(out, x, alpha, sigma, self.prediction_type)
