"""Load Stable Diffusion, SD3 and Flux pipelines from local diffusers folders, safely and offline.

Only safetensors weights are loaded: a component whose weights exist only as a pickle
(``.bin``, ``.ckpt``, ``.pt``, ``.pth``) is refused, since unpickling can run arbitrary code.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

__all__ = [
    "ModelFolderError",
    "check_model_folder",
    "load_pipeline",
]

from ..files import read_json

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
#: Pipeline classes (``_class_name`` in model_index.json) retouch runs today.
SUPPORTED_PIPELINES = {"StableDiffusionPipeline": "SD 1.x / 2.x",
                       "StableDiffusionXLPipeline": "SDXL",
                       "StableDiffusion3Pipeline": "SD3",
                       "FluxPipeline": "Flux"}
#: Families retouch recognises but has no adapter for yet, by pipeline class.
UNSUPPORTED_FAMILIES = {
    "StableDiffusionXLImg2ImgPipeline": "SDXL img2img",
    "StableDiffusionInpaintPipeline": "SD inpainting (9-channel UNet)",
}
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "text_encoder_3",
                     "transformer")


class ModelFolderError(ValueError):
    """A model folder is missing files, has corrupt files, or only unsafe pickle weights."""


def _check_safetensors(path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except Exception as exc:  # safetensors raises several types for a damaged header
        raise ModelFolderError(f"corrupt weights file {path}: {exc}") from exc


def check_model_folder(folder: Path) -> dict:
    """Validate a diffusers pipeline folder; returns its ``model_index.json``.

    Names every missing or corrupt file, and refuses components with only pickle weights.
    """
    folder = Path(folder)
    index_path = folder / "model_index.json"
    if folder.is_file():
        raise ModelFolderError(f"the model {folder} is a file; pass the diffusers folder that "
                               "holds model_index.json (single-file checkpoints are not read)")
    if not folder.is_dir():
        raise ModelFolderError(f"model folder {folder} does not exist; pass a diffusers folder "
                               "or a shipped model's name (toyworld, toyworld-flow)")
    if not index_path.is_file():
        raise ModelFolderError(
            f"{folder} is not a diffusers pipeline folder: model_index.json is missing "
            "(save one with `pipeline.save_pretrained(folder)`)"
        )
    try:
        index = read_json(index_path, "pipeline index")
    except ValueError as exc:
        raise ModelFolderError(str(exc)) from None
    if not isinstance(index, dict):
        raise ModelFolderError(f"{index_path} is not a diffusers pipeline index (not an object)")
    kind = index.get("_class_name")
    if kind not in SUPPORTED_PIPELINES:
        family = UNSUPPORTED_FAMILIES.get(kind)
        found = f"a {kind} folder ({family})" if family else f"of unknown class {kind!r}"
        supported = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_PIPELINES.items())
        raise ModelFolderError(
            f"cannot load {folder}: it is {found}; retouch runs {supported} folders so far"
        )
    problems = []
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        sub = folder / name
        if not sub.is_dir():
            problems.append(f"missing folder {sub}")
            continue
        if name not in WEIGHT_COMPONENTS:
            continue
        if not (sub / "config.json").is_file():
            problems.append(f"missing {sub / 'config.json'}")
        safe = sorted(sub.glob("*.safetensors"))
        if not safe:
            pickles = [p.name for p in sub.iterdir() if p.suffix in PICKLE_SUFFIXES]
            if pickles:
                problems.append(
                    f"{sub} has only pickle weights ({', '.join(pickles)}), which retouch "
                    "refuses to load (unpickling can run arbitrary code); convert them to "
                    "safetensors with a trusted tool first"
                )
            else:
                problems.append(f"missing weights in {sub} (expected *.safetensors)")
        for path in safe:
            try:
                _check_safetensors(path)
            except ModelFolderError as exc:
                problems.append(str(exc))
    if problems:
        raise ModelFolderError(f"cannot load {folder}: " + "; ".join(problems))
    return index


@contextmanager
def _quiet_loading():
    """No per-component progress bars and no library advice while a pipeline loads (a
    local load takes a second); both libraries' settings are restored after."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    bars = (dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled())
    levels = (dlog.get_verbosity(), tlog.get_verbosity())
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(levels[0])
        tlog.set_verbosity(levels[1])
        if bars[0]:
            dlog.enable_progress_bar()
        if bars[1]:
            tlog.enable_progress_bar()


def load_pipeline(
    model: str | Path | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
):
    """A diffusers pipeline from a local folder (default: the shipped ToyWorld model)."""
    import diffusers

    from ..toyworld.folder import model_folder

    folder = model_folder(model)
    index = check_model_folder(folder)
    cls = getattr(diffusers, index["_class_name"])
    # Parts the folder leaves out ([null, null], e.g. SD3 without T5) are passed as None.
    extra = {name: None for name, spec in index.items() if not name.startswith("_")
             and isinstance(spec, list) and spec and spec[0] is None}
    if "safety_checker" in index:
        extra |= {"safety_checker": None, "requires_safety_checker": False}
    try:
        with _quiet_loading():
            pipe = cls.from_pretrained(
                str(folder), dtype=dtype, use_safetensors=True, local_files_only=True, **extra
            )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelFolderError(f"cannot load {folder}: {exc}") from exc
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
