"""The SDXL adapter: two text encoders, a pooled text embedding and size conditioning.

SDXL's UNet reads the concatenated penultimate hidden states of CLIP ViT-L and OpenCLIP
ViT-bigG (``embeds``) and, through its ``text_time`` added embedding, the pooled projection of
the second encoder (``text_embeds``) and six size ids (``time_ids`` = original size, crop
top-left, target size). With the config's ``force_zeros_for_empty_prompt`` an empty negative
prompt is all zeros, as in diffusers' pipeline.

References: Podell et al. 2023 (SDXL, Sec. 2.2 micro-conditioning); diffusers
``StableDiffusionXLPipeline.encode_prompt`` and ``_get_add_time_ids``.
"""

from __future__ import annotations

import torch

from ..checks import prompt_list
from .conditioning import Conditioning
from .pipeline import PipelineModel

__all__ = ["SDXLModel"]


class SDXLModel(PipelineModel):
    """A :class:`PipelineModel` for ``StableDiffusionXLPipeline`` folders."""

    needs_added = True

    def __init__(self, pipe, **kw):
        super().__init__(pipe, **kw)
        missing = [n for n in ("text_encoder_2", "tokenizer_2")
                   if getattr(pipe, n, None) is None]
        if missing:
            raise ValueError(f"this SDXL pipeline lacks {', '.join(missing)}; SDXL needs both "
                             "text encoders and tokenizers")
        self.tokenizer_2 = pipe.tokenizer_2
        self.text_encoder_2 = pipe.text_encoder_2
        config = getattr(pipe, "config", {}) or {}
        self.force_zeros = bool(config.get("force_zeros_for_empty_prompt", True))

    def check_prompt(self, prompt: str) -> None:
        """:meth:`PipelineModel.check_prompt`, for both tokenizers (never truncated silently)."""
        super().check_prompt(prompt)
        limit = self.tokenizer_2.model_max_length
        n = len(self.tokenizer_2(prompt, truncation=False).input_ids)
        if n > limit:
            raise ValueError(f"the prompt {prompt[:40]!r} is {n} tokens for the second text "
                             f"encoder, which reads at most {limit}: shorten it")

    def size_ids(self, rows: int) -> torch.Tensor:
        """``(original h, w, crop top, left, target h, w)`` for an unmodified image of the
        model's size, (rows, 6)."""
        s = self.image_size
        ids = torch.tensor([[s, s, 0, 0, s, s]], dtype=self.unet.dtype, device=self.device)
        return ids.expand(rows, 6)

    def encode(self, prompts: list[str] | str) -> Conditioning:
        prompts = prompt_list(prompts)
        for p in prompts:
            self.check_prompt(p)
        with torch.no_grad():
            hidden, pooled = [], None
            for tok, enc in ((self.tokenizer, self.text_encoder),
                             (self.tokenizer_2, self.text_encoder_2)):
                out = enc(self._token_ids(tok, prompts), output_hidden_states=True)
                hidden.append(out.hidden_states[-2])  # the penultimate layer (clip_skip=None)
                pooled = out[0]  # the last encoder's pooled projection (text_embeds)
        return Conditioning(torch.cat(hidden, dim=-1),
                            {"text_embeds": pooled, "time_ids": self.size_ids(len(prompts))})

    def encode_negative(self, prompts: list[str] | str) -> Conditioning:
        prompts = prompt_list(prompts)
        cond = self.encode(prompts)
        if not (self.force_zeros and all(p == "" for p in prompts)):
            return cond
        return Conditioning(torch.zeros_like(cond.embeds),
                            {"text_embeds": torch.zeros_like(cond.added["text_embeds"]),
                             "time_ids": cond.added["time_ids"]})
