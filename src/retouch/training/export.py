"""Export a ToyWorld training run as a plain diffusers ``StableDiffusionPipeline`` folder.

The run's EMA weights, its selected VAE (``vae_best.safetensors``) and latent scaling factor,
the word-level tokenizer, DDIM scheduler config, and ``toyworld.json``: the vocabulary, whether
it is extended, and each training stage's latest log record. The folder is written beside the
destination and swapped in, so an interrupted export leaves the old one intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..toyworld import configs
from ..toyworld.scene import VOCABULARY
from ..toyworld.tokenizer import save_tokenizer
from .checkpoint import load, unprefixed
from .toyworld import TrainConfig, build_models

__all__ = ["export_pipeline", "load_components"]


def load_components(run: Path, *, ema: bool = True):
    """(vae, unet, text_encoder, tokenizer, scaling_factor) from a run directory."""
    run = Path(run)
    cfg = TrainConfig(**{**json.loads((run / "config.json").read_text()), "out": str(run)})
    cfg.grounding_resolutions = tuple(cfg.grounding_resolutions)
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(run / "tokenizer"))
    vae, unet, text = build_models(
        cfg, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id
    )
    vae.load_state_dict(load_file(str(run / "vae_best.safetensors")))
    tensors, _ = load(run / "unet.safetensors")
    unet.load_state_dict(unprefixed("unet", tensors))
    text.load_state_dict(unprefixed("text", tensors))
    if ema:
        params = list(unet.parameters()) + list(text.parameters())
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(tensors[f"ema.{i}"])
    data_scale = json.loads((run / "scale.json").read_text())["scaling_factor"]
    return vae, unet, text, tokenizer, data_scale


def export_pipeline(run: Path, dest: Path, *, fp16: bool = True, ema: bool = True) -> Path:
    """Write the run's EMA weights (or with ``ema=False`` its raw weights, e.g. to measure a
    short pilot that the EMA would still average with its start) as a plain diffusers
    StableDiffusionPipeline folder."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    needed = [Path(run) / name for name in ("config.json", "unet.safetensors")]
    if not all(p.is_file() for p in needed):
        raise FileNotFoundError(f"{run} is not a finished `retouch toyworld train` run (it has "
                                "no config.json and unet.safetensors); pass a run folder")
    vae, unet, text, tokenizer, scale = load_components(run, ema=ema)
    cfg = json.loads((Path(run) / "config.json").read_text())
    cfg = TrainConfig(**{**cfg, "out": str(run)})
    vae.register_to_config(scaling_factor=scale)
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
    tmp = dest.with_name(dest.name + ".tmp")
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    # transformers 5 writes only tokenizer.json; older versions need vocab.json + merges.txt.
    save_tokenizer(VOCABULARY, tmp / "tokenizer", max_length=configs.MAX_TOKENS)
    records = [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines()]
    # Each stage's latest record; every hand-written {"stage": "note"} line (changes made to a
    # run while it was resumed, for instance).
    last = {r["stage"]: r for r in records if r["stage"] != "note"}
    notes = [r for r in records if r["stage"] == "note"]
    _, vae_meta = load(Path(run) / "vae_best.safetensors")
    if "decoder" in vae_meta:  # tune-decoder's selected checkpoint, not its latest
        last["decoder"] = {"stage": "decoder", **vae_meta["decoder"]}
    info = {"vocabulary": list(VOCABULARY), "extended": cfg.extended, "trained": last}
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
