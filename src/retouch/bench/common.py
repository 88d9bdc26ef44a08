"""Helpers every benchmark shares: atomic writes, JSON, Markdown tables, a PIL log-log plot."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..files import atomic_write_bytes, atomic_write_text
from ..toyworld.folder import model_folder, shipped_name, weights_fingerprint

__all__ = [
    "chosen_parts",
    "model_label",
    "atomic_write_bytes",
    "atomic_write_text",
    "write_json",
    "write_result",
    "versions",
    "write_markdown_table",
    "loglog_plot",
    "image_grid",
    "paired_counts",
    "mcnemar_p",
]


def model_label(model: str | Path | None) -> str:
    """How a benchmark names the model it measured: the shipped model's name or the folder,
    with the SHA-256 prefix of its denoiser weights (the shipped weights change over time)."""
    folder = model_folder(model)
    name = shipped_name(folder)
    return f"{f'shipped {name}' if name else model} (denoiser sha256 {weights_fingerprint(folder)})"


def chosen_parts(bench: str, parts: Sequence[str] | None, valid: Sequence[str]) -> tuple:
    """A benchmark's ``parts`` to run (default: all of ``valid``), refused by name if unknown."""
    parts = tuple(valid) if parts is None else tuple(parts)
    unknown = [p for p in parts if p not in valid]
    if unknown or not parts:
        raise ValueError(f"unknown {bench} benchmark part(s) {', '.join(unknown) or '(none)'}; "
                         f"valid: {', '.join(valid)}")
    return parts


def write_json(path: Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (non-finite floats become null), atomically."""

    def clean(o: Any) -> Any:
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, Mapping):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, list | tuple):
            return [clean(v) for v in o]
        return o

    return atomic_write_text(path, json.dumps(clean(obj), indent=2, allow_nan=False) + "\n")


def _git_commit() -> str | None:
    """The checkout's commit (short, ``-dirty`` when files differ from it), or None outside a
    git checkout."""
    import subprocess

    try:
        here = Path(__file__).resolve().parent
        commit = subprocess.run(["git", "-C", str(here), "describe", "--always", "--dirty",
                                 "--abbrev=7"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip() if commit.returncode == 0 else None


def versions() -> dict[str, str]:
    """The versions a benchmark runs with: Python, retouch (and the git commit of the checkout,
    when run from one), torch and the libraries that compute. A benchmark reads them when it
    starts (the checkout may move on while a long run goes on) and passes them to
    :func:`write_result`."""
    import importlib.metadata as md
    import platform

    found = {"python": platform.python_version()}
    for name in ("retouch", "torch", "diffusers", "transformers", "numpy", "safetensors"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = "not installed"
    commit = _git_commit()
    if commit:
        found["git_commit"] = commit
    return found


def write_result(path: Path, result: Mapping[str, Any], *,
                 started: Mapping[str, str] | None = None) -> Path:
    """Write a benchmark's JSON: its ``headline`` first (the figures its issue's targets name),
    then the rest, then ``started`` (the :func:`versions` the run read when it started; read
    now if not given). Refuses a result without a headline."""
    if not isinstance(result.get("headline"), Mapping) or not result["headline"]:
        raise ValueError(f"a benchmark result needs a non-empty 'headline' object ({path})")
    return write_json(path, {"headline": result["headline"], **result,
                             "versions": dict(started) if started else versions()})


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "–"
        return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v).replace("|", "\\|")


def write_markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub Markdown table of ``rows`` (dicts) over ``columns``; missing cells are "–".

    Returns the text (write it with :func:`atomic_write_text`); floats use 3 significant digits.
    """
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


_PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]


def loglog_plot(
    series: Mapping[str, Sequence[tuple[float, float]]],
    *,
    colour_of: Mapping[str, str] | None = None,
    dash_of: Mapping[str, str] | None = None,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    size: tuple[int, int] = (1000, 640),
) -> bytes:
    """A log-log line plot drawn with PIL (no matplotlib): axes, decade ticks, one line per
    series, legend on the right. Returns PNG bytes.

    ``colour_of`` maps a series label to a colour group (same group, same colour; default: the
    label); ``dash_of`` maps it to ``"solid"`` (default), ``"dashed"`` or ``"dotted"``.
    """
    from io import BytesIO

    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=13)
    w, h = size
    left, right, top, bottom = 80, 290, 48, 60
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    pts = [(x, y) for s in series.values() for x, y in s if x > 0 and y > 0 and math.isfinite(y)]
    lx = [math.log10(x) for x, _ in pts] or [0.0, 1.0]
    ly = [math.log10(y) for _, y in pts] or [0.0, 1.0]
    x0, x1 = min(lx) - 0.05, max(lx) + 0.05
    y0, y1 = math.floor(min(ly)), math.ceil(max(ly))
    y1 = y1 if y1 > y0 else y0 + 1

    def px(lxv: float, lyv: float) -> tuple[float, float]:
        u = left + (lxv - x0) / (x1 - x0) * (w - left - right)
        v = h - bottom - (lyv - y0) / (y1 - y0) * (h - top - bottom)
        return u, v

    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for k in range(y0, y1 + 1):  # decades, with minor ticks at 2..9
        u, v = px(x0, k)
        draw.line([(left, v), (w - right, v)], fill=(225, 225, 225))
        draw.text((left - 8, v), f"1e{k}", fill="black", font=font, anchor="rm")
        for m in range(2, 10) if k < y1 else ():
            _, vm = px(x0, k + math.log10(m))
            draw.line([(left, vm), (left + 5, vm)], fill="black")
    xticks = sorted({x for x, _ in pts}) or [1.0]
    for xv in xticks:
        u, _ = px(math.log10(xv), y0)
        draw.line([(u, h - bottom), (u, h - bottom - 6)], fill="black")
        draw.text((u, h - bottom + 6), f"{xv:g}", fill="black", font=font, anchor="ma")
    for k, line_text in enumerate(title.splitlines()):
        draw.text(
            ((left + w - right) / 2, 6 + 16 * k), line_text, fill="black", font=font, anchor="ma"
        )
    draw.text(((left + w - right) / 2, h - 22), xlabel, fill="black", font=font, anchor="ma")
    label = Image.new("RGB", (h - top - bottom, 18), "white")
    ImageDraw.Draw(label).text((label.width / 2, 2), ylabel, fill="black", font=font, anchor="ma")
    img.paste(label.rotate(90, expand=True), (8, top))
    colour_of, dash_of = colour_of or {}, dash_of or {}
    groups = list(dict.fromkeys(colour_of.get(name, name) for name in series))
    for i, (name, s) in enumerate(series.items()):
        colour = _PALETTE[groups.index(colour_of.get(name, name)) % len(_PALETTE)]
        dash = dash_of.get(name, "solid")
        line = [
            px(math.log10(x), math.log10(y)) for x, y in sorted(s) if y > 0 and math.isfinite(y)
        ]
        for a, b in zip(line[:-1], line[1:], strict=True):
            _segment(draw, a, b, colour, dash=dash)
        for u, v in line:
            draw.ellipse([u - 3, v - 3, u + 3, v + 3], fill=colour)
        ly_ = top + 10 + 18 * i
        _segment(draw, (w - right + 12, ly_), (w - right + 42, ly_), colour, dash=dash)
        draw.text((w - right + 48, ly_), name, fill="black", font=font, anchor="lm")
    buf = BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _segment(draw, a, b, colour, *, dash: str) -> None:
    if dash == "solid":
        draw.line([a, b], fill=colour, width=2)
        return
    on, period = (7.0, 12.0) if dash == "dashed" else (2.0, 6.0)
    length = math.dist(a, b)
    pos = 0.0
    while pos < length:
        f0, f1 = pos / length, min(pos + on, length) / length
        p = (a[0] + (b[0] - a[0]) * f0, a[1] + (b[1] - a[1]) * f0)
        q = (a[0] + (b[0] - a[0]) * f1, a[1] + (b[1] - a[1]) * f1)
        draw.line([p, q], fill=colour, width=2)
        pos += period


def image_grid(
    images: Sequence[Any],
    path: Path,
    *,
    columns: int = 8,
    labels: Sequence[str] | None = None,
    scale: int = 2,
) -> Path:
    """Save uint8 (H, W, 3) images as one PNG grid (optional label under each), atomically."""
    import io

    import numpy as np
    from PIL import Image, ImageDraw

    images = [np.asarray(im) for im in images]
    h, w = images[0].shape[:2]
    h, w = h * scale, w * scale
    label_h = 12 if labels else 0
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * w, rows * (h + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, im in enumerate(images):
        r, c = divmod(k, columns)
        tile = Image.fromarray(im).resize((w, h), Image.NEAREST)
        sheet.paste(tile, (c * w, r * (h + label_h)))
        if labels:
            draw.text((c * w + 2, r * (h + label_h) + h), str(labels[k])[: w // 6], fill="black")
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def paired_counts(a: list[float], b: list[float], *, names: tuple[str, str]) -> dict:
    """Paired yes/no outcomes (1.0 / 0.0) of two methods on the same cases: how many only the
    first (``names[0]``) or only the second gets right, both, neither, and :func:`mcnemar_p`."""
    pairs = list(zip(a, b, strict=True))
    counts = {names[0]: sum(x > y for x, y in pairs), names[1]: sum(y > x for x, y in pairs),
              "both": sum(x == y == 1 for x, y in pairs),
              "neither": sum(x == y == 0 for x, y in pairs)}
    return counts | {"p": mcnemar_p(counts[names[0]], counts[names[1]])}


def mcnemar_p(only_a: int, only_b: int) -> float:
    """McNemar's exact two-sided p-value for paired yes/no outcomes: ``only_a`` pairs where
    only the first method succeeds, ``only_b`` where only the second does (a binomial test of
    the discordant pairs at one half)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2 ** n
    return min(1.0, 2 * tail)
