"""A self-contained HTML gallery: sections of captioned images, embedded as base64 PNG."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["Figure", "Section", "write_gallery"]


@dataclass
class Figure:
    image: np.ndarray  # (H, W, 3) uint8
    caption: str
    ok: bool | None = None  # checker verdict: green / red frame, or none
    scale: int = 3  # nearest-neighbour upscaling for tiny images


@dataclass
class Section:
    title: str
    text: str = ""
    figures: list[Figure] = field(default_factory=list)
    see: str = ""  # the benchmark number this section illustrates and how to reproduce it


def _png_data(image: np.ndarray, scale: int) -> str:
    img = Image.fromarray(image)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
.grid{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;width:200px}
figure img{border:3px solid #ddd;image-rendering:pixelated;max-width:194px}
figure.ok img{border-color:#2a2} figure.bad img{border-color:#c22}
figcaption{font-size:12px;line-height:1.3}
"""


def write_gallery(path: Path, title: str, sections: list[Section]) -> Path:
    """Write ``sections`` as one HTML file (atomically); returns its path."""
    parts = [f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style><h1>{html.escape(title)}</h1>"]
    for sec in sections:
        parts.append(f"<h2>{html.escape(sec.title)}</h2><p>{html.escape(sec.text)}</p>")
        if sec.see:
            parts.append(f"<p class=see>{html.escape(sec.see)}</p>")
        parts.append("<div class=grid>")
        for fig in sec.figures:
            cls = "" if fig.ok is None else (" class=ok" if fig.ok else " class=bad")
            parts.append(
                f"<figure{cls}><img src='data:image/png;base64,{_png_data(fig.image, fig.scale)}'>"
                f"<figcaption>{html.escape(fig.caption)}</figcaption></figure>"
            )
        parts.append("</div>")
    from ..files import atomic_write_text

    return atomic_write_text(path, "\n".join(parts))
