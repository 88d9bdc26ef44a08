"""A ToyWorld model folder's policy: where the shipped models live (the UNet model, the
default, and the SD3-transformer flow model, by the names ``toyworld`` and ``toyworld-flow``),
its vocabulary (prompts outside it are refused, naming the words) and whether it learnt the
extended words.

The folder itself is a plain diffusers pipeline; ``toyworld.json`` beside its parts carries
the vocabulary. Safe loading of any folder is :mod:`retouch.models.loading`'s business.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

from ..files import read_json

__all__ = ["SHIPPED_MODELS", "toyworld_model_dir", "model_folder", "shipped_name",
           "weights_fingerprint", "DEFAULT_GUIDANCE", "generation_guidance",
           "check_guidance_scale", "toyworld_vocabulary", "toyworld_extended", "check_prompt"]

#: The pipelines shipped inside the package: name -> folder beside this file.
SHIPPED_MODELS = {"toyworld": "weights", "toyworld-flow": "flow_weights"}


def toyworld_model_dir(name: str = "toyworld") -> Path:
    """A ToyWorld pipeline shipped inside the package (default: the UNet model)."""
    if name not in SHIPPED_MODELS:
        raise ValueError(f"no shipped model is called {name!r}; the shipped ones are "
                         f"{', '.join(SHIPPED_MODELS)}")
    return Path(__file__).resolve().parent / SHIPPED_MODELS[name]


def model_folder(model: str | Path | None) -> Path:
    """The folder ``--model`` names: a path; or a shipped model's name (``toyworld``,
    ``toyworld-flow``) when no such path exists; None is the shipped UNet model."""
    if model is None:
        return toyworld_model_dir()
    if str(model) in SHIPPED_MODELS and not Path(model).exists():
        return toyworld_model_dir(str(model))
    return Path(model)


def shipped_name(folder: str | Path | None) -> str | None:
    """The name of the shipped model living in ``folder``, or None for any other folder."""
    if folder is None:
        return None
    here = Path(folder).resolve()
    return next((name for name in SHIPPED_MODELS if toyworld_model_dir(name) == here), None)


def weights_fingerprint(folder: str | Path) -> str:
    """The first 12 hex digits of the SHA-256 of a pipeline folder's denoiser weights
    (``unet/`` or ``transformer/``): which denoiser a benchmark measured, even after the
    shipped model changes (the VAE and text encoder are not in it). "unknown" when the folder
    has no such safetensors file."""
    for part in ("unet", "transformer"):
        files = sorted((Path(folder) / part).glob("*.safetensors"))
        if files:
            digest = hashlib.sha256()
            for f in files:
                with open(f, "rb") as stream:  # in chunks: an SD denoiser is gigabytes
                    for chunk in iter(lambda: stream.read(1 << 22), b""):
                        digest.update(chunk)
            return digest.hexdigest()[:12]
    return "unknown"


#: Text-to-image guidance for a model that recommends none (diffusers' SD default is 7.5; the
#: ToyWorld models were measured at 2 to 5).
DEFAULT_GUIDANCE = 5.0


def generation_guidance(model: str | Path | None) -> float:
    """The text-to-image guidance scale a ToyWorld model recommends (``toyworld.json``'s
    ``guidance_scale``: the scale chosen from ``retouch bench toyworld`` runs at several
    scales), or ``DEFAULT_GUIDANCE``. ``model`` as ``--model`` takes it
    (:func:`model_folder`: a folder, a shipped model's name, None for the shipped model)."""
    path = model_folder(model) / "toyworld.json"
    if not path.is_file():
        return DEFAULT_GUIDANCE
    info = read_json(path, "ToyWorld model description")
    scale = info.get("guidance_scale") if isinstance(info, dict) else None
    if scale is None:
        return DEFAULT_GUIDANCE
    return check_guidance_scale(scale, name=f"{path}: guidance_scale", fix="fix or remove it")


def check_guidance_scale(scale, *, name: str = "guidance_scale", fix: str = "") -> float:
    """``scale`` as a float if it is a finite number >= 1, else a ValueError naming it."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) \
            or not math.isfinite(scale) or scale < 1:
        raise ValueError(f"{name} {scale!r} must be a finite number >= 1"
                         + (f"; {fix}" if fix else ""))
    return float(scale)


def toyworld_vocabulary(folder: str | Path) -> tuple[str, ...] | None:
    """The word list of a ToyWorld model folder, or None for any other model."""
    path = Path(folder) / "toyworld.json"
    if not path.is_file():
        return None
    info = read_json(path, "ToyWorld model description")
    if not isinstance(info, dict) or not isinstance(info.get("vocabulary"), list):
        raise ValueError(f"{path} has no 'vocabulary' list; re-export the model "
                               "(retouch toyworld export)")
    return tuple(info["vocabulary"])


def toyworld_extended(folder: str | Path | None) -> bool:
    """Whether a ToyWorld model folder was trained on the extended vocabulary (top/bottom,
    outlined/striped). Its tokenizer knows those words either way: only ``toyworld.json``
    says whether the model learnt them."""
    path = Path(folder) / "toyworld.json" if folder is not None else None
    if path is None or not path.is_file():
        return False
    info = read_json(path, "ToyWorld model description")
    return bool(isinstance(info, dict) and info.get("extended", False))


def check_prompt(prompt: str, vocabulary: tuple[str, ...] | None) -> None:
    """Refuse words outside a ToyWorld model's vocabulary (no-op for other models)."""
    if vocabulary is None:
        return
    words = prompt.lower().replace(",", " ").split()
    unknown = sorted({w for w in words if w not in vocabulary})
    if unknown:
        raise ValueError(
            f"the ToyWorld model does not know the word(s) {', '.join(unknown)}; "
            f"its vocabulary is: {' '.join(vocabulary)}"
        )
