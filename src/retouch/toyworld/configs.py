"""Tiny Stable-Diffusion-architecture configs for ToyWorld (diffusers / transformers classes).

Sizes come from the feasibility runs in shared/notes/toyworld-feasibility.md: a 64×64 image
becomes a 16×16×4 latent (f=4); the UNet has cross-attention at 16×16, 8×8 and 4×4 (mid).
"""

from __future__ import annotations

__all__ = [
    "IMAGE_SIZE",
    "MAX_TOKENS",
    "vae_config",
    "unet_config",
    "text_config",
    "scheduler_config",
    "FLOW_TEXT_SLOTS",
    "transformer_config",
    "flow_scheduler_config",
]

IMAGE_SIZE = 64
LATENT_SIZE = 16
MAX_TOKENS = 32  # longest caption is ~23 tokens with BOS/EOS
#: The flow model's text positions after the caption's: SD3's T5 slots, zeros without a T5
#: encoder (``max_sequence_length`` of the exported folder).
FLOW_TEXT_SLOTS = 8


def vae_config() -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    )


def unet_config(width: int = 64, depth: int = 1) -> dict:
    """The ToyWorld UNet: ``width`` channels in its first block, ``depth`` transformer layers
    in each attention block (diffusers' ``transformer_layers_per_block``)."""
    return dict(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(width, 2 * width, 2 * width),
        layers_per_block=1,
        cross_attention_dim=128,
        # diffusers quirk: for UNet2DConditionModel this is the number of heads, not their size.
        attention_head_dim=4,
        norm_num_groups=32,
        transformer_layers_per_block=depth,
    )


def text_config(vocab_size: int, *, bos_id: int, eos_id: int, layers: int = 2) -> dict:
    # Few text layers keep token embeddings word-specific, so cross-attention can localise words.
    return dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        projection_dim=128,
    )


def scheduler_config() -> dict:
    """SD's scaled-linear schedule, in DDIMScheduler form (also read by DDPMScheduler)."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


def transformer_config(width: int = 128, layers: int = 6) -> dict:
    """A tiny SD3 MMDiT on the 16x16x4 latent: patch 2 (64 image tokens), heads of 32; the
    text stream reads two 128-wide CLIP encoders side by side (256), their pooled projections
    likewise. 6 x 128: 3.5 M parameters, 0.47 s per training step at batch 32 on one CPU
    thread (measured beside a training run)."""
    return dict(
        sample_size=LATENT_SIZE,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=layers,
        attention_head_dim=32,
        num_attention_heads=width // 32,
        joint_attention_dim=256,
        caption_projection_dim=width,
        pooled_projection_dim=256,
        pos_embed_max_size=LATENT_SIZE,
    )


def flow_scheduler_config() -> dict:
    """Rectified flow without a resolution shift (the latent is 16x16)."""
    return dict(num_train_timesteps=1000, shift=1.0)
