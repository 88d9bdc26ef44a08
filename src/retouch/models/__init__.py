"""Adapters from diffusers/transformers models to the retouch denoiser contract."""

from retouch.guidance import CFGDenoiser
from retouch.models.transformer import TransformerDenoiser
from retouch.models.unet import UNetDenoiser

__all__ = ["UNetDenoiser", "TransformerDenoiser", "CFGDenoiser"]
