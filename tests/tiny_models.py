"""Tiny random models shared by the tests: SD1.x / SD2-v / SDXL UNets, a word tokenizer, and
PipelineModels built from them (seconds to build, meaningless weights: plumbing only)."""

import copy
import functools
import tempfile
from pathlib import Path
from types import SimpleNamespace

import diffusers
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from retouch.guidance import CFGDenoiser
from retouch.models.pipeline import PipelineModel
from retouch.models.unet import UNetDenoiser
from retouch.toyworld.tokenizer import save_tokenizer

__all__ = ["CONFIGS", "TEXT_DIM", "TOKENS", "WORDS", "SDXLModel", "tiny_model", "tiny_model_f64",
           "tiny_tokenizer", "tiny_unet"]

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


class SDXLModel(PipelineModel):
    """A PipelineModel whose denoiser adds SDXL's pooled-text and size conditioning."""

    def _added(self, prompts):
        ids = self.tokenizer(prompts, padding="max_length", max_length=TOKENS,
                             return_tensors="pt").input_ids
        pooled = self.text_encoder(ids)[1]  # (B, TEXT_DIM)
        size = self.image_size
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)
        return {"text_embeds": pooled, "time_ids": time_ids.expand(len(prompts), -1)}

    @torch.no_grad()
    def denoiser(self, prompts, *, cfg=5.0, negative=""):
        cond = {"encoder_hidden_states": self.encode_prompt(prompts),
                "added_cond_kwargs": self._added(prompts)}
        uncond = {"encoder_hidden_states": self.encode_prompt(negative),
                  "added_cond_kwargs": self._added([negative])}
        inner = UNetDenoiser(self.unet, self.schedule, prediction_type=self.prediction_type)
        return CFGDenoiser(inner, cond=cond, uncond=uncond, scale=cfg)


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
    pipe = SimpleNamespace(unet=tiny_unet(kind), vae=vae, tokenizer=tok, text_encoder=text,
                           scheduler=scheduler)
    return (SDXLModel if kind == "sdxl" else PipelineModel)(pipe)


@functools.cache
def tiny_model_f64(kind: str = "sd1") -> PipelineModel:
    """:func:`tiny_model` in float64 (a copy): exact methods are exact to round-off there."""
    model = copy.deepcopy(tiny_model(kind))
    for part in (model.unet, model.vae, model.text_encoder):
        part.double()
    return model
