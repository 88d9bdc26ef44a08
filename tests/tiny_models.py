"""Tiny random models shared by the tests: SD1.x / SD2-v / SDXL UNets, a word tokenizer,
PipelineModels built from them, and SD3 / Flux pipelines (seconds to build, meaningless weights:
plumbing only)."""

import copy
import functools
import tempfile
from pathlib import Path
from types import SimpleNamespace

import diffusers
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from retouch.models.pipeline import PipelineModel
from retouch.models.sdxl import SDXLModel
from retouch.toyworld.tokenizer import save_tokenizer

__all__ = ["CONFIGS", "TEXT_DIM", "TOKENS", "WORDS", "tiny_model", "tiny_model_f64",
           "tiny_tokenizer", "tiny_unet", "T5_DIM", "tiny_sd3_pipeline", "tiny_flux_pipeline"]

CONFIGS = ("sd1", "sd2v", "sdxl")
TEXT_DIM, TOKENS = 32, 16
WORDS = ("a", "red", "blue", "green", "big", "small", "square", "circle", "cat", "dog", "on")


@functools.cache
def tiny_unet(kind: str) -> diffusers.UNet2DConditionModel:
    """Tiny random UNets with three levels (latent 8: attention at 8, 4 and 2)."""
    torch.manual_seed(0)
    common = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32, 32),
                  layers_per_block=1, cross_attention_dim=TEXT_DIM, norm_num_groups=8)
    sd_blocks = dict(
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    if kind == "sd1":
        cfg = dict(**sd_blocks, attention_head_dim=2)
    elif kind == "sd2v":  # per-block head counts, linear projections, upcast attention
        cfg = dict(**sd_blocks, attention_head_dim=(2, 4, 4), use_linear_projection=True,
                   upcast_attention=True)
    elif kind == "sdxl":  # no attention at full resolution; 2 transformer layers at the bottom
        cfg = dict(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 2, 4),
            use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=4, projection_class_embeddings_input_dim=4 * 6 + TEXT_DIM,
        )
    else:
        raise ValueError(kind)
    return diffusers.UNet2DConditionModel(**common, **cfg).eval()


@functools.cache
def tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer over :data:`WORDS` (one token per word), sequence length TOKENS."""
    with tempfile.TemporaryDirectory() as d:
        save_tokenizer(WORDS, Path(d), max_length=TOKENS)
        return CLIPTokenizer.from_pretrained(d)


@functools.cache
def tiny_model(kind: str = "sd1") -> PipelineModel:
    """A PipelineModel of tiny random parts: 16x16 images, 8x8 latents, :func:`tiny_unet`."""
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=TOKENS, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()
    vae = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8, sample_size=16).eval()
    scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
        prediction_type="v_prediction" if kind == "sd2v" else "epsilon")
    if kind != "sdxl":
        pipe = SimpleNamespace(unet=tiny_unet(kind), vae=vae, tokenizer=tok, text_encoder=text,
                               scheduler=scheduler)
        return PipelineModel(pipe)
    # SDXL: two text encoders whose hidden states concatenate to TEXT_DIM; the second's pooled
    # projection (TEXT_DIM) and 6 size ids feed the UNet's text_time embedding.
    torch.manual_seed(1)
    encoders = [cls(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=TEXT_DIM // 2, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=TOKENS, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, projection_dim=TEXT_DIM,
    )).eval() for cls in (CLIPTextModel, CLIPTextModelWithProjection)]
    pipe = SimpleNamespace(unet=tiny_unet(kind), vae=vae, tokenizer=tok, text_encoder=encoders[0],
                           tokenizer_2=tok, text_encoder_2=encoders[1], scheduler=scheduler,
                           config={"force_zeros_for_empty_prompt": True})
    return SDXLModel(pipe)


@functools.cache
def tiny_model_f64(kind: str = "sd1") -> PipelineModel:
    """:func:`tiny_model` in float64 (a copy): exact methods are exact to round-off there."""
    model = copy.deepcopy(tiny_model(kind))
    for part in (model.unet, model.vae, model.text_encoder, getattr(model, "text_encoder_2", None)):
        if part is not None:
            part.double()
    return model


# --- rectified-flow transformers (SD3, Flux) -------------------------------------------------

T5_DIM = 32  # T5 width = the transformers' joint_attention_dim


def _tiny_clip(cls, tok, *, hidden: int, projection: int | None = None):
    extra = {} if projection is None else {"projection_dim": projection}
    return cls(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=TOKENS, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **extra)).eval()


def _tiny_t5(tok):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tok), d_model=T5_DIM, d_kv=8, d_ff=37, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id)).eval()


def _tiny_flow_vae(latent_channels: int) -> diffusers.AutoencoderKL:
    return diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), latent_channels=latent_channels, norm_num_groups=8,
        sample_size=16, scaling_factor=1.5, shift_factor=0.06).eval()


def tiny_sd3_pipeline(*, t5: bool = True) -> diffusers.StableDiffusion3Pipeline:
    """A StableDiffusion3Pipeline of tiny random parts: 16x16 images, 4x8x8 latents, patch 2
    (16 image tokens); the word tokenizer serves as CLIP and T5 tokenizer (offline)."""
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=T5_DIM,
        caption_projection_dim=16, pooled_projection_dim=TEXT_DIM,  # two CLIP projections
        pos_embed_max_size=8).eval()
    return diffusers.StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_flow_vae(4),
        text_encoder=_tiny_clip(CLIPTextModelWithProjection, tok, hidden=TEXT_DIM // 2,
                                projection=TEXT_DIM // 2),
        tokenizer=tok,
        text_encoder_2=_tiny_clip(CLIPTextModelWithProjection, tok, hidden=TEXT_DIM // 2,
                                  projection=TEXT_DIM // 2),
        tokenizer_2=tok,
        text_encoder_3=_tiny_t5(tok) if t5 else None,
        tokenizer_3=tok if t5 else None,
    ).to("cpu")


def tiny_flux_pipeline(*, guidance: bool = True) -> diffusers.FluxPipeline:
    """A FluxPipeline of tiny random parts: 16x16 images, 16x8x8 latents packed to 16 tokens
    of 64 channels; ``guidance``: a guidance-distilled transformer (FLUX.1-dev style)."""
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=T5_DIM, pooled_projection_dim=TEXT_DIM // 2,
        guidance_embeds=guidance, axes_dims_rope=(2, 2, 4)).eval()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    return diffusers.FluxPipeline(
        scheduler=scheduler, vae=_tiny_flow_vae(16),
        text_encoder=_tiny_clip(CLIPTextModel, tok, hidden=TEXT_DIM // 2), tokenizer=tok,
        text_encoder_2=_tiny_t5(tok), tokenizer_2=tok, transformer=transformer,
    ).to("cpu")
