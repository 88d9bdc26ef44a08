"""The Stable Diffusion 3 adapter: an MMDiT reading CLIP-L + CLIP-G (+ T5) text.

The transformer's token embeddings are the concatenated penultimate hidden states of the two
CLIP encoders, zero-padded to the T5 width, followed by T5's last hidden states
(``max_sequence_length`` tokens; all zeros when the folder has no T5 encoder, as in
diffusers). Its pooled input is the concatenation of both CLIP projections. Guidance is
standard classifier-free guidance, both branches in one batched call; an empty negative prompt
is encoded like any other (SD3 has no zeroed negative).

References: Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image
Synthesis" (SD3, Sec. 4 and 5.3); diffusers ``StableDiffusion3Pipeline.encode_prompt``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import prompt_list
from .conditioning import Conditioning
from .flow_transformer import FlowTransformerModel

__all__ = ["SD3Model"]


class SD3Model(FlowTransformerModel):
    """A :class:`FlowTransformerModel` for ``StableDiffusion3Pipeline`` folders."""

    family = "sd3"
    default_max_shift = 1.16  # StableDiffusion3Pipeline's fallback
    default_max_sequence_length = 256

    def __init__(self, pipe, *, folder=None, max_sequence_length: int | None = None):
        super().__init__(pipe, folder=folder, max_sequence_length=max_sequence_length)
        parts = ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]
        if getattr(pipe, "text_encoder_3", None) is not None:
            parts.append("tokenizer_3")  # T5 itself is optional, its tokenizer is not
        missing = [n for n in parts if getattr(pipe, n, None) is None]
        if missing:
            raise ValueError(f"this SD3 pipeline lacks {', '.join(missing)}; SD3 needs both CLIP "
                             "encoders and their tokenizers (and T5's tokenizer with T5)")
        self.text_encoder_2 = pipe.text_encoder_2
        self.tokenizer_2 = pipe.tokenizer_2
        self.text_encoder_3 = getattr(pipe, "text_encoder_3", None)  # T5; None: zeros
        self.t5_tokenizer = pipe.tokenizer_3 if self.text_encoder_3 is not None else None

    @property
    def image_size(self) -> int:
        return self.transformer.config.sample_size * self.vae_factor

    @property
    def patch(self) -> int:
        return self.transformer.config.patch_size

    def check_latent(self, x: torch.Tensor, name: str = "latent") -> torch.Tensor:
        """:meth:`FlowTransformerModel.check_latent`, and no more patches a side than the
        transformer's position embedding holds (``pos_embed_max_size``)."""
        x = super().check_latent(x, name)
        most = self.transformer.config.get("pos_embed_max_size")
        if most is not None and max(x.shape[2:]) > most * self.patch:
            raise ValueError(f"the {name} is {x.shape[3]}x{x.shape[2]}; this transformer's "
                             f"position embedding takes sides up to {most * self.patch}")
        return x

    @property
    def text_tokens(self):
        """The joint attention's text positions: CLIP's (CLIP-L and -G side by side), then
        T5's (holding no tokens without T5), as :meth:`encode` stacks them."""
        from ..attention.tokens import TextSequence

        return TextSequence(((self.tokenizer, self.tokenizer.model_max_length),
                             (self.t5_tokenizer, self.max_sequence_length)))

    def _t5_embeds(self, prompts: list[str]) -> torch.Tensor:
        """T5's last hidden states (B, max_sequence_length, D), or zeros without T5."""
        if self.text_encoder_3 is None:
            width = self.transformer.config.joint_attention_dim
            return torch.zeros(len(prompts), self.max_sequence_length, width,
                               device=self.device, dtype=self.text_encoder.dtype)
        return self.text_encoder_3(self._t5_ids(prompts))[0]

    def encode(self, prompts: list[str] | str) -> Conditioning:
        """The conditioning of ``prompts``: ``embeds`` (B, CLIP length + max_sequence_length, D:
        77 + 256 for SD3) and
        ``added = {"pooled_projections": (B, P)}``."""
        prompts = prompt_list(prompts)
        for p in prompts:
            self.check_prompt(p)
        with torch.no_grad():
            hidden, pooled = [], []
            for tok, enc in ((self.tokenizer, self.text_encoder),
                             (self.tokenizer_2, self.text_encoder_2)):
                out = enc(self._clip_ids(tok, prompts), output_hidden_states=True)
                hidden.append(out.hidden_states[-2])  # the penultimate layer (clip_skip=None)
                pooled.append(out[0])  # the projected pooled embedding (text_embeds)
            t5 = self._t5_embeds(prompts)
            clip = F.pad(torch.cat(hidden, dim=-1), (0, t5.shape[-1] - sum(h.shape[-1]
                                                                             for h in hidden)))
            return Conditioning(torch.cat([clip, t5.to(clip.dtype)], dim=-2),
                                {"pooled_projections": torch.cat(pooled, dim=-1)})
