"""The denoiser stage's training loop, shared by the ToyWorld architectures (UNet and flow).

One loop samples scenes (optionally weighted by fill style) and their captions, asks the
architecture's ``objective`` for the denoising loss, adds the grounding and coverage losses on the
network's cross-attention, steps AdamW with warm-up and cooldown, keeps an EMA of every part,
logs, and writes an atomic, resumable checkpoint (weights, EMA, optimizer, RNG states).

References: Wang et al. 2024 (TokenCompose grounding); Loshchilov & Hutter 2019 (AdamW).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..toyworld import configs
from ..toyworld.dataset import SceneSet, caption_batch
from ..toyworld.scene import STYLES
from .checkpoint import (
    append_log,
    atomic_save,
    load,
    optimizer_tensors,
    prefixed,
    restore_optimizer,
    trim_log,
    unprefixed,
)
from .grounding import coverage_loss, grounded, grounding_loss

__all__ = ["train_network", "learning_rate", "scene_weights", "check_style_weights", "device"]


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train_network(cfg, data: SceneSet, latents, parts: dict, tokenizer, objective, *,
                  grounding, text_positions: int = 0, resume: bool, progress: bool = True):
    """The denoiser stage's loop, shared by the architectures: sample scenes and captions,
    ``objective(x0, ids, gen, forward) -> loss`` or ``(loss, {name: weighted term})`` (the
    denoising loss, and terms of its own added to it and logged; ``forward`` runs the network, the
    first of ``parts``, recording its cross-attention at the ``grounding`` resolutions), add the
    grounding (and coverage) losses, step AdamW, keep an EMA, log, and checkpoint every part
    (state-dict prefix = its name) to ``<out>/<first part>.safetensors``. ``text_positions``:
    text positions after the caption's that no word is grounded to (SD3's T5 slots)."""
    from tqdm.auto import tqdm

    out, dev = Path(cfg.out), device()
    for module in parts.values():
        module.to(dev).train()
    network = next(iter(parts.values()))
    params = [p for module in parts.values() for p in module.parameters()]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    py_rng = random.Random(cfg.seed + 3)
    step = 0
    stage = next(iter(parts))
    ckpt = out / f"{stage}.safetensors"
    if resume and ckpt.exists():
        tensors, meta = load(ckpt)
        for name, module in parts.items():
            module.load_state_dict(unprefixed(name, tensors))
        for i, e in enumerate(ema):
            e.copy_(tensors[f"ema.{i}"])
        restore_optimizer(opt, unprefixed("opt", tensors), meta["param_groups"])
        gen.set_state(tensors["rng"])
        version, internal, gauss = meta["python_rng"]
        py_rng.setstate((version, tuple(internal), gauss))
        step = meta["step"]
    if resume:
        trim_log(out, stage, step)
    last = cfg.unet_steps if cfg.cooldown is None else min(cfg.unet_steps, cfg.cooldown[1])
    bar = tqdm(total=last, initial=step, desc=stage, disable=not progress)
    running: dict[str, float] = {}
    t0 = time.time()
    weights = scene_weights(data, cfg.style_weights)
    with grounded(network, grounding, rows=cfg.batch) as (store, forward):
        while step < last:
            if weights is None:
                idx = torch.randint(len(data), (cfg.batch,), generator=gen)
            else:
                idx = torch.multinomial(weights, cfg.batch, replacement=True, generator=gen)
            caps = caption_batch(
                [data.scenes[i] for i in idx.tolist()],
                rng=py_rng,
                max_tokens=configs.MAX_TOKENS,
                cond_dropout=cfg.cond_dropout,
                solid_word=cfg.solid_word if cfg.extended else 0.0,
                partial=cfg.partial_captions,
                free_style=cfg.free_style,
            )
            ids = tokenizer(
                caps.texts, padding="max_length", max_length=configs.MAX_TOKENS, return_tensors="pt"
            ).input_ids.to(dev)
            result = objective(latents[idx].to(dev), ids, gen, forward)
            mse, extra = result if isinstance(result, tuple) else (result, {})
            masks, region = data.masks[idx].to(dev), caps.region.to(dev)
            if text_positions:  # positions no word is grounded to
                region = F.pad(region, (0, text_positions), value=-1)
            g_loss, mass = grounding_loss(store, masks, region)
            loss = mse + sum(extra.values()) + cfg.grounding_weight * g_loss
            logged = {"mse": mse, "ground": g_loss, "mass": mass, **extra}
            if cfg.coverage_loss is not None:
                c_loss, soft_iou = coverage_loss(store, masks, region, cfg.coverage_loss)
                loss = loss + cfg.coverage_weight * c_loss
                logged |= {"cover": c_loss, "soft_iou": soft_iou}
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, step)
            opt.step()
            with torch.no_grad():
                decay = min(cfg.ema_decay, (1 + step) / (10 + step))
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
            step += 1
            bar.update(1)
            for k, v in ((k, v.item()) for k, v in logged.items()):
                running[k] = 0.98 * running.get(k, v) + 0.02 * v
            if step % cfg.log_every == 0:
                bar.set_postfix({k: f"{v:.3f}" for k, v in running.items()})
                append_log(out, {"stage": stage, "step": step, "minutes": (time.time() - t0) / 60,
                           **running})
            if step % cfg.checkpoint_every == 0 or step == last:
                tensors, groups = optimizer_tensors(opt)
                state = {
                    **{k: v for name, module in parts.items()
                       for k, v in prefixed(name, module.state_dict()).items()},
                    **{f"ema.{i}": e for i, e in enumerate(ema)},
                    **prefixed("opt", tensors),
                    "rng": gen.get_state(),
                }
                meta = {"step": step, "param_groups": groups, "python_rng": py_rng.getstate()}
                atomic_save(state, ckpt, meta)
    bar.close()


def scene_weights(data: SceneSet, style_weights: dict[str, float] | None) -> torch.Tensor | None:
    """Per-scene sampling weights from ``style_weights`` (None: uniform sampling)."""
    if not style_weights:
        return None
    check_style_weights(style_weights)
    return torch.tensor([style_weights.get(s.style, 1.0) for s in data.scenes])


def check_style_weights(style_weights: dict[str, float] | None) -> None:
    unknown = sorted(set(style_weights or {}) - set(STYLES))
    if unknown or any(w <= 0 for w in (style_weights or {}).values()):
        raise ValueError(f"style weights need styles in {', '.join(STYLES)} and weights > 0, "
                         f"got {style_weights}")


def learning_rate(cfg, step: int) -> float:
    """The denoiser stage's learning rate at ``step`` (``cfg``: a TrainConfig): linear warm-up,
    constant, and with ``cooldown`` a linear decay to 0 at its end."""
    lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
    if cfg.cooldown is not None:
        start, end = cfg.cooldown
        lr *= min(1.0, max(0.0, (end - step) / (end - start)))
    return lr
