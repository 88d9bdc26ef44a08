"""Export a ToyWorld training run as a plain diffusers ``StableDiffusionPipeline`` folder (a
flow run, ``arch="sd3"``: a ``StableDiffusion3Pipeline`` without T5, FlowMatch scheduler).

The run's EMA weights, its selected VAE (``vae_best.safetensors``) and latent scaling factor,
the word-level tokenizer, the scheduler config, and ``toyworld.json``: the vocabulary, whether
it is extended, each training stage's latest log record (and a flow model's
``max_sequence_length``). The folder is written beside the
destination and swapped in, so an interrupted export leaves the old one intact.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..toyworld import configs
from ..toyworld.folder import DEFAULT_GUIDANCE, check_guidance_scale, toyworld_model_dir
from ..toyworld.scene import VOCABULARY
from ..toyworld.tokenizer import save_tokenizer
from .checkpoint import load, unprefixed
from .toyworld import ARCHS, TrainConfig, build_models

__all__ = ["export_pipeline", "load_components"]


def load_components(run: Path, *, ema: bool = True):
    """(vae, unet, text_encoder, tokenizer, scaling_factor) from a run directory; for a flow
    run (``arch="sd3"``) the middle two are (transformer, (text_encoder, text_encoder_2))."""
    run = Path(run)
    cfg = _config(run)
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(run / "tokenizer"))
    vae, unet, text = build_models(
        cfg, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id
    )
    vae.load_state_dict(load_file(str(run / "vae_best.safetensors")))
    if cfg.arch == "sd3":
        from .flow import build_flow_models

        network, *texts = build_flow_models(cfg, len(tokenizer), tokenizer.bos_token_id,
                                            tokenizer.eos_token_id)
        parts = {"transformer": network, "text": texts[0], "text_2": texts[1]}
    else:
        network, texts = unet, text
        parts = {"unet": unet, "text": text}
    tensors, _ = load(run / ARCHS[cfg.arch])
    for name, module in parts.items():
        module.load_state_dict(unprefixed(name, tensors))
    if ema:
        params = [p for module in parts.values() for p in module.parameters()]
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(tensors[f"ema.{i}"])
    data_scale = json.loads((run / "scale.json").read_text())["scaling_factor"]
    return vae, network, texts, tokenizer, data_scale


def _config(run: Path) -> TrainConfig:
    cfg = TrainConfig(**{**json.loads((Path(run) / "config.json").read_text()), "out": str(run)})
    cfg.grounding_resolutions = tuple(cfg.grounding_resolutions)
    return cfg


def export_pipeline(run: Path, dest: Path | None = None, *, fp16: bool = True,
                    ema: bool = True, guidance_scale: float | None = None) -> Path:
    """Write the run's EMA weights (or with ``ema=False`` its raw weights, e.g. to measure a
    short pilot that the EMA would still average with its start) as a plain diffusers
    pipeline folder (SD, or SD3 for a flow run) at ``dest`` (default: the package's shipped
    model of the run's kind, ``toyworld`` or ``toyworld-flow``). ``guidance_scale``: the
    text-to-image guidance to recommend in ``toyworld.json`` (a ``--cfg`` chosen from
    ``retouch bench toyworld`` runs at several scales; read by generate, the UI and the
    demo). Without it the folder recommends none, and a recommendation the
    folder at ``dest`` had (measured on its old weights) is dropped with a warning."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    if guidance_scale is not None:
        guidance_scale = check_guidance_scale(
            guidance_scale, name="--guidance-scale",
            fix="e.g. a --cfg chosen from `retouch bench toyworld` runs")

    arch = json.loads((Path(run) / "config.json").read_text()).get("arch", "unet") if (
        Path(run) / "config.json").is_file() else "unet"
    if arch not in ARCHS:
        raise ValueError(f"{run}/config.json names arch {arch!r}; this retouch exports "
                         f"{', '.join(ARCHS)}")
    needed = [Path(run) / name for name in ("config.json", ARCHS[arch])]
    if not all(p.is_file() for p in needed):
        raise FileNotFoundError(f"{run} is not a finished `retouch toyworld train` run (it has "
                                f"no {' and '.join(p.name for p in needed)}); pass a run folder")
    vae, unet, text, tokenizer, scale = load_components(run, ema=ema)
    cfg = _config(Path(run))
    if dest is None:
        dest = toyworld_model_dir("toyworld-flow" if cfg.arch == "sd3" else "toyworld")
    vae.register_to_config(scaling_factor=scale)
    if cfg.arch == "sd3":
        from .flow import flow_pipeline

        pipe = flow_pipeline(vae, unet, *text, tokenizer)
    else:
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=DDIMScheduler(**configs.scheduler_config()),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    if fp16:
        # Half-precision storage for the big parts. The text encoder stays float32: transformers
        # loads a checkpoint in its stored dtype while diffusers upcasts to float32, and plain
        # `StableDiffusionPipeline.from_pretrained(dir)` must not end up with mixed dtypes.
        unet.half()
        vae.half()
    dest = Path(dest)
    old_scale = _recommended_scale(dest)
    if guidance_scale is None and old_scale is not None:
        warnings.warn(f"{dest} recommended guidance scale {old_scale:g} for its old weights; "
                      f"the export recommends none, so generation uses {DEFAULT_GUIDANCE:g}: "
                      "measure the new weights with `retouch bench toyworld --cfg CFG` and "
                      "export again with --guidance-scale CFG", stacklevel=2)
    tmp = dest.with_name(dest.name + ".tmp")
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    # transformers 5 writes only tokenizer.json; older versions need vocab.json + merges.txt.
    for name in ("tokenizer", "tokenizer_2") if cfg.arch == "sd3" else ("tokenizer",):
        save_tokenizer(VOCABULARY, tmp / name, max_length=configs.MAX_TOKENS)
    records = [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines()]
    # Each stage's latest record; every {"stage": "note"} line (the options a resume changed,
    # written by `train`, or a note written by hand).
    last = {r["stage"]: r for r in records if r["stage"] != "note"}
    notes = [r for r in records if r["stage"] == "note"]
    _, vae_meta = load(Path(run) / "vae_best.safetensors")
    if "decoder" in vae_meta:  # tune-decoder's selected checkpoint, not its latest
        last["decoder"] = {"stage": "decoder", **vae_meta["decoder"]}
    # What a caption without a style word asks of this model (scene.py's grammar).
    style_omitted = "any" if cfg.free_style > 0 else "solid"
    info = {"vocabulary": list(VOCABULARY), "extended": cfg.extended,
            **({"style_omitted": style_omitted} if cfg.extended else {}), "trained": last,
            **({"max_sequence_length": configs.FLOW_TEXT_SLOTS} if cfg.arch == "sd3" else {}),
            **({"guidance_scale": guidance_scale} if guidance_scale is not None else {})}
    (tmp / "toyworld.json").write_text(json.dumps({**info, **({"notes": notes} if notes else {})},
                                                  indent=2))
    if dest.exists():
        old = dest.with_name(dest.name + ".old")
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old)
    else:
        os.replace(tmp, dest)
    return dest


def _recommended_scale(folder: Path) -> float | None:
    """The guidance scale an existing pipeline folder's ``toyworld.json`` recommends, if any."""
    try:
        scale = json.loads((folder / "toyworld.json").read_text()).get("guidance_scale")
    except (OSError, ValueError, AttributeError):
        return None
    return scale if isinstance(scale, (int, float)) and not isinstance(scale, bool) else None
