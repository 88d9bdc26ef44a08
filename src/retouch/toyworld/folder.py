"""A ToyWorld model folder's policy: where the shipped model lives, its vocabulary (prompts
outside it are refused, naming the words) and whether it learnt the extended words.

The folder itself is a plain diffusers pipeline; ``toyworld.json`` beside its parts carries
the vocabulary. Safe loading of any folder is :mod:`retouch.models.loading`'s business.
"""

from __future__ import annotations

from pathlib import Path

from ..files import read_json

__all__ = ["toyworld_model_dir", "toyworld_vocabulary", "toyworld_extended", "check_prompt"]


def toyworld_model_dir() -> Path:
    """The ToyWorld pipeline shipped inside the package."""
    return Path(__file__).resolve().parent / "weights"


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
