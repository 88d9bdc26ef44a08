"""One boundary for inputs: the checks retouch's public functions run before any work.

Each check raises ``ValueError`` with one line that names the value, the rule and the fix
(the command line prints it as ``retouch: error: ...`` and exits 2). Lossless adaptations
that are still worth knowing about (an image converted or resized, a word swap done as a
refinement) are :func:`note` s: a :class:`Note` warning, printed by the command line as
``retouch: note: ...``.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["EXPECTED_ERRORS", "Note", "note", "finite", "count", "finite_tensor", "prompt_list"]

#: Errors that bad input, a bad file or a diverging computation raise: front ends show their
#: one-line message (the CLI exits 2); anything else is a bug and keeps its traceback.
EXPECTED_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, OSError)


class Note(UserWarning):
    """Something retouch adapted in the caller's input, said once per occasion."""


def note(message: str) -> None:
    """Tell the caller what was adapted (a :class:`Note` warning)."""
    warnings.warn(message, Note, stacklevel=3)


def finite(name: str, value: Any, *, low: float | None = None,
           high: float | None = None) -> float:
    """``value`` as a float, refused unless it is a finite number (within [low, high])."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}; pass a real value")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"in [{low:g}, {high:g}]" if low is not None and high is not None else (
            f"at least {low:g}" if low is not None else f"at most {high:g}")
        raise ValueError(f"{name} must be {bounds}, got {value:g}")
    return value


def count(name: str, value: Any, *, minimum: int = 1) -> int:
    """``value`` as an int, refused unless it is a whole number >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def finite_tensor(name: str, x: Tensor) -> Tensor:
    """Refuse a tensor holding NaN or infinite values, saying how many."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_floating_point() or x.is_complex():
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise ValueError(f"{name} has {bad} non-finite value(s) (NaN or Inf) of "
                             f"{x.numel()}; pass finite values")
    return x


def prompt_list(prompts: Any, *, batch: int | None = None, name: str = "prompt") -> list[str]:
    """``prompts`` (a string or a non-empty sequence of strings) as a list; with ``batch``,
    one prompt for all rows or one per row."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{name} must be a string or a list of strings, got {prompts!r}")
    if not prompts:
        raise ValueError(f"{name} is an empty list; pass at least one prompt")
    if batch is not None and len(prompts) not in (1, batch):
        raise ValueError(f"{len(prompts)} {name}s for {batch} image(s); pass one prompt, or "
                         "one per image")
    return list(prompts)
