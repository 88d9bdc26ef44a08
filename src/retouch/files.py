"""Files out and in: atomic writes, images saved in the format their name says, output paths
checked before any work, and JSON read with the file's name in every error.

Every command writes through :func:`atomic_write_bytes` (a temporary file beside the target,
then ``os.replace``: a reader never sees half a file and a failure leaves nothing behind), and
checks its outputs first with :func:`check_output_file` / :func:`check_output_dir`, which
refuse a folder where a file is wanted (and the reverse), an unknown image extension, a place
that cannot be written, and any output that would land on one of the command's inputs.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "IMAGE_FORMATS",
    "atomic_write_bytes",
    "atomic_write_text",
    "save_image",
    "check_output_file",
    "check_output_dir",
    "read_json",
]

#: Image file extensions retouch writes, and the Pillow format each one means.
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP",
                 ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _image_format(path: Path) -> str:
    fmt = IMAGE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"{path}: {path.suffix or 'no extension'} is not an image format retouch writes; "
            f"end the name with one of {', '.join(IMAGE_FORMATS)}"
        )
    return fmt


def save_image(image: Any, path: str | Path) -> Path:
    """Save a PIL image or a uint8 (H, W, 3) array in the format of ``path``'s extension,
    atomically."""
    from PIL import Image

    path = Path(path)
    fmt = _image_format(path)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
    return atomic_write_bytes(path, buf.getvalue())


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def _check_writable_dir(folder: Path, what: str) -> None:
    """``folder`` is, or can be made as, a folder this process may write into."""
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ValueError(f"{what} {folder}: {probe} is a file, not a folder; choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {folder}: cannot write into {probe} (permission denied); "
                         "choose a folder you can write to")


def check_output_file(path: str | Path, *, inputs: Iterable[str | Path | None] = (),
                      option: str = "--out", image: bool = True) -> Path:
    """Refuse, before any work, an output file that is a folder, has an unknown image
    extension (``image=True``), cannot be written, or is one of ``inputs``."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder; name the file to write, "
                         f"e.g. {path / 'out.png'}")
    if image:
        _image_format(path)
    for given in inputs:
        if given is not None and _same(path, Path(given)):
            raise ValueError(f"{option} {path} is also an input of this command; outputs never "
                             "overwrite inputs: choose another name")
    _check_writable_dir(path.parent, option)
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{option} {path} exists and cannot be written (permission denied); "
                         "choose another name")
    return path


def check_output_dir(folder: str | Path, names: Iterable[str], *,
                     inputs: Iterable[str | Path | None] = (), option: str = "--out") -> Path:
    """Refuse, before any work, an output folder that is a file or cannot be written, or into
    which one of the files ``names`` would overwrite one of ``inputs``."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{option} {folder} is a file; the outputs go into a folder: "
                         "name a new or existing folder")
    _check_writable_dir(folder, option)
    inputs = [Path(p) for p in inputs if p is not None]
    for name in names:
        for given in inputs:
            if _same(folder / name, given):
                raise ValueError(
                    f"{option} {folder} would overwrite the input {given} with the command's "
                    f"{name}; outputs never overwrite inputs: choose another {option}"
                )
    return folder


def read_json(path: str | Path, what: str = "file") -> Any:
    """Parse a JSON file, naming it (and what it is) when it is missing or not valid JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no {what} at {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} ({what}) is not valid JSON: {exc}; restore or recreate it") \
            from None
