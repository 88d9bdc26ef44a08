"""Fine-tune the ToyWorld VAE decoder with the encoder frozen (or, extending the vocabulary,
both, with the old latents anchored).

The encoder, and so the latent space a UNet is trained on, stays fixed: a trained UNet stays valid
and only what its latents decode to improves. Reconstruction error on object pixels is weighted
up, because objects cover a few percent of the image but carry every attribute the checker reads:
the jointly trained VAE reaches 31 dB on whole images while shifting blue toward purple, and on
its round trips the checker read the colour right on only 85% of renders.

The model is selected by the checker's all-attributes accuracy on round trips of held-out renders
(ties broken by PSNR) and written as the run's ``vae_best.safetensors``, which ``export`` uses;
the VAE it started from is kept once as ``vae_base.safetensors``. Resumable like the other
stages: ``<run>/decoder.safetensors`` holds the full state. With ``train_encoder`` (the extended
vocabulary's VAE stage) the two files are ``vae_stage_base`` and ``vae_stage``, so that a later
decoder-only tune of the same run starts from that stage's result, not from the VAE before it.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ..metrics import psnr
from ..toyworld import checker, configs
from ..toyworld.dataset import make_scenes, vocabulary
from ..toyworld.scene import BACKGROUNDS
from .checkpoint import append_log, atomic_save, restore_state, save_state, trim_log

__all__ = ["DecoderConfig", "tune_decoder", "round_trip_accuracy"]


@dataclass
class DecoderConfig:
    run: str  # a `retouch toyworld train` run directory
    steps: int = 3000  # tuning steps
    lr: float = 2e-4  # cosine-decayed to 0 over `steps`
    batch: int = 32  # renders per step
    object_weight: float = 10.0  # loss weight of an object pixel relative to a background pixel
    dataset_size: int = 8000  # rendered scenes, the last `held_out` of them for measurement
    held_out: int = 256  # renders whose round trips pick the best checkpoint (PSNR, checker)
    seed: int = 11  # of the renders and the batch order
    checkpoint_every: int = 250  # steps between measurement and atomic checkpoint
    extended: bool = False  # train on the extended vocabulary's renders (dataset.vocabulary)
    # Also train the encoder (a new vocabulary needs new latent codes: the core-trained VAE
    # reads outlined and striped fills right on 14% and 0% of round trips). The latents of
    # solid-fill renders are then anchored to the starting encoder's, so a UNet trained on
    # them stays valid while it learns the new ones.
    train_encoder: bool = False
    anchor_weight: float = 1.0


def _foreground(images: torch.Tensor, scenes) -> torch.Tensor:
    """(N, 1, H, W) 1 where a render differs from its scene's background colour."""
    bg = torch.tensor([BACKGROUNDS[s.background] for s in scenes], dtype=torch.float32)
    bg = (bg / 127.5 - 1.0).view(-1, 3, 1, 1)
    return ((images - bg).abs().amax(1, keepdim=True) > 0.02).float()


@torch.no_grad()
def round_trip_accuracy(vae, images: torch.Tensor, scenes) -> dict[str, float]:
    """PSNR of encode-decode round trips, and the checker's accuracy on them."""
    vae.eval()
    rec = torch.cat(
        [vae.decode(vae.encode(x).latent_dist.mode()).sample for x in images.split(64)]
    ).clamp(-1, 1).float().cpu()
    pixels = ((rec.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
    scores = [checker.score(img, scene) for img, scene in zip(pixels, scenes)]
    out = {"psnr": psnr(rec, images, data_range=2.0)}
    for key in ("color", "shape", "size", "position", "style", "all"):
        out[key] = float(np.mean([bool(s[key]) for s in scores if s[key] is not None]))
    return out


def tune_decoder(cfg: DecoderConfig, *, resume: bool = False, progress: bool = True) -> dict:
    """Run (or resume) decoder fine-tuning; returns the best held-out measurements."""
    from diffusers import AutoencoderKL
    from tqdm.auto import tqdm

    run = Path(cfg.run)
    if not (run / "vae_best.safetensors").exists():
        raise FileNotFoundError(
            f"{run} has no vae_best.safetensors; pass a `retouch toyworld train` run directory "
            "whose VAE stage has finished"
        )
    stage = "vae_stage" if cfg.train_encoder else "decoder"  # state files of each kind of tune
    base = run / ("vae_stage_base.safetensors" if cfg.train_encoder else "vae_base.safetensors")
    if not base.exists():  # keep the VAE we started from; vae_best is rewritten below
        shutil.copyfile(run / "vae_best.safetensors", base)
    vae = AutoencoderKL(**configs.vae_config())
    vae.load_state_dict(load_file(str(base)))
    vae.requires_grad_(False)
    parts = [vae.decoder, vae.post_quant_conv]
    parts += [vae.encoder, vae.quant_conv] if cfg.train_encoder else []
    params = [p for part in parts for p in part.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, best = 0, {"all": -1.0, "psnr": -1.0}
    ckpt = run / f"{stage}.safetensors"
    if resume and ckpt.exists():
        meta = restore_state(ckpt, vae, opt, gen)
        step, best = meta["step"], meta["best"]
    if resume:
        trim_log(run, "decoder", step)

    data = make_scenes(
        cfg.dataset_size + cfg.held_out, seed=cfg.seed, size=configs.IMAGE_SIZE,
        mask_size=configs.LATENT_SIZE, progress=progress, **vocabulary(cfg.extended),
    )
    train_n = cfg.dataset_size
    images, held = data.images[:train_n], data.images[train_n:]
    held_scenes = data.scenes[train_n:]
    weight = 1.0 + cfg.object_weight * _foreground(images, data.scenes[:train_n])
    with torch.no_grad():  # the starting encoder's latents: decoder inputs or anchors
        vae.eval()
        latents = torch.cat([vae.encode(x).latent_dist.mode() for x in images.split(256)])
    solid = torch.tensor([s.style == "solid" for s in data.scenes[:train_n]])
    if step == 0:
        best = {**round_trip_accuracy(vae, held, held_scenes), "step": 0}
        append_log(run, {"stage": "decoder", "step": 0, **best})

    bar = tqdm(total=cfg.steps, initial=step, desc="decoder", disable=not progress)
    while step < cfg.steps:
        vae.train()
        idx = torch.randint(train_n, (cfg.batch,), generator=gen)
        if cfg.train_encoder:
            z = vae.encode(images[idx]).latent_dist.mode()
            keep = solid[idx]
            anchor = F.mse_loss(z[keep], latents[idx][keep]) if keep.any() else z.sum() * 0
        else:
            z, anchor = latents[idx], torch.zeros(())
        rec = vae.decode(z).sample
        w = weight[idx]
        loss = (w * (rec - images[idx]) ** 2).sum() / (3 * w.sum()) + cfg.anchor_weight * anchor
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        opt.step()
        step += 1
        bar.update(1)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            measured = round_trip_accuracy(vae, held, held_scenes)
            bar.set_postfix(loss=f"{loss.item():.4f}", all=f"{measured['all']:.3f}")
            append_log(run, {"stage": "decoder", "step": step, "loss": loss.item(), **measured})
            if (measured["all"], measured["psnr"]) > (best["all"], best["psnr"]):
                best = {**measured, "step": step}
                atomic_save(vae.state_dict(), run / "vae_best.safetensors", {"decoder": best})
            save_state(ckpt, vae, opt, gen, {"step": step, "best": best})
    bar.close()
    return best
