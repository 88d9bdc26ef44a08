"""Train the ToyWorld Stable Diffusion: a VAE stage, then UNet + text encoder on latents.

The UNet stage adds a token-level grounding loss on cross-attention (TokenCompose, Wang et al.,
CVPR 2024): for every attribute word, ``-log`` of the share of its cross-attention mass that falls
inside the region it names (its object's silhouette, or the background), from the renderer's
masks. It makes word-to-region attention local, which every attention technique relies on, but a
point at the region's centre maximises it; ``coverage_loss`` adds a term that asks each map to
cover its region (TokenCompose's pixel-level BCE, or a KL divergence to the mask-uniform
distribution; see :mod:`.grounding`). The trained model is a plain diffusers/transformers SD
pipeline; the losses only exist in training.

Runs are resumable: every ``checkpoint_every`` steps the full state (weights, EMA, optimizer, RNG)
is written atomically to ``<out>/<stage>.safetensors``; ``resume=True`` continues from it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ..losses import denoising_loss, noisy
from ..metrics import psnr
from ..schedules import Schedule
from ..toyworld import configs
from ..toyworld.dataset import SceneSet, make_scenes, vocabulary
from ..toyworld.scene import VOCABULARY
from ..toyworld.tokenizer import save_tokenizer
from .checkpoint import (
    append_log,
    atomic_save,
    restore_state,
    save_state,
    trim_log,
)
from .grounding import COVERAGE_LOSSES
from .loop import check_style_weights, device, learning_rate, scene_weights, train_network

__all__ = ["TrainConfig", "train", "build_models", "learning_rate", "scene_weights"]


@dataclass
class TrainConfig:
    out: str  # run directory (checkpoints, logs, cached data)
    seed: int = 0  # of the rendered dataset, the initial weights and the sampling streams
    dataset_size: int = 20000  # rendered scenes (core vocabulary)
    vae_steps: int = 1500  # VAE stage (or, extending a model, VAE tuning) steps
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6  # SD-style tiny KL: latents stay near-deterministic
    unet_steps: int = 100000  # upper bound; runs are stopped and resumed at will
    batch: int = 32  # scenes per step, both stages
    lr: float = 3e-4  # UNet + text encoder (AdamW, weight decay 1e-2); see learning_rate
    warmup: int = 200  # UNet steps of linear learning-rate warm-up
    ema_decay: float = 0.999  # of the exported (EMA) weights
    cond_dropout: float = 0.1  # whole-caption dropout, for classifier-free guidance
    min_snr_gamma: float = 5.0  # min-SNR loss weighting (Hang et al., 2023)
    grounding_weight: float = 0.1  # weight of the cross-attention grounding (token) loss
    coverage_loss: str | None = None  # "bce" or "kl": a grounding term asking maps to cover
    coverage_weight: float = 0.0  # its weight (> 0 exactly when coverage_loss is set)
    # Weight of a distillation term that holds the UNet's noise prediction to init_from's
    # (frozen, same inputs), meant to keep what the model could do while the grounding terms
    # reshape its attention (at 1.0 it did not keep adherence: docs/toyworld.md). 0: off.
    # Needs init_from.
    teacher_weight: float = 0.0
    grounding_resolutions: tuple[int, ...] = (16, 8)  # latent sides whose attention is grounded
    unet_width: int = 64  # channels of the first UNet block (configs.unet_config)
    # Transformer layers per UNet attention block. With init_from a shallower model, the new
    # layers start as identities (growth.load_grown), so the run starts from its function.
    unet_depth: int = 1
    init_from: str | None = None  # diffusers folder whose weights start the run (skips VAE stage)
    extended: bool = False  # also top/bottom and outlined/striped (see dataset.vocabulary)
    solid_word: float = 0.3  # extended: share of solid scenes' captions that say "solid"
    # Share of captions that are partially specified: each of size, colour, position and
    # background (and with free_style the style) is left out with probability 1/2
    # (dataset.PARTIAL_DROP), as users write them.
    partial_captions: float = 0.0
    # Share of captions without the style word, which then means any fill style, not solid
    # (dataset.caption_batch; partial captions leave it out with 1/2); the export records the
    # grammar as toyworld.json's "style_omitted": "any" (> 0) or "solid".
    free_style: float = 0.0
    # Relative sampling weight of scenes by fill style (missing styles weigh 1), e.g.
    # {"striped": 1.5} to show the hardest style more often.
    style_weights: dict[str, float] | None = None
    # (start, end) UNet steps: the learning rate decays linearly from lr to 0 at end, where the
    # run stops. May be added when resuming a run that trained at a constant rate.
    cooldown: tuple[int, int] | None = None
    text_layers: int = 2  # self-attention layers of the text encoder (few keep words local)
    # "unet" (SD1-style UNet, epsilon) or "sd3" (an MMDiT trained by rectified flow, .flow)
    arch: str = "unet"
    checkpoint_every: int = 200  # steps between atomic checkpoints (what a kill can lose)
    log_every: int = 50  # steps between log.jsonl records


def build_models(cfg: TrainConfig, vocab_size: int, bos_id: int, eos_id: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(**configs.vae_config())
    unet = UNet2DConditionModel(**configs.unet_config(cfg.unet_width, cfg.unet_depth))
    text = CLIPTextModel(
        CLIPTextConfig(
            **configs.text_config(vocab_size, bos_id=bos_id, eos_id=eos_id, layers=cfg.text_layers)
        )
    )
    return vae, unet, text


def _scenes(cfg: TrainConfig) -> SceneSet:
    return make_scenes(
        cfg.dataset_size,
        seed=cfg.seed,
        size=configs.IMAGE_SIZE,
        mask_size=configs.LATENT_SIZE,
        **vocabulary(cfg.extended),
    )


def train_vae(cfg: TrainConfig, data: SceneSet, vae, *, resume: bool, progress: bool = True):
    """Train the autoencoder (MSE + tiny KL), keep the best checkpoint by held-out PSNR."""
    from tqdm.auto import tqdm

    out, dev = Path(cfg.out), device()
    vae.to(dev).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    step, best = 0, -1.0
    ckpt = out / "vae.safetensors"
    if resume and ckpt.exists():
        meta = restore_state(ckpt, vae, opt, gen)
        step, best = meta["step"], meta["best_psnr"]
    if resume:
        trim_log(out, "vae", step)
    n_held = min(256, len(data) // 4)  # the last scenes are held out for PSNR
    held_out = data.images[-n_held:].to(dev)
    train_n = len(data) - n_held
    bar = tqdm(total=cfg.vae_steps, initial=step, desc="vae", disable=not progress)
    while step < cfg.vae_steps:
        idx = torch.randint(train_n, (cfg.batch,), generator=gen)
        x = data.images[idx].to(dev)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        loss = F.mse_loss(rec, x) + cfg.vae_kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)  # diverges without clipping
        opt.step()
        step += 1
        bar.update(1)
        if step % cfg.checkpoint_every == 0 or step == cfg.vae_steps:
            psnr = _vae_psnr(vae, held_out)
            bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{psnr:.2f}")
            append_log(out, {"stage": "vae", "step": step, "loss": loss.item(), "psnr": psnr})
            if psnr > best:
                best = psnr
                atomic_save(vae.state_dict(), out / "vae_best.safetensors", {"psnr": psnr})
            save_state(ckpt, vae, opt, gen, {"step": step, "best_psnr": best})
    bar.close()
    vae.load_state_dict(load_file(str(out / "vae_best.safetensors")))
    return best


@torch.no_grad()
def _vae_psnr(vae, images: torch.Tensor) -> float:
    vae.eval()
    rec = torch.cat([vae.decode(vae.encode(x).latent_dist.mode()).sample for x in images.split(64)])
    vae.train()
    return psnr(rec.clamp(-1, 1), images, data_range=2.0)


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor) -> torch.Tensor:
    vae.eval()
    dev = next(vae.parameters()).device
    return torch.cat([vae.encode(x.to(dev)).latent_dist.mode().cpu() for x in images.split(256)])


# --------------------------------------------------------------------------------------------
# UNet stage


def train_unet(cfg, data: SceneSet, latents, unet, text, tokenizer, *, resume, progress=True):
    """Joint UNet + text-encoder training on cached latents with min-SNR and grounding losses."""
    schedule = Schedule.from_diffusers_config(_ddpm_kwargs())
    teacher = _teacher(cfg) if cfg.teacher_weight > 0 else None

    def objective(x0, ids, gen, forward):
        eps = torch.randn(x0.shape, generator=gen).to(x0.device)
        t = torch.randint(0, schedule.num_train_timesteps, (cfg.batch,), generator=gen)
        xt = noisy(schedule, x0, eps, t.double())
        pred = forward(xt, t.to(x0.device),
                       encoder_hidden_states=text(ids).last_hidden_state).sample
        mse = denoising_loss(pred, x0, eps, t.double(), schedule, prediction_type="epsilon",
                             weighting="min_snr", gamma=cfg.min_snr_gamma)
        if teacher is None:
            return mse
        t_unet, t_text = teacher
        with torch.no_grad():
            target = t_unet(xt, t.to(x0.device),
                            encoder_hidden_states=t_text(ids).last_hidden_state).sample
        return mse, {"teacher": cfg.teacher_weight * F.mse_loss(pred, target)}

    train_network(cfg, data, latents, {"unet": unet, "text": text}, tokenizer, objective,
                  grounding=cfg.grounding_resolutions, resume=resume, progress=progress)


def _teacher(cfg: TrainConfig):
    """The frozen UNet and text encoder of ``init_from``, for the distillation term."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    folder, dev = Path(cfg.init_from), device()
    unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet").float()
    text = CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder").float()
    for module in (unet, text):
        module.to(dev).eval().requires_grad_(False)
    return unet, text


def _check_loss_options(cfg: TrainConfig) -> None:
    """Refuse loss weights that are negative or not finite, and a coverage weight without its
    loss (or the reverse), before any work."""
    for flag, value in (("--grounding-weight", cfg.grounding_weight),
                        ("--coverage-weight", cfg.coverage_weight),
                        ("--teacher-weight", cfg.teacher_weight)):
        if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{flag} {value}: a loss weight must be a finite number >= 0; "
                             f"pass e.g. {flag} 0.1 (0 turns the term off)")
    if cfg.coverage_loss is not None and cfg.coverage_loss not in COVERAGE_LOSSES:
        raise ValueError(f"--coverage-loss {cfg.coverage_loss}: unknown loss; pass one of "
                         f"{', '.join(COVERAGE_LOSSES)}")
    if (cfg.coverage_loss is None) != (cfg.coverage_weight == 0):
        raise ValueError(f"--coverage-loss {cfg.coverage_loss} with --coverage-weight "
                         f"{cfg.coverage_weight}: the coverage term needs both a loss and a "
                         "weight > 0; pass both (e.g. --coverage-loss bce --coverage-weight 0.1) "
                         "or neither")
    for flag, share in (("--partial-captions", cfg.partial_captions),
                        ("--free-style", cfg.free_style)):
        if not 0 <= share <= 1:
            raise ValueError(f"{flag} {share}: a share must be in [0, 1]")
    if cfg.free_style > 0 and not cfg.extended:
        raise ValueError(f"--free-style {cfg.free_style}: only the extended vocabulary has fill "
                         "styles; add --extended")
    if cfg.teacher_weight > 0 and (cfg.init_from is None or cfg.arch != "unet"):
        raise ValueError(f"--teacher-weight {cfg.teacher_weight}: the teacher is the --init-from "
                         "model's UNet; pass --init-from DIR (with --arch unet) or drop "
                         "--teacher-weight")


def _ddpm_kwargs() -> dict:
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
    return {k: configs.scheduler_config()[k] for k in keys}


# --------------------------------------------------------------------------------------------
# Whole run and export


def _tokenizer(out: Path):
    from transformers import CLIPTokenizer

    save_tokenizer(VOCABULARY, out / "tokenizer", max_length=configs.MAX_TOKENS)
    return CLIPTokenizer.from_pretrained(str(out / "tokenizer"))


# Options a resumed run must keep, with the value a run recorded before the option existed.
_RECORDED = {"seed": False, "dataset_size": False, "unet_width": False, "unet_depth": 1,
             "text_layers": False,
             "extended": False, "coverage_loss": None, "coverage_weight": 0.0,
             "partial_captions": 0.0, "arch": "unet", "teacher_weight": 0.0, "free_style": 0.0}
_RUN_STATE = ("vae.safetensors", "vae_stage.safetensors", "vae_done.json", "unet.safetensors",
              "transformer.safetensors")
#: Denoiser architectures (``TrainConfig.arch``) and the stage checkpoint each writes.
ARCHS = {"unet": "unet.safetensors", "sd3": "transformer.safetensors"}


def _note_changes(out: Path, saved: dict, now: dict) -> None:
    """Record in the run's log the options a resume changes (those it may: the schedule, the
    weights of the loss terms...), with the last step logged, so that the run's history stays
    in its folder (and in the ``notes`` of the export's ``toyworld.json``)."""
    now = json.loads(json.dumps(now))  # as config.json records it (tuples as lists)
    changed = {k: [saved[k], v] for k, v in now.items() if k in saved and v != saved[k]}
    if not changed:
        return
    log = out / "log.jsonl"
    steps = [json.loads(line).get("step", 0) for line in
             (log.read_text().splitlines() if log.is_file() else []) if '"step"' in line]
    text = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
    append_log(out, {"stage": "note", "last_logged_step": max(steps, default=0),
                     "text": f"resumed with {text}", "changed": changed})


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True) -> Path:
    """Run (or resume) the VAE stage (training, or with ``init_from`` and ``extended`` the
    tuning of :mod:`.decoder`), then the UNet stage (or with ``arch="sd3"`` the transformer's,
    :mod:`.flow`); returns the run directory."""
    if cfg.cooldown is not None and not 0 <= cfg.cooldown[0] < cfg.cooldown[1]:
        raise ValueError(f"cooldown needs 0 <= START < END, got {cfg.cooldown}")
    if cfg.arch not in ARCHS:
        raise ValueError(f"unknown arch {cfg.arch!r}; valid: {', '.join(ARCHS)}")
    check_style_weights(cfg.style_weights)  # before hours of rendering and VAE training
    _check_loss_options(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "config.json"
    started = [p.name for p in map(out.joinpath, _RUN_STATE) if p.exists()]
    if started and not resume:
        raise ValueError(f"{out} already holds a run ({', '.join(started)}); pass --resume to "
                         "continue it, or choose a new --out")
    if resume and cfg_path.exists():
        saved = json.loads(cfg_path.read_text())
        for key, before in _RECORDED.items():
            if saved.get(key, before) != getattr(cfg, key):
                raise ValueError(
                    f"--resume with {key}={getattr(cfg, key)} but the run in {out} used "
                    f"{saved.get(key, before)}; pass the same value or start a new --out"
                )
        _note_changes(out, saved, asdict(cfg))
    cfg_path.write_text(json.dumps(asdict(cfg), indent=2))
    tokenizer = _tokenizer(out)
    vae, unet, text = build_models(
        cfg, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id
    )
    flow = None
    if cfg.arch == "sd3":
        from .flow import build_flow_models

        flow = build_flow_models(cfg, len(tokenizer), tokenizer.bos_token_id,
                                 tokenizer.eos_token_id)
    data = _scenes(cfg)
    scale = None
    if cfg.init_from is not None and not (out / ARCHS[cfg.arch]).exists():
        scale = _init_from_pipeline(out, Path(cfg.init_from), vae, None if flow else unet,
                                    text, vae_done=not cfg.extended)
        for encoder in flow[1:] if flow else ():  # both CLIP encoders start as the model's
            # (their text transformer; the pooled projection starts random)
            encoder.text_model.load_state_dict(getattr(text, "text_model", text).state_dict())
    if not (out / "vae_done.json").exists() and cfg.init_from is not None:
        # Extending a trained model: its VAE learns the new renders, the old latents anchored.
        from .decoder import DecoderConfig, tune_decoder

        tuned = DecoderConfig(run=str(out), steps=cfg.vae_steps, extended=True,
                              train_encoder=True, seed=cfg.seed + 11)
        (out / "vae_done.json").write_text(
            json.dumps(tune_decoder(tuned, resume=resume, progress=progress)))
    if not (out / "vae_done.json").exists():
        psnr = train_vae(cfg, data, vae, resume=resume, progress=progress)
        (out / "vae_done.json").write_text(json.dumps({"psnr": psnr}))
    vae.load_state_dict(load_file(str(out / "vae_best.safetensors")))
    vae.to(device())
    latents = encode_latents(vae, data.images)
    if scale is None and (out / "scale.json").exists() and cfg.init_from is not None:
        scale = json.loads((out / "scale.json").read_text())["scaling_factor"]
    if scale is None:
        scale = 1.0 / latents.std().item()  # SD's scaling_factor: unit-variance latents
    (out / "scale.json").write_text(json.dumps({"scaling_factor": scale}))
    if flow is not None:
        from .flow import train_flow

        train_flow(cfg, data, latents * scale, *flow, tokenizer, resume=resume,
                   progress=progress)
    else:
        train_unet(cfg, data, latents * scale, unet, text, tokenizer, resume=resume,
                   progress=progress)
    return out


def _init_from_pipeline(out: Path, folder: Path, vae, unet, text, *, vae_done: bool) -> float:
    """Load an exported pipeline's weights (e.g. the shipped model) to continue training it;
    the VAE stage is taken as done unless ``vae_done`` is false (extending the vocabulary).
    Returns the pipeline's latent scaling factor."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    src = AutoencoderKL.from_pretrained(str(folder), subfolder="vae").float()
    vae.load_state_dict(src.state_dict())
    if unet is not None:  # a flow run takes the VAE and the text encoder only
        from .growth import load_grown

        load_grown(unet, UNet2DConditionModel.from_pretrained(
            str(folder), subfolder="unet").float().state_dict())
    text.load_state_dict(
        CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder").float().state_dict()
    )
    if not (out / "vae_best.safetensors").exists():  # a resumed VAE stage keeps its own
        atomic_save(vae.state_dict(), out / "vae_best.safetensors", {"init_from": str(folder)})
    if vae_done:
        (out / "vae_done.json").write_text(json.dumps({"init_from": str(folder)}))
    return float(src.config.scaling_factor)
