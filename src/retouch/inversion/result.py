"""The :class:`Inversion` record: what a reconstruction (or an editor) needs, saved as safetensors.

Tensors go into the safetensors body; everything else (method, cfg, steps, model fingerprint,
prompt, method options) into its string metadata as one JSON document under
``"retouch.inversion"``. A file is refused -- naming what differs -- when it was made with
another model (fingerprint), another step count or another method than the caller expects.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["Inversion", "load_inversion", "FORMAT_VERSION"]

#: Bumped when the file layout changes; older files are refused with a clear message.
FORMAT_VERSION = 1
_META_KEY = "retouch.inversion"
_TENSORS = ("times", "trajectory", "coupled", "uncond_embeddings", "offsets", "noises")


@dataclass
class Inversion:
    """An inverted latent and everything its reconstruction needs.

    Indices follow the sampling grid ``times = [t_0 > ... > t_N]``: ``trajectory[k]`` is the
    latent at ``t_k``; ``trajectory[-1]`` is the input and ``trajectory[0]`` (:attr:`latent`)
    where reconstruction starts. Per-step tensors have N entries, entry ``k`` belonging to the
    sampling step ``t_k -> t_{k+1}``.
    """

    method: str  # name in retouch.inversion.METHODS
    times: Tensor  # (N+1,) float64 sampling grid the reconstruction runs along
    trajectory: Tensor  # (N+1, B, C, H, W) latents x_k at t_k (method's own chain)
    cfg: float  # guidance scale w the reconstruction (and the source branch of an edit) uses
    fingerprint: str  # model_fingerprint of the network it was made with
    prompt: str | list[str] | None = None  # source prompt(s), when made from a PipelineModel
    coupled: Tensor | None = None  # (B, C, H, W) second latent: EDICT's y_0, BDIA's x_1
    uncond_embeddings: Tensor | None = None  # (N or 1, B, L, D) null-text ∅_k, or shared ∅
    offsets: Tensor | None = None  # (N, B, C, H, W) added to x after sampling step k
    # "all": ``offsets`` are added to every row; "source" (Direct Inversion): the source rows
    # are pinned to ``trajectory[k + 1]`` after step k, i.e. offset by ``x*_{k+1} - x``
    offset_rows: str = "source"
    noises: Tensor | None = None  # (N, B, C, H, W) edit-friendly noise maps z_k
    options: dict[str, Any] = field(default_factory=dict)  # method options reconstruction uses
    nfe: int = 0  # network evaluations the inversion cost (a batched CFG pair counts once)
    # (cond, uncond) the inversion was made with, kept in memory only (a loaded file's are
    # encoded again from its prompt): editors reuse them instead of encoding the prompts again
    conditioning: tuple[Any, Any] | None = field(default=None, repr=False, compare=False)

    @property
    def steps(self) -> int:
        """Number of sampling steps N."""
        return len(self.times) - 1

    @property
    def latent(self) -> Tensor:
        """The inverted latent ``x_0`` at ``times[0]``, (B, C, H, W)."""
        return self.trajectory[0]

    @property
    def batch(self) -> int:
        return self.trajectory.shape[1]

    # --- files ---------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write a safetensors file (tensors) with JSON metadata, atomically."""
        from safetensors.torch import save

        path = Path(path)
        tensors = {
            name: getattr(self, name).detach().cpu().contiguous()
            for name in _TENSORS
            if getattr(self, name) is not None
        }
        meta = {
            "format": FORMAT_VERSION,
            "method": self.method,
            "cfg": self.cfg,
            "steps": self.steps,
            "fingerprint": self.fingerprint,
            "prompt": self.prompt,
            "offset_rows": self.offset_rows,
            "options": self.options,
            "nfe": self.nfe,
        }
        data = save(tensors, metadata={_META_KEY: json.dumps(meta)})
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> Inversion:
        """Read a file written by :meth:`save` (no compatibility checks: see
        :func:`load_inversion`)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no inversion file at {path}")
        try:
            with safe_open(str(path), "pt") as f:
                raw = (f.metadata() or {}).get(_META_KEY)
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises several types for a damaged header
            raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc
        if raw is None:
            raise ValueError(f"{path} is not a retouch inversion file (no {_META_KEY} metadata)")
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is damaged: its {_META_KEY} metadata is not valid JSON "
                             f"({exc}); invert the image again") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
            meta = meta if isinstance(meta, dict) else {}
            raise ValueError(
                f"{path} has inversion format {meta.get('format')}; this retouch reads "
                f"format {FORMAT_VERSION} -- invert the image again"
            )
        unknown = sorted(set(tensors) - set(_TENSORS))
        if unknown or "times" not in tensors or "trajectory" not in tensors:
            raise ValueError(f"{path} is damaged: tensors {sorted(tensors)}")
        missing = sorted({"method", "cfg", "fingerprint", "prompt", "offset_rows", "options",
                          "nfe", "steps"} - set(meta))
        if missing:
            raise ValueError(f"{path} is damaged: its metadata lacks {', '.join(missing)}")
        kw = {k: meta[k] for k in ("method", "cfg", "fingerprint", "prompt", "offset_rows")}
        if not isinstance(kw["cfg"], int | float):
            raise ValueError(f"{path} is damaged: cfg {kw['cfg']!r} is not a number")
        inv = cls(**kw, **tensors, options=meta["options"], nfe=meta["nfe"])
        if inv.steps != meta["steps"]:
            raise ValueError(f"{path} is damaged: {inv.steps} times for {meta['steps']} steps")
        inv.check_finite(str(path))
        return inv

    def check_finite(self, source: str = "this inversion",
                     fix: str = "invert the image again") -> None:
        """Refuse an inversion whose tensors or guidance scale hold NaN or Inf."""
        if not math.isfinite(self.cfg):
            raise ValueError(f"refusing {source}: its cfg is {self.cfg}; {fix}")
        for name in _TENSORS:
            value = getattr(self, name)
            if value is not None and value.is_floating_point():
                bad = int((~torch.isfinite(value)).sum())
                if bad:
                    raise ValueError(f"refusing {source}: its {name} holds {bad} non-finite "
                                     f"value(s) (NaN or Inf); {fix}")

    def check_compatible(
        self,
        *,
        fingerprint: str | None = None,
        steps: int | None = None,
        method: str | None = None,
        source: str = "this inversion",
    ) -> None:
        """Raise ValueError naming every mismatch with what the caller expects."""
        problems = []
        if fingerprint is not None and fingerprint != self.fingerprint:
            problems.append(
                f"it was made with another model (fingerprint {self.fingerprint}, "
                f"this model is {fingerprint})"
            )
        if steps is not None and steps != self.steps:
            problems.append(f"it has {self.steps} steps, {steps} were requested")
        if method is not None and method != self.method:
            problems.append(f"it is a {self.method!r} inversion, {method!r} was requested")
        if problems:
            raise ValueError(f"refusing {source}: " + "; ".join(problems))

    def equals(self, other: Inversion) -> bool:
        """Field-by-field equality (tensors compared exactly)."""
        for f in fields(self):
            if f.name == "conditioning":  # in memory only, never saved
                continue
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, Tensor) or isinstance(b, Tensor):
                if a is None or b is None or a.dtype != b.dtype or not torch.equal(a, b):
                    return False
            elif a != b:
                return False
        return True


def load_inversion(
    path: str | Path,
    *,
    fingerprint: str | None = None,
    steps: int | None = None,
    method: str | None = None,
) -> Inversion:
    """Load an inversion file and refuse it, naming the mismatch, if it was made with another
    model (``fingerprint``), step count or method than given."""
    inv = Inversion.load(path)
    inv.check_compatible(fingerprint=fingerprint, steps=steps, method=method, source=str(path))
    return inv
