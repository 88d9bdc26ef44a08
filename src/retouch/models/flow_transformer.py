"""What SD3 and Flux adapters share: a rectified-flow transformer behind a CLIP + T5 text stack.

:class:`FlowTransformerModel` is a :class:`~retouch.models.pipeline.PipelineModel` whose
network is ``pipe.transformer`` (``unet`` is None; attention control addresses its joint
attention, :mod:`retouch.attention.joint`), whose schedule is a
:class:`~retouch.schedules.FlowSchedule` and whose denoiser is a
:class:`~retouch.models.transformer.TransformerDenoiser`. Prompts are read by CLIP (at most
``tokenizer.model_max_length`` tokens) and T5 (at most ``max_sequence_length``): a prompt over
the T5 limit is refused; one over CLIP's limit that fits T5 is read whole by T5 and truncated
by CLIP, as in diffusers, which a :func:`~retouch.checks.note` says.

``time_grid`` is the pipeline scheduler's own sigma grid (``FlowMatchEulerDiscreteScheduler``:
static ``shift``, or ``use_dynamic_shifting`` with ``mu`` from the image token count).

References: Esser et al. 2024 (SD3, Sec. 5.3.2 resolution-dependent timestep shifting);
diffusers ``StableDiffusion3Pipeline``, ``FluxPipeline`` (``calculate_shift``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..checks import count, finite_tensor, note
from ..schedules import FlowSchedule
from ..toyworld.folder import check_prompt
from .conditioning import Conditioning
from .pipeline import PipelineModel
from .transformer import TransformerDenoiser

__all__ = ["FlowTransformerModel", "calculate_shift"]


def calculate_shift(image_seq_len: int, *, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """``mu`` of dynamic shifting: linear in the image token count, ``base_shift`` at
    ``base_seq_len`` tokens and ``max_shift`` at ``max_seq_len`` (diffusers' calculate_shift)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


class FlowTransformerModel(PipelineModel):
    """A :class:`PipelineModel` around a rectified-flow transformer (subclassed per family)."""

    has_unet = False
    needs_added = True
    #: The TransformerDenoiser family (input conventions) of the subclass.
    family = ""
    #: The family pipeline's ``max_shift`` default when the scheduler config has none.
    default_max_shift = 1.15
    #: The family pipeline's default T5 length (``max_sequence_length``).
    default_max_sequence_length = 256

    def __init__(self, pipe, *, folder=None, max_sequence_length: int | None = None):
        if getattr(pipe, "transformer", None) is None:
            raise ValueError(f"this pipeline has no transformer; a {type(self).__name__} needs "
                             "the folder's transformer part")
        self.transformer = pipe.transformer
        super().__init__(pipe, folder=folder)
        if not isinstance(self.schedule, FlowSchedule):
            raise ValueError(f"a {type(self).__name__} needs a FlowMatch scheduler, got "
                             f"{type(pipe.scheduler).__name__}: use the folder's own scheduler")
        self.prediction_type = TransformerDenoiser.prediction_type  # flow velocity
        if max_sequence_length is None:  # a ToyWorld flow model says the length it learnt
            max_sequence_length = _folder_sequence_length(folder) or (
                self.default_max_sequence_length)
        self.max_sequence_length = count("max_sequence_length", max_sequence_length)
        self.t5_tokenizer = None  # set by the subclass (None: the family runs without T5)

    @property
    def network(self) -> torch.nn.Module:
        return self.transformer

    @property
    def patch(self) -> int:
        """Latent pixels per token side (the sides of a latent must be multiples of it)."""
        return 2

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels

    @property
    def latent_side(self) -> int:
        return self.image_size // self.vae_factor

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, self.latent_channels, self.latent_side, self.latent_side)

    def check_latent(self, x: torch.Tensor, name: str = "latent") -> torch.Tensor:
        """Refuse a latent this model cannot take: not (B, C, h, w) with the transformer's
        latent channels, sides not a multiple of its patch, or holding NaN / Inf."""
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"a {name} must be a (B, C, h, w) tensor, got {shape}")
        c = self.latent_channels
        if x.shape[1] != c:
            raise ValueError(f"the {name} has {x.shape[1]} channels; this model's latents have "
                             f"{c} (encode images with model.encode_image)")
        if x.shape[2] % self.patch or x.shape[3] % self.patch:
            raise ValueError(f"the {name} is {x.shape[3]}x{x.shape[2]}; this transformer needs "
                             f"sides that are multiples of {self.patch}")
        return finite_tensor(f"the {name}", x)

    # --- text ----------------------------------------------------------------------------

    def check_prompt(self, prompt: str) -> None:
        """Refuse a prompt over the T5 limit (``max_sequence_length``, never truncated
        silently); note one over CLIP's limit, which CLIP reads truncated (as diffusers)."""
        if not isinstance(prompt, str):
            raise ValueError(f"a prompt must be a string, got {prompt!r}")
        check_prompt(prompt, self.vocabulary)
        short = f"{prompt[:40]!r}{'...' if len(prompt) > 40 else ''}"
        clip_limit = self.tokenizer.model_max_length
        clip_n = len(self.tokenizer(prompt, truncation=False).input_ids)  # with BOS and EOS
        if self.t5_tokenizer is None:
            if clip_n > clip_limit:
                raise ValueError(f"the prompt {short} is {clip_n} CLIP tokens; without a T5 "
                                 f"encoder this model reads at most {clip_limit}: shorten it")
            return
        t5_n = len(self.t5_tokenizer(prompt, truncation=False).input_ids)
        if t5_n > self.max_sequence_length:
            raise ValueError(f"the prompt {short} is {t5_n} T5 tokens; this model reads at most "
                             f"max_sequence_length={self.max_sequence_length}: shorten it")
        if clip_n > clip_limit:
            note(f"the prompt {short} is {clip_n} CLIP tokens: T5 reads it whole, CLIP reads "
                 f"its first {clip_limit} (as diffusers does)")

    def _clip_ids(self, tokenizer, prompts: list[str]) -> torch.Tensor:
        """CLIP token ids padded (and, past the limit, truncated) to the first tokenizer's
        length, for every CLIP encoder (diffusers' ``tokenizer_max_length``)."""
        return tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(self.device)

    def _t5_ids(self, prompts: list[str]) -> torch.Tensor:
        return self.t5_tokenizer(prompts, padding="max_length", max_length=self.max_sequence_length,
                                 truncation=True, return_tensors="pt").input_ids.to(self.device)

    # --- denoising -----------------------------------------------------------------------

    def network_denoiser(self, cond: Conditioning | None = None) -> TransformerDenoiser:
        """The transformer as a conditional denoiser ``x0_hat(x, t, cond=...)`` (no guidance)."""
        return TransformerDenoiser(self.transformer, self.schedule, family=self.family, cond=cond)

    def image_tokens(self) -> int:
        """Image tokens of a latent of the model's size (the ``mu`` of dynamic shifting)."""
        return (self.latent_side // self.patch) ** 2

    def _mu(self) -> float | None:
        """``mu`` for the scheduler (dynamic shifting; None: the scheduler's static ``shift``)."""
        config = self.pipe.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return None
        return calculate_shift(
            self.image_tokens(),
            base_seq_len=config.get("base_image_seq_len", 256),
            max_seq_len=config.get("max_image_seq_len", 4096),
            base_shift=config.get("base_shift", 0.5),
            max_shift=config.get("max_shift", self.default_max_shift),
        )

    def _sigmas(self, steps: int) -> list[float] | None:
        """The unshifted sigmas the family's pipeline passes to the scheduler (None: its own)."""
        return None

    def time_grid(self, steps: int) -> torch.Tensor:
        """The pipeline scheduler's own sigmas for ``steps`` steps as model times (float64,
        decreasing from about 1, ending at 0): a fresh scheduler of the same config runs
        ``set_timesteps`` as the family's pipeline calls it."""
        count("steps", steps)
        scheduler = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        if scheduler.config.get("invert_sigmas", False):
            raise ValueError("a scheduler with invert_sigmas=True runs time the other way; "
                             "retouch reads flow model time as sigma: use the folder's own")
        kw = {} if (mu := self._mu()) is None else {"mu": mu}
        scheduler.set_timesteps(steps, sigmas=self._sigmas(steps), **kw)
        return scheduler.sigmas.to(torch.float64).cpu()


def _folder_sequence_length(folder) -> int | None:
    """``max_sequence_length`` from a ToyWorld folder's ``toyworld.json`` (None elsewhere)."""
    from ..files import read_json

    path = Path(folder) / "toyworld.json" if folder is not None else None
    if path is None or not path.is_file():
        return None
    info = read_json(path, "ToyWorld model description")
    return info.get("max_sequence_length") if isinstance(info, dict) else None
