"""The ToyWorld flow model: a tiny SD3 transformer (MMDiT) trained by rectified flow.

``retouch toyworld train --arch sd3`` trains :func:`~retouch.toyworld.configs.transformer_config`
with two CLIP text encoders (SD3 reads two side by side; ToyWorld's are the shipped model's
encoder twice, when a run starts from it) on the same scenes, captions, VAE and grounding losses
as the UNet model (the grounding reads the cross view of the joint attention,
:mod:`retouch.attention.joint`). The loss is SD3's: ``t = sigmoid(u)``, ``u ~ N(0, 1)``
(logit-normal), ``x_t = (1 - t) x0 + t eps``, and the transformer's output regresses the
velocity ``eps - x0``. The exported folder is a plain ``StableDiffusion3Pipeline`` without T5,
whose T5 slots are ``FLOW_TEXT_SLOTS`` zeros (``toyworld.json`` says how many, and retouch
reads that; diffusers needs ``max_sequence_length=`` at call).

References: Esser et al. 2024 (SD3: MMDiT, logit-normal time sampling, Sec. 3.1); Liu et al.
2023 (rectified flow); Wang et al. 2024 (TokenCompose grounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..toyworld import configs
from .loop import train_network

__all__ = ["build_flow_models", "encode_text", "train_flow", "flow_pipeline"]


def build_flow_models(cfg, vocab_size: int, bos_id: int, eos_id: int):
    """(transformer, text_encoder, text_encoder_2) of a flow run, randomly initialised."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(cfg.seed + 5)
    transformer = SD3Transformer2DModel(**configs.transformer_config())
    text = [CLIPTextModelWithProjection(CLIPTextConfig(**configs.text_config(
        vocab_size, bos_id=bos_id, eos_id=eos_id, layers=cfg.text_layers))) for _ in range(2)]
    return transformer, *text


def encode_text(texts, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What SD3 reads from prompts without T5, as ``SD3Model.encode`` computes it: the two
    encoders' penultimate hidden states side by side, then ``FLOW_TEXT_SLOTS`` zero slots
    (B, L + slots, 256); and their pooled projections side by side (B, 256)."""
    hidden, pooled = [], []
    for encoder in texts:
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled.append(out.text_embeds)
    clip = torch.cat(hidden, -1)
    return F.pad(clip, (0, 0, 0, configs.FLOW_TEXT_SLOTS)), torch.cat(pooled, -1)


def train_flow(cfg, data, latents, transformer, text, text_2, tokenizer, *, resume: bool,
               progress: bool = True) -> None:
    """The transformer stage: rectified flow with logit-normal times, plus grounding."""
    def objective(x0, ids, gen, forward):
        eps = torch.randn(x0.shape, generator=gen).to(x0.device)
        t = torch.sigmoid(torch.randn(x0.shape[0], generator=gen)).to(x0.device)
        xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
        embeds, pooled = encode_text((text, text_2), ids)
        v = forward(xt, encoder_hidden_states=embeds, pooled_projections=pooled,
                    timestep=t * 1000).sample  # diffusers' SD3 timestep: sigma x 1000
        return F.mse_loss(v, eps - x0)

    token_grid = configs.LATENT_SIZE // transformer.config.patch_size
    train_network(cfg, data, latents, {"transformer": transformer, "text": text,
                                       "text_2": text_2}, tokenizer, objective,
                  grounding=(token_grid,), text_positions=configs.FLOW_TEXT_SLOTS,
                  resume=resume, progress=progress)


def flow_pipeline(vae, transformer, text, text_2, tokenizer):
    """The parts as a ``StableDiffusion3Pipeline`` without T5 (the VAE told its shift: 0)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    vae.register_to_config(shift_factor=0.0)
    return StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, text_encoder=text, tokenizer=tokenizer,
        text_encoder_2=text_2, tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None,
        scheduler=FlowMatchEulerDiscreteScheduler(**configs.flow_scheduler_config()))
