"""A diffusers Stable Diffusion pipeline seen through retouch's contracts.

``PipelineModel`` encodes prompts (tokenizer + text encoder), images (VAE, with the config's
``scaling_factor``) and decodes latents; ``denoiser(...)`` gives the one denoiser contract of
:mod:`retouch.denoiser` with classifier-free guidance. Techniques talk to this object and to the
denoiser, never to the pipeline's own ``__call__`` or scheduler.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..denoiser import CFGDenoiser
from ..grids import discrete_grid
from ..schedules import Schedule
from .loading import check_prompt, load_pipeline, toyworld_model_dir, toyworld_vocabulary
from .unet import UNetDenoiser

__all__ = ["PipelineModel", "ImageLike"]

ImageLike = torch.Tensor | np.ndarray | Image.Image | list


class PipelineModel:
    """Prompt/image encoding, decoding and denoisers for an SD1.x/SD2-style pipeline."""

    def __init__(self, pipe, *, folder: str | Path | None = None):
        self.pipe = pipe
        self.unet = pipe.unet
        self.vae = pipe.vae
        self.tokenizer = pipe.tokenizer
        self.text_encoder = pipe.text_encoder
        self.folder = Path(folder) if folder is not None else None
        self.schedule = Schedule.from_diffusers_config(pipe.scheduler.config)
        self.prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
        # ToyWorld folders carry their vocabulary; prompts outside it are refused.
        self.vocabulary = toyworld_vocabulary(self.folder) if self.folder else None

    @classmethod
    def load(cls, model: str | Path | None = None, **kw) -> PipelineModel:
        """Load a local diffusers folder (default: the shipped ToyWorld model)."""
        folder = Path(model) if model is not None else toyworld_model_dir()
        return cls(load_pipeline(folder, **kw), folder=folder)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def image_size(self) -> int:
        return self.unet.config.sample_size * self.vae_factor

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        s = self.unet.config.sample_size
        return (batch, self.unet.config.in_channels, s, s)

    # --- text ----------------------------------------------------------------------------

    def check_prompt(self, prompt: str) -> None:
        check_prompt(prompt, self.vocabulary)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str] | str) -> torch.Tensor:
        """Text-encoder hidden states (B, L, D) for ``prompts``."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        for p in prompts:
            self.check_prompt(p)
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.text_encoder(ids)[0]

    # --- images --------------------------------------------------------------------------

    def to_tensor(self, images: ImageLike) -> torch.Tensor:
        """Images as a float tensor (B, 3, H, W) in [-1, 1] on the model's device."""
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, list):
            images = np.stack([np.asarray(im.convert("RGB")) for im in images])
        if isinstance(images, np.ndarray):
            arr = images[None] if images.ndim == 3 else images
            images = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return images.to(self.device, self.vae.dtype).contiguous()  # HWC arrays arrive permuted

    @torch.no_grad()
    def encode_image(self, images: ImageLike) -> torch.Tensor:
        """Scaled VAE latents (the posterior mean): ``(E(x) - shift) * scaling_factor``."""
        x = self.to_tensor(images)
        z = torch.cat([self.vae.encode(b).latent_dist.mode() for b in x.split(64)])
        shift = self.vae.config.get("shift_factor") or 0.0
        # The encoder's convolutions may hand back a channels-last layout; a latent's layout
        # picks the CPU kernels of every later call, so it is made standard once, here.
        return ((z - shift) * self.vae.config.scaling_factor).float().contiguous()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, *, output: str = "uint8"):
        """Images from scaled latents: uint8 (B, H, W, 3) numpy, or a [-1, 1] tensor."""
        shift = self.vae.config.get("shift_factor") or 0.0
        z = (latents.to(self.vae.dtype) / self.vae.config.scaling_factor + shift).contiguous()
        x = torch.cat([self.vae.decode(b).sample for b in z.split(64)]).float()
        if output == "tensor":
            return x
        if output != "uint8":
            raise ValueError(f"unknown output {output!r}; valid: uint8, tensor")
        x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return x.permute(0, 2, 3, 1).cpu().numpy()

    # --- denoising -----------------------------------------------------------------------

    def denoiser(
        self,
        prompts: list[str] | str | torch.Tensor,
        *,
        cfg: float = 5.0,
        negative: list[str] | str | torch.Tensor = "",
    ):
        """The denoiser ``x0_hat(x, t)`` for ``prompts`` (or their embeddings) with CFG ``cfg``.

        ``cfg == 1`` gives the conditional denoiser alone (one UNet call per step).
        """
        cond = prompts if isinstance(prompts, torch.Tensor) else self.encode_prompt(prompts)
        unet = UNetDenoiser(self.unet, self.schedule, prediction_type=self.prediction_type,
                            encoder_hidden_states=cond)
        if cfg == 1.0:
            return unet
        uncond = negative if isinstance(negative, torch.Tensor) else self.encode_prompt(negative)
        return CFGDenoiser(
            unet,
            cond={"encoder_hidden_states": cond},
            uncond={"encoder_hidden_states": uncond},
            scale=cfg,
        )

    def time_grid(self, steps: int) -> torch.Tensor:
        """The pipeline scheduler's own timestep grid for ``steps`` steps, ending clean.

        Spacing and ``steps_offset`` come from the scheduler config; the last step goes to
        ``alpha = 1`` if ``set_alpha_to_one`` else to ``alphas_cumprod[0]`` (diffusers' DDIM).
        """
        config = self.pipe.scheduler.config
        final = None if config.get("set_alpha_to_one", True) else 0.0
        return discrete_grid(
            self.schedule,
            steps,
            spacing=config.get("timestep_spacing", "leading"),
            steps_offset=config.get("steps_offset", 0),
            final=final,
        )
