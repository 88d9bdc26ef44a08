"""The Flux adapter: a rectified-flow transformer reading T5 tokens and a pooled CLIP vector.

The transformer's token embeddings are T5's last hidden states (``max_sequence_length`` = 512
tokens by default); its pooled input is CLIP's pooled output. Latents are spatial
(B, C, h, w) everywhere in retouch; the 2x2 token packing is the denoiser's business
(:mod:`retouch.models.transformer`). Guidance-distilled transformers (``guidance_embeds``,
FLUX.1-dev) read the guidance scale as an input, ``added["guidance"]`` (B,): one network call
per step and no negative branch. Others (FLUX.1-schnell) use classifier-free guidance when
asked for (diffusers' ``true_cfg_scale``).

References: Black Forest Labs 2024 (FLUX.1); Meng et al. 2023 ("On Distillation of Guided
Diffusion Models", guidance as an input); diffusers ``FluxPipeline``.
"""

from __future__ import annotations

import torch

from ..checks import finite, prompt_list
from .conditioning import Conditioning
from .flow_transformer import FlowTransformerModel
from .transformer import FLUX_PATCH

__all__ = ["FluxModel"]


class FluxModel(FlowTransformerModel):
    """A :class:`FlowTransformerModel` for ``FluxPipeline`` folders."""

    family = "flux"
    default_max_shift = 1.15  # FluxPipeline's fallback
    default_max_sequence_length = 512
    #: FluxPipeline's default guidance scale (the distilled guidance a transformer reads).
    default_guidance = 3.5

    def __init__(self, pipe, *, folder=None, max_sequence_length: int | None = None):
        super().__init__(pipe, folder=folder, max_sequence_length=max_sequence_length)
        parts = {"text_encoder": "the CLIP encoder", "tokenizer": "the CLIP tokenizer",
                 "text_encoder_2": "the T5 encoder", "tokenizer_2": "the T5 tokenizer"}
        missing = [f"{n} ({what})" for n, what in parts.items() if getattr(pipe, n, None) is None]
        if missing:
            raise ValueError(f"this Flux pipeline lacks {', '.join(missing)}; Flux reads prompts "
                             "with CLIP and T5: use a folder that has both")
        self.text_encoder_2 = pipe.text_encoder_2
        self.tokenizer_2 = self.t5_tokenizer = pipe.tokenizer_2
        latent = self.vae.config.latent_channels
        if latent * FLUX_PATCH ** 2 != self.transformer.config.in_channels:
            raise ValueError(f"the transformer takes {self.transformer.config.in_channels} "
                             f"channels, not 4 x the VAE's {latent} latent channels: the parts "
                             "come from different models")
        #: Whether the transformer reads a distilled guidance scale (FLUX.1-dev).
        self.guided = bool(self.transformer.config.get("guidance_embeds", False))
        self.embed_guidance = self.with_guidance if self.guided else None

    @property
    def image_size(self) -> int:
        """The VAE config's ``sample_size`` (FLUX.1: 1024 = FluxPipeline's default 128 latent
        pixels x 8), else the pipeline's ``default_sample_size`` x ``vae_factor``."""
        size = self.vae.config.get("sample_size")
        if not isinstance(size, int):
            size = getattr(self.pipe, "default_sample_size", 128) * self.vae_factor
        return size

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels // FLUX_PATCH ** 2

    def _sigmas(self, steps: int) -> list[float] | None:
        """``linspace(1, 1/N, N)`` before shifting, as FluxPipeline passes them (unless the
        scheduler makes its own, ``use_flow_sigmas``)."""
        if self.pipe.scheduler.config.get("use_flow_sigmas", False):
            return None
        return torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64).tolist()

    @property
    def text_tokens(self):
        """The joint attention's text positions: T5's (Flux reads CLIP only pooled)."""
        from ..attention.tokens import TextSequence

        return TextSequence(((self.t5_tokenizer, self.max_sequence_length),))

    def with_guidance(self, cond: Conditioning, scale: float) -> Conditioning:
        """``cond`` reading the distilled guidance ``scale`` in every row."""
        guidance = torch.full((cond.rows,), finite("the guidance scale", scale),
                              dtype=torch.float32, device=cond.embeds.device)
        return Conditioning(cond.embeds, {**cond.added, "guidance": guidance}, cond.extra)

    def encode(self, prompts: list[str] | str, *, guidance: float | None = None) -> Conditioning:
        """The conditioning of ``prompts``: ``embeds`` = T5 (B, max_sequence_length, D),
        ``added = {"pooled_projections": (B, P)}`` and, for a guidance-distilled transformer,
        ``"guidance"`` (B,) = ``guidance`` (default :attr:`default_guidance`)."""
        prompts = prompt_list(prompts)
        for p in prompts:
            self.check_prompt(p)
        with torch.no_grad():
            ids = self._clip_ids(self.tokenizer, prompts)
            pooled = self.text_encoder(ids, output_hidden_states=False).pooler_output
            t5 = self.text_encoder_2(self._t5_ids(prompts), output_hidden_states=False)[0]
        cond = Conditioning(t5, {"pooled_projections": pooled.to(t5.dtype)})
        if not self.guided:
            if guidance is not None:
                raise ValueError("this Flux transformer has no guidance embedding "
                                 "(guidance_embeds=False): drop guidance=")
            return cond
        return self.with_guidance(cond, self.default_guidance if guidance is None else guidance)

    def denoiser(self, prompts, *, cfg: float | None = None, negative=""):
        """The denoiser ``x0_hat(x, t)`` for ``prompts`` (or their conditioning).

        Guidance-distilled transformers (``guidance_embeds``): ``cfg`` is the guidance scale
        the network reads (default 3.5, FluxPipeline's ``guidance_scale``; it replaces one in
        a given conditioning): one network call per step, no negative branch, so a non-empty
        ``negative`` is refused. Others (schnell): classifier-free guidance against
        ``negative`` when ``cfg != 1`` (diffusers' ``true_cfg_scale``), default 1 (none).
        """
        if not self.guided:
            return super().denoiser(prompts, cfg=1.0 if cfg is None else cfg, negative=negative)
        cfg = finite("cfg", self.default_guidance if cfg is None else cfg)
        empty = (negative == "" if isinstance(negative, str) else
                 isinstance(negative, list | tuple) and bool(negative)
                 and all(n == "" for n in negative))
        if not empty:
            given = repr(negative) if isinstance(negative, str | list | tuple) else (
                f"a {type(negative).__name__}")
            raise ValueError(f"this Flux transformer is guidance-distilled: cfg={cfg:g} is the "
                             f"guidance it reads and there is no negative branch; got negative="
                             f"{given[:60]}: pass negative='' (or use a non-distilled Flux)")
        return self.network_denoiser(self.with_guidance(self._conditioning(prompts, self.encode),
                                                        cfg))
