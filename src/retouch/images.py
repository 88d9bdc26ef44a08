"""Images in, images out: the one rule for adapting a user's image to a model.

An image that is not RGB (L, RGBA, P, ...) is converted, with a note (an alpha channel is
dropped); a 16-bit image is scaled to 8 bits (never clipped), a floating-point one refused.
An image of another size is resized to the model's image size when its aspect ratio matches
the model's (square, within 1 %), with a note; any other aspect ratio is refused --
crop the image first.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from .checks import note

__all__ = ["prepare_image", "read_image", "ASPECT_TOLERANCE"]

#: Relative aspect-ratio difference up to which an image is resized rather than refused.
ASPECT_TOLERANCE = 0.01


def prepare_image(image: Image.Image, size: int) -> tuple[Image.Image, list[str]]:
    """The RGB ``size`` x ``size`` image the model sees, and notes on what was changed.

    Raises ValueError for an aspect ratio other than square (see the module rules).
    """
    notes = []
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit grey (PNG opens as I)
        import numpy as np

        wide = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8), "L")
        notes.append("scaled the 16-bit image to 8 bits")
    elif image.mode == "F":
        raise ValueError("floating-point (mode F) images are not read: save the image as an "
                         "8- or 16-bit PNG first")
    if image.mode != "RGB":
        had_alpha = "A" in image.getbands() or "transparency" in image.info
        notes.append(
            f"converted the {image.mode} image to RGB" + (" (alpha dropped)" if had_alpha else "")
        )
        image = image.convert("RGB")
    w, h = image.size
    if (w, h) != (size, size):
        if abs(w / h - 1.0) > ASPECT_TOLERANCE:
            raise ValueError(
                f"the image is {w}x{h} but the model works on square {size}x{size} images; "
                "crop it to a square first (only the size is adapted, never the aspect ratio)"
            )
        image = image.resize((size, size), Image.Resampling.LANCZOS)
        notes.append(f"resized the {w}x{h} image to the model's {size}x{size}")
    return image, notes


def read_image(path: str | Path, size: int) -> Image.Image:
    """Open ``path`` and adapt it with :func:`prepare_image`; each change is a
    :func:`retouch.checks.note`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no image at {path}")
    try:
        raw = Image.open(path)
        raw.load()
    except OSError as exc:
        raise ValueError(f"cannot read {path} as an image: {exc}") from exc
    image, notes = prepare_image(raw, size)
    for text in notes:
        note(text)
    return image
