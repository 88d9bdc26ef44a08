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

from ..checks import finite, finite_tensor, note, prompt_list
from ..grids import discrete_grid
from ..guidance import CFGDenoiser
from ..schedules import Schedule
from ..toyworld.folder import check_prompt, model_folder, toyworld_vocabulary
from .conditioning import Conditioning
from .loading import load_pipeline
from .unet import UNetDenoiser

__all__ = ["PipelineModel", "ImageLike"]

ImageLike = torch.Tensor | np.ndarray | Image.Image | list

class PipelineModel:
    """Prompt/image encoding, decoding and denoisers for an SD1.x/SD2-style pipeline."""

    #: Whether the family denoises with a UNet; transformer families (SD3, Flux) keep
    #: ``unet = None`` and give their network as :attr:`network`.
    has_unet = True

    def __init__(self, pipe, *, folder: str | Path | None = None):
        self.pipe = pipe
        self.unet = pipe.unet if self.has_unet else None
        self.vae = pipe.vae
        self.tokenizer = pipe.tokenizer
        self.text_encoder = pipe.text_encoder
        self.folder = Path(folder) if folder is not None else None
        self.schedule = Schedule.from_diffusers_config(pipe.scheduler.config)
        self.prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
        # ToyWorld folders carry their vocabulary; prompts outside it are refused.
        self.vocabulary = toyworld_vocabulary(self.folder) if self.folder else None
        #: For a guidance-distilled model, ``(cond, w) -> cond`` making the network read the
        #: guidance scale ``w`` (no negative branch); None where ``cfg`` is classifier-free
        #: guidance.
        self.embed_guidance = None

    @classmethod
    def load(cls, model: str | Path | None = None, **kw) -> PipelineModel:
        """Load a local diffusers folder (default: the shipped ToyWorld model; the name
        ``toyworld-flow`` loads the shipped flow model) with the adapter of its family
        (``_class_name`` in ``model_index.json``)."""
        from .flux import FluxModel
        from .sd3 import SD3Model
        from .sdxl import SDXLModel

        folder = model_folder(model)
        pipe = load_pipeline(folder, **kw)  # the class model_index.json's _class_name names
        adapters = {"StableDiffusionPipeline": cls, "StableDiffusionXLPipeline": SDXLModel,
                    "StableDiffusion3Pipeline": SD3Model, "FluxPipeline": FluxModel}
        return adapters[type(pipe).__name__](pipe, folder=folder)

    @property
    def network(self) -> torch.nn.Module:
        """The denoising network: the UNet here, the transformer for SD3 / Flux."""
        return self.unet

    @property
    def device(self) -> torch.device:
        return self.network.device

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
        """Refuse a prompt the model would not read whole: words outside a ToyWorld model's
        vocabulary, or more tokens than the text encoder takes (never truncated silently)."""
        if not isinstance(prompt, str):
            raise ValueError(f"a prompt must be a string, got {prompt!r}")
        check_prompt(prompt, self.vocabulary)
        limit = self.tokenizer.model_max_length
        n = len(self.tokenizer(prompt, truncation=False).input_ids)  # with BOS and EOS
        if n > limit:
            raise ValueError(
                f"the prompt {prompt[:40]!r}{'...' if len(prompt) > 40 else ''} is {n} tokens "
                f"with BOS/EOS; this text encoder reads at most {limit}: shorten it"
            )

    def _token_ids(self, tokenizer, prompts: list[str]) -> torch.Tensor:
        return tokenizer(
            prompts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)

    def encode(self, prompts: list[str] | str) -> Conditioning:
        """The conditioning of ``prompts``: one row each (SD1/2: the text encoder's last
        hidden states as ``embeds``)."""
        prompts = prompt_list(prompts)
        for p in prompts:
            self.check_prompt(p)
        with torch.no_grad():
            return Conditioning(self.text_encoder(self._token_ids(self.tokenizer, prompts))[0])

    def encode_negative(self, prompts: list[str] | str) -> Conditioning:
        """The unconditional (negative-prompt) conditioning of ``prompts`` (SD1/2: as
        :meth:`encode`)."""
        return self.encode(prompts)

    def encode_prompt(self, prompts: list[str] | str) -> torch.Tensor:
        """Token embeddings (B, L, D) of ``prompts`` (the ``embeds`` of :meth:`encode`)."""
        return self.encode(prompts).embeds

    # --- images --------------------------------------------------------------------------

    def to_tensor(self, images: ImageLike) -> torch.Tensor:
        """Images as a float tensor (B, 3, H, W) in [-1, 1] on the model's device.

        Takes PIL images (adapted by :func:`retouch.images.prepare_image`: converted to RGB,
        resized to the model's square size, other aspect ratios refused), uint8 arrays
        (H, W, 3) or (B, H, W, 3) of the model's size, or float tensors (B, 3, H, W) in [-1, 1].
        """
        from ..images import prepare_image

        size = self.image_size
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, list):
            if not images or not all(isinstance(im, Image.Image) for im in images):
                raise ValueError("a list of images must hold at least one PIL image and only "
                                 "PIL images")
            adapted = []
            for im in images:
                im, notes = prepare_image(im, size)
                for text in notes:
                    note(text)
                adapted.append(np.asarray(im))
            images = np.stack(adapted)
        if isinstance(images, np.ndarray):
            arr = images[None] if images.ndim == 3 else images
            if arr.dtype != np.uint8:
                raise ValueError(
                    f"image arrays must be uint8 (0..255), got {arr.dtype}; for floats in "
                    "[0, 1] pass (array * 255).round().astype(np.uint8)")
            if arr.ndim != 4 or arr.shape[-1] != 3:
                raise ValueError(
                    f"an image array must be (H, W, 3) or (B, H, W, 3) RGB, got shape "
                    f"{images.shape}; drop an alpha channel with array[..., :3]")
            if arr.shape[1:3] != (size, size):
                raise ValueError(f"the image array is {arr.shape[2]}x{arr.shape[1]}; this model "
                                 f"takes {size}x{size}: resize it (or pass a PIL image)")
            images = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        elif isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
                raise ValueError(f"an image tensor must be float (B, 3, H, W) in [-1, 1], got "
                                 f"{images.dtype} {tuple(images.shape)}")
            finite_tensor("the image tensor", images)
            if float(images.abs().max()) > 1.0 + 1e-3:
                raise ValueError(f"an image tensor must hold values in [-1, 1], got up to "
                                 f"{float(images.abs().max()):.3g}; for 0..1 images pass "
                                 "2 * x - 1")
            if tuple(images.shape[-2:]) != (size, size):
                raise ValueError(f"the image tensor is {images.shape[-1]}x{images.shape[-2]}; "
                                 f"this model takes {size}x{size}: resize it")
        else:
            raise ValueError(f"cannot read a {type(images).__name__} as images; pass a PIL "
                             "image, a uint8 array or a float tensor in [-1, 1]")
        return images.to(self.device, self.vae.dtype).contiguous()  # HWC arrays arrive permuted

    def check_latent(self, x: torch.Tensor, name: str = "latent") -> torch.Tensor:
        """Refuse a latent this model cannot take: not (B, C, h, w) with the UNet's channel
        count, sides not a multiple of its downsampling, or holding NaN / Inf."""
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"a {name} must be a (B, C, h, w) tensor, got {shape}")
        c = self.unet.config.in_channels
        if x.shape[1] != c:
            raise ValueError(f"the {name} has {x.shape[1]} channels; this model's latents have "
                             f"{c} (encode images with model.encode_image)")
        factor = 2 ** (len(self.unet.config.block_out_channels) - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"the {name} is {x.shape[3]}x{x.shape[2]}; this UNet needs sides "
                             f"that are multiples of {factor}")
        return finite_tensor(f"the {name}", x)

    @torch.no_grad()
    def encode_image(self, images: ImageLike) -> torch.Tensor:
        """Scaled VAE latents (the posterior mean): ``(E(x) - shift) * scaling_factor``."""
        x = self.to_tensor(images)
        z = torch.cat([self.vae.encode(b).latent_dist.mode() for b in x.split(64)])
        shift = self.vae.config.get("shift_factor") or 0.0
        # The encoder's convolutions may hand back a channels-last layout; a latent's layout
        # picks the CPU kernels of every later call, so it is made standard once, here.
        return ((z - shift) * self.vae.config.scaling_factor).float().contiguous()

    def decode_tensor(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in about [-1, 1] from scaled latents, with gradients when the
        caller records them (losses on the decoded image, e.g. SyncDiffusion)."""
        shift = self.vae.config.get("shift_factor") or 0.0
        z = (latents.to(self.vae.dtype) / self.vae.config.scaling_factor + shift).contiguous()
        return self.vae.decode(z).sample.float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, *, output: str = "uint8"):
        """Images from scaled latents: uint8 (B, H, W, 3) numpy, or a [-1, 1] tensor."""
        finite_tensor("the latents to decode", latents)
        x = torch.cat([self.decode_tensor(b) for b in latents.split(64)])
        if output == "tensor":
            return x
        if output != "uint8":
            raise ValueError(f"unknown output {output!r}; valid: uint8, tensor")
        x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return x.permute(0, 2, 3, 1).cpu().numpy()

    # --- denoising -----------------------------------------------------------------------

    def network_denoiser(self, cond: Conditioning | None = None):
        """The network as a conditional denoiser ``x0_hat(x, t, cond=...)`` (no guidance)."""
        return UNetDenoiser(self.unet, self.schedule, prediction_type=self.prediction_type,
                            cond=cond)

    def unet_denoiser(self, cond: Conditioning | None = None):
        """:meth:`network_denoiser` under the name callers written for UNets use."""
        return self.network_denoiser(cond)

    def denoiser(
        self,
        prompts: list[str] | str | Conditioning | torch.Tensor,
        *,
        cfg: float = 5.0,
        negative: list[str] | str | Conditioning | torch.Tensor = "",
    ):
        """The denoiser ``x0_hat(x, t)`` for ``prompts`` (or their conditioning) with CFG ``cfg``.

        ``cfg == 1`` gives the conditional denoiser alone (one network call per step).
        """
        finite("cfg", cfg)
        cond = self._conditioning(prompts, self.encode)
        if cfg == 1.0:
            return self.network_denoiser(cond)
        uncond = self._conditioning(negative, self.encode_negative)
        return CFGDenoiser(self.network_denoiser(), cond=cond, uncond=uncond, scale=cfg)

    def _conditioning(self, given, encode) -> Conditioning:
        if isinstance(given, Conditioning):
            return given
        if isinstance(given, torch.Tensor):  # bare token embeddings
            if self.needs_added:
                raise ValueError(f"a {type(self).__name__} needs added conditions beside the "
                                 "token embeddings: pass model.encode(prompts)")
            return Conditioning(given)
        return encode(given)

    #: Whether the family's UNet needs added conditions beside the token embeddings (SDXL).
    needs_added = False
    @property
    def text_tokens(self):
        """What the network's text positions are, for token maps and word positions
        (:mod:`retouch.attention.tokens`): the tokenizer's padded sequence here."""
        return self.tokenizer

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

