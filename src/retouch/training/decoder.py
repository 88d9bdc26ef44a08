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

**Locality** (``composites``): a share of each batch decodes *composite latents*, one render's
latents inside a mask at latent resolution and another's outside, towards the same composite of
the two renders in pixels. Latent blending (Prompt-to-Prompt's local blend, FateZero's masks,
panorama stitching) assumes that a latent cell decodes to its own pixels; a decoder with
global self-attention and group norm trained on whole renders only does not: on ToyWorld a
colour edit's blended latents decoded with the whole background turned white. Held-out
``composite_psnr`` measures it (each held-out render inside its objects' dilated mask, the
next held-out render with the same background outside). Partners share the background, as the
two branches of an edit do: the encoder, frozen so that the UNet stays valid, is not local
either across backgrounds (``scripts/vae_locality.py``), and partners of any background cost
round-trip accuracy without approaching a local decode (500 steps at lr 2e-4: held-out
composites of any background 12.7 → 19.0 dB, round trips read right 0.95 → 0.64).
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
    # Share of each batch decoded from composite latents (module doc); 0 keeps the older tune.
    composites: float = 0.0


def _foreground(images: torch.Tensor, scenes) -> torch.Tensor:
    """(N, 1, H, W) 1 where a render differs from its scene's background colour."""
    bg = torch.tensor([BACKGROUNDS[s.background] for s in scenes], dtype=torch.float32)
    bg = (bg / 127.5 - 1.0).view(-1, 3, 1, 1)
    return ((images - bg).abs().amax(1, keepdim=True) > 0.02).float()


def object_regions(masks: torch.Tensor, *, dilation: int = 1) -> torch.Tensor:
    """(N, 1, M, M) 0/1: where a scene's objects are (mask channels 0, 1), dilated by
    ``dilation`` cells, as a local blend's mask would be."""
    objects = (masks[:, :2].sum(1, keepdim=True) > 0).float()
    k = 2 * dilation + 1
    return F.max_pool2d(objects, k, stride=1, padding=dilation)


def random_boxes(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """(n, 1, size, size) 0/1 axis-aligned boxes of random corners, at least one cell each."""
    lo = torch.randint(0, size, (n, 2), generator=gen)
    span = torch.randint(1, size + 1, (n, 2), generator=gen)
    hi = (lo + span).clamp(max=size)
    grid = torch.arange(size)
    rows = (grid >= lo[:, :1]) & (grid < hi[:, :1])  # (n, size)
    cols = (grid >= lo[:, 1:]) & (grid < hi[:, 1:])
    return (rows[:, :, None] & cols[:, None, :]).float()[:, None]


def composite(inside: torch.Tensor, outside: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``inside`` where ``mask`` (N, 1, m, m) is 1, ``outside`` elsewhere; the mask is
    upsampled (nearest) to the tensors' size, so latents and pixels composite alike."""
    m = F.interpolate(mask, size=inside.shape[-2:], mode="nearest")
    return torch.where(m > 0.5, inside, outside)


def same_background(scenes, idx: torch.Tensor,
                    gen: torch.Generator | None = None) -> torch.Tensor:
    """A partner for each scene of ``idx`` among ``scenes`` with the same background: random
    with ``gen``, else the next such scene (cyclically; itself if it is the only one)."""
    groups: dict[str, list[int]] = {}
    for i, scene in enumerate(scenes):
        groups.setdefault(scene.background, []).append(i)
    out = []
    for i in idx.tolist():
        group = groups[scenes[i].background]
        if gen is None:
            out.append(group[(group.index(i) + 1) % len(group)])
        else:
            out.append(group[int(torch.randint(len(group), (1,), generator=gen))])
    return torch.tensor(out, dtype=torch.long)


@torch.no_grad()
def composite_psnr(vae, latents: torch.Tensor, images: torch.Tensor, masks: torch.Tensor,
                   scenes) -> float:
    """PSNR of decoded composite latents against the pixel composite: each render inside its
    objects' dilated region, the next one with the same background outside."""
    vae.eval()
    region = object_regions(masks)
    other = same_background(scenes, torch.arange(len(scenes)))
    z = composite(latents, latents[other], region)
    target = composite(images, images[other], region)
    rec = torch.cat([vae.decode(part).sample for part in z.split(64)]).clamp(-1, 1).float()
    return psnr(rec.cpu(), target, data_range=2.0)


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


#: With ``composites``, a checkpoint whose checker accuracy on round trips is within this of the
#: starting VAE's counts as keeping it (256 held-out renders: one render is 0.004).
ALL_TOLERANCE = 0.01


def _rank(measured: dict, cfg: DecoderConfig, floor: float) -> tuple:
    """Sort key of the best checkpoint: the checker's accuracy on round trips, then PSNR; with
    ``composites``, any accuracy at or above ``floor`` counts alike and composite PSNR decides
    among those (locality without losing round trips)."""
    if cfg.composites > 0:
        return (min(measured["all"], floor), measured.get("composite_psnr", -1.0),
                measured["psnr"])
    return (measured["all"], measured["psnr"])


def tune_decoder(cfg: DecoderConfig, *, resume: bool = False, progress: bool = True) -> dict:
    """Run (or resume) decoder fine-tuning; returns the best held-out measurements."""
    from diffusers import AutoencoderKL
    from tqdm.auto import tqdm

    if not 0 <= cfg.composites <= 1:
        raise ValueError(f"composites is the share of each batch decoded from composite "
                         f"latents, between 0 and 1; got {cfg.composites}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ValueError(f"lr must be a positive finite learning rate; got {cfg.lr}")
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
    step, best, floor = 0, {"all": -1.0, "psnr": -1.0}, -1.0
    ckpt = run / f"{stage}.safetensors"
    if resume and ckpt.exists():
        meta = restore_state(ckpt, vae, opt, gen)
        step, best, floor = meta["step"], meta["best"], meta.get("floor", -1.0)
    if resume:
        trim_log(run, "decoder", step)

    data = make_scenes(
        cfg.dataset_size + cfg.held_out, seed=cfg.seed, size=configs.IMAGE_SIZE,
        mask_size=configs.LATENT_SIZE, progress=progress, **vocabulary(cfg.extended),
    )
    train_n = cfg.dataset_size
    images, held = data.images[:train_n], data.images[train_n:]
    held_scenes, masks = data.scenes[train_n:], data.masks[:train_n]
    weight = 1.0 + cfg.object_weight * _foreground(images, data.scenes[:train_n])
    with torch.no_grad():  # the starting encoder's latents: decoder inputs or anchors
        vae.eval()
        latents = torch.cat([vae.encode(x).latent_dist.mode() for x in images.split(256)])
        held_latents = torch.cat([vae.encode(x).latent_dist.mode() for x in held.split(256)])

    def measure() -> dict:
        out = round_trip_accuracy(vae, held, held_scenes)
        if cfg.composites > 0:  # the base encoder's latents: what a frozen-encoder UNet makes
            out["composite_psnr"] = composite_psnr(vae, held_latents, held,
                                                   data.masks[train_n:], held_scenes)
        return out

    solid = torch.tensor([s.style == "solid" for s in data.scenes[:train_n]])
    if step == 0:
        best = {**measure(), "step": 0}
        floor = best["all"] - ALL_TOLERANCE
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
        target, w = images[idx], weight[idx]
        n_mixed = round(cfg.composites * cfg.batch)
        if n_mixed:  # the first n_mixed rows: composites with a random partner (module doc)
            other = same_background(data.scenes[:train_n], idx[:n_mixed], gen)
            boxes = torch.rand(n_mixed, generator=gen) < 0.5
            region = torch.where(boxes[:, None, None, None],
                                 random_boxes(n_mixed, masks.shape[-1], gen),
                                 object_regions(masks[idx[:n_mixed]]))
            z = torch.cat([composite(z[:n_mixed], latents[other], region), z[n_mixed:]])
            target = torch.cat([composite(target[:n_mixed], images[other], region),
                                target[n_mixed:]])
            w = torch.cat([composite(w[:n_mixed], weight[other], region), w[n_mixed:]])
        rec = vae.decode(z).sample
        loss = (w * (rec - target) ** 2).sum() / (3 * w.sum()) + cfg.anchor_weight * anchor
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        opt.step()
        step += 1
        bar.update(1)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            measured = measure()
            bar.set_postfix(loss=f"{loss.item():.4f}", all=f"{measured['all']:.3f}")
            append_log(run, {"stage": "decoder", "step": step, "loss": loss.item(), **measured})
            if _rank(measured, cfg, floor) > _rank(best, cfg, floor):
                best = {**measured, "step": step}
                atomic_save(vae.state_dict(), run / "vae_best.safetensors", {"decoder": best})
            save_state(ckpt, vae, opt, gen, {"step": step, "best": best, "floor": floor})
    bar.close()
    return best
