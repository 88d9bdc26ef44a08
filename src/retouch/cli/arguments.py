"""Command-line argument types and the parser every ``retouch`` sub-command is built with.

Numbers are checked when they are parsed, before any model loads: ``--cfg nan`` is refused
with the rule it breaks, and the parser reports any argument error in one line (exit 2).
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from contextlib import contextmanager

__all__ = ["OneLineParser", "number", "whole", "fraction", "notes_to_stderr",
           "add_run_arguments", "add_model_argument"]


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: ``retouch: error: ...`` and exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def number(text: str) -> float:
    """A finite float (``nan`` and ``inf`` are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number; pass a real value")
    return value


def fraction(text: str) -> float:
    """A finite float in [0, 1]."""
    value = number(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1]")
    return value


def whole(minimum: int = 1):
    """An argparse type: a whole number >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"whole number >= {minimum}"
    return parse


@contextmanager
def notes_to_stderr():
    """Within it, :class:`retouch.checks.Note` warnings print as ``retouch: note: ...``."""
    from ..checks import Note

    with warnings.catch_warnings():  # restores the filters and showwarning on exit
        warnings.simplefilter("always", Note)
        original = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, Note):
                print(f"retouch: note: {message}", file=sys.stderr)
            else:
                original(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def add_run_arguments(p, *, seed: bool = True) -> None:
    """The arguments every sampling command shares: ``--steps --cfg [--seed] --model --out``."""
    p.add_argument("--steps", type=whole(1), default=25)
    p.add_argument("--cfg", type=number, default=5.0, help="classifier-free guidance scale")
    if seed:
        p.add_argument("--seed", type=whole(0), default=0)
    add_model_argument(p)
    p.add_argument("--out", required=True, help="output folder")


def add_model_argument(p, purpose: str = "") -> None:
    """``--model``: a diffusers folder or a shipped model's name."""
    p.add_argument("--model", default=None, help=(purpose + "; " if purpose else "") +
                   "a diffusers folder, or a shipped model: toyworld (default), toyworld-flow")
