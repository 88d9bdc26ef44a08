"""SD3 and Flux adapters on tiny random parts: parity with diffusers' own pipelines, loading,
latents and images, the cfg = 1 identity, inversion, and the refusals (issue 19's attention)."""

import copy
import warnings

import diffusers
import pytest
import torch

from retouch.attention.session import attention_control, controlled_network
from retouch.attention.sites import BatchLayout
from retouch.checks import Note
from retouch.inversion import METHODS, invert, reconstruct
from retouch.models.flux import FluxModel
from retouch.models.pipeline import PipelineModel
from retouch.models.sd3 import SD3Model
from retouch.samplers import euler_step, sample
from retouch.schedules import FlowSchedule, to_x0
from tiny_models import tiny_flux_pipeline, tiny_sd3_pipeline

PROMPTS = ["a red square",
           "a big blue circle on a green square on a small red square on a cat"]  # 18 tokens
STEPS = 4


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.fixture(scope="module")
def pipes() -> dict:
    return {"sd3": tiny_sd3_pipeline(), "flux": tiny_flux_pipeline(),
            "schnell": tiny_flux_pipeline(guidance=False)}


def adapter(pipes, kind):
    return (SD3Model if kind == "sd3" else FluxModel)(pipes[kind])


def noise(model, batch=1, seed=1) -> torch.Tensor:
    return torch.randn(model.latent_shape(batch), generator=torch.Generator().manual_seed(seed))


def reference(pipe, kind, x_T, cfg):
    """diffusers' own generation from ``x_T`` (spatial latents in and out)."""
    common = dict(height=16, width=16, num_inference_steps=STEPS, output_type="latent")
    if kind == "sd3":
        return pipe(PROMPTS, guidance_scale=cfg, latents=x_T.clone(), **common).images
    b, c, h, w = x_T.shape
    packed = pipe._pack_latents(x_T.clone(), b, c, h, w)
    if kind == "flux":  # the guidance scale is a transformer input
        out = pipe(PROMPTS, guidance_scale=cfg, latents=packed, **common).images
    else:  # schnell: true classifier-free guidance against an empty negative prompt
        out = pipe(PROMPTS, true_cfg_scale=cfg, negative_prompt=[""] * b, latents=packed,
                   **common).images
    return pipe._unpack_latents(out, 16, 16, pipe.vae_scale_factor)


@pytest.mark.parametrize("kind", ["sd3", "flux", "schnell"])
def test_generation_matches_the_diffusers_pipeline(pipes, kind):
    model, pipe = adapter(pipes, kind), pipes[kind]
    assert isinstance(model.schedule, FlowSchedule) and model.unet is None
    x_T = noise(model, batch=2)  # flow: at t = 1 the latent is the noise itself
    ref = reference(pipe, kind, x_T, cfg=3.0)
    grid = model.time_grid(STEPS)
    assert torch.allclose(grid.float(), pipe.scheduler.sigmas)  # the scheduler's own sigmas
    assert grid[0] == 1.0 and grid[-1] == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Note)  # the second prompt is over the tiny CLIP's 16
        ours = sample(model.denoiser(PROMPTS, cfg=3.0), x_T, grid, step=euler_step,
                      progress=False)
    assert rel(ours, ref) <= 1e-4


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_a_saved_folder_loads_with_its_adapter(pipes, kind, tmp_path):
    pipes[kind].save_pretrained(tmp_path, safe_serialization=True)
    loaded = PipelineModel.load(tmp_path, device="cpu")
    assert type(loaded) is (SD3Model if kind == "sd3" else FluxModel)
    model = adapter(pipes, kind)
    x, t = noise(model), 0.6
    with torch.no_grad():  # the same weights; a loaded CLIP may pick another attention kernel
        assert rel(loaded.denoiser(PROMPTS[0], cfg=2.0)(x, t),
                   model.denoiser(PROMPTS[0], cfg=2.0)(x, t)) <= 1e-6


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_images_and_latents_have_the_models_shapes(pipes, kind):
    model = adapter(pipes, kind)
    images = torch.rand(2, 3, model.image_size, model.image_size) * 2 - 1
    z = model.encode_image(images)
    assert z.shape == model.latent_shape(2) == (2, model.vae.config.latent_channels, 8, 8)
    vae = model.vae.config  # the latent is (E(x) - shift_factor) * scaling_factor
    mean = model.vae.encode(images).latent_dist.mode()
    assert torch.allclose(z, (mean - vae.shift_factor) * vae.scaling_factor, atol=1e-6)
    assert model.decode(z).shape == (2, 16, 16, 3)
    assert model.decode(z, output="tensor").shape == images.shape  # a VAE round trip runs
    x0 = model.denoiser(PROMPTS[0], cfg=2.0)(model.check_latent(z), 0.5)
    assert x0.shape == z.shape and torch.isfinite(x0).all()
    with pytest.raises(ValueError, match="channels; this model's latents have"):
        model.check_latent(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="multiples of 2"):
        model.check_latent(torch.zeros(model.latent_shape(1)[:2] + (7, 7)))


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_cfg_one_is_the_network_velocity_as_x0_in_one_call(pipes, kind):
    """The adapter's conventions against a direct call built as diffusers' pipeline does."""
    model, pipe = adapter(pipes, kind), pipes[kind]
    x, t = noise(model, batch=1), 0.7
    calls = []
    hook = model.network.register_forward_hook(lambda *a: calls.append(1))
    try:
        ours = model.denoiser(PROMPTS[0], cfg=1.0 if kind == "sd3" else 2.5)(x, t)
    finally:
        hook.remove()
    assert len(calls) == 1
    with torch.no_grad():
        if kind == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS[0], None, None,
                                                      do_classifier_free_guidance=False)
            u = pipe.transformer(hidden_states=x, timestep=torch.tensor([t * 1000]),
                                 encoder_hidden_states=embeds, pooled_projections=pooled,
                                 return_dict=False)[0]
        else:
            embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS[0], None)
            u = pipe.transformer(
                hidden_states=pipe._pack_latents(x, 1, 16, 8, 8), timestep=torch.tensor([t]),
                guidance=torch.tensor([2.5]), pooled_projections=pooled,
                encoder_hidden_states=embeds, txt_ids=text_ids,
                img_ids=pipe._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32),
                return_dict=False)[0]
            u = pipe._unpack_latents(u, 16, 16, pipe.vae_scale_factor)
    assert rel(ours, to_x0(u, x, 1 - t, t, "flow_prediction")) <= 1e-5


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_every_inversion_runs_on_flow_models_or_is_refused(pipes, kind):
    model = adapter(pipes, kind)
    z = model.encode_image(torch.rand(1, 3, 16, 16) * 2 - 1)
    cfg = 3.0 if kind == "sd3" else 2.5  # Flux: the embedded guidance, one call per step
    # Exact methods reconstruct to round-off; rf_solver / fireflow are second order; the rest
    # are first order (ddim, null_text, negative_prompt: loose bounds on a random network).
    # rf_inversion pulled to the image at every step lands on it exactly.
    bound = {"bdia": 1e-5, "direct": 1e-5, "ddpm_edit_friendly": 1e-5, "renoise": 1e-3,
             "rf_solver": 0.05, "fireflow": 0.05, "rf_inversion": 1e-5}
    config = {"rf_inversion": {"eta": 1.0, "eta_end": 1.0}}
    for method in METHODS:
        if kind == "flux" and method in ("null_text", "negative_prompt"):
            with pytest.raises(ValueError, match=f"{method} works on the unconditional branch"):
                invert(model, z, PROMPTS[0], method=method, steps=8, cfg=cfg, progress=False)
            continue
        if method == "edict":
            with pytest.raises(ValueError, match=r"edict's eps-held steps need alpha\(t\) > 0"):
                invert(model, z, PROMPTS[0], method=method, steps=8, cfg=cfg, progress=False)
            continue
        inv = invert(model, z, PROMPTS[0], method=method, steps=8, cfg=cfg, progress=False,
                     config=config.get(method))
        back = reconstruct(inv, model, progress=False)
        assert back.shape == z.shape and rel(back, z) < bound.get(method, 0.5), method


# --- refusals --------------------------------------------------------------------------------


def test_flux_without_t5_is_refused_naming_the_part(pipes):
    parts = dict(pipes["flux"].components, text_encoder_2=None, tokenizer_2=None)
    with pytest.raises(ValueError, match=r"lacks text_encoder_2 \(the T5 encoder\), "
                                         r"tokenizer_2 \(the T5 tokenizer\)"):
        FluxModel(diffusers.FluxPipeline(**parts))


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_prompts_over_t5_are_refused_and_over_clip_noted(pipes, kind):
    model = adapter(pipes, kind)
    limit = model.max_sequence_length
    with pytest.raises(ValueError, match=f"T5 tokens; this model reads at most "
                                         f"max_sequence_length={limit}: shorten it"):
        model.encode(" ".join(["red"] * limit))
    with pytest.warns(Note, match="T5 reads it whole, CLIP reads its first 16"):
        cond = model.encode(PROMPTS[1])  # 18 tokens with BOS/EOS: over the tiny CLIP's 16
    assert cond.embeds.shape[1] == limit + (16 if kind == "sd3" else 0)


def test_sd3_without_t5_reads_zeros_and_refuses_what_clip_cannot_read():
    model = SD3Model(tiny_sd3_pipeline(t5=False))
    cond = model.encode(PROMPTS[0])
    assert cond.embeds.shape == (1, 16 + 256, 32) and not cond.embeds[:, 16:].any()
    with pytest.raises(ValueError, match="without a T5 encoder this model reads at most 16"):
        model.encode(PROMPTS[1])


def test_distilled_flux_has_no_negative_branch(pipes):
    model = adapter(pipes, "flux")
    with pytest.raises(ValueError, match="guidance-distilled: cfg=3.5 is the guidance it reads "
                                         "and there is no negative branch"):
        model.denoiser(PROMPTS[0], negative="blurry")
    den = model.denoiser(PROMPTS[0], cfg=5.0)  # one row, no guidance halves
    assert den.cond.added["guidance"].tolist() == [5.0]


def test_attention_control_takes_the_network_not_a_transformer_models_unet(pipes):
    model = adapter(pipes, "flux")
    with pytest.raises(ValueError, match="pass model.network"), \
            attention_control(model.unet, [], layout=BatchLayout(("image",))):
        pass
    for kind in ("sd3", "flux"):
        assert controlled_network(adapter(pipes, kind), "P2P") is pipes[kind].transformer


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_flowedit_runs_on_flow_models(pipes, kind):
    from retouch.recipes.flowedit import flowedit

    model = adapter(pipes, kind)
    z = model.encode_image(torch.rand(1, 3, 16, 16) * 2 - 1)
    same = flowedit(model, z, PROMPTS[0], PROMPTS[0], steps=4)
    assert torch.equal(same.latents[1], same.latents[0])  # no inversion: the image itself
    moved = flowedit(model, z, PROMPTS[0], PROMPTS[1], steps=4)
    assert moved.latents.shape == (2, *z.shape[1:]) and not torch.equal(moved.latents[1], z[0])


def test_fingerprints_tell_transformer_models_apart(pipes):
    from retouch.inversion import fingerprint_of

    sd3, flux = adapter(pipes, "sd3"), adapter(pipes, "flux")
    assert fingerprint_of(sd3) != fingerprint_of(flux)
    other = copy.deepcopy(sd3)
    with torch.no_grad():
        next(other.network.parameters()).add_(1.0)
    assert fingerprint_of(other) != fingerprint_of(sd3)


def test_distilled_flux_inverts_with_the_guidance_it_samples_with(pipes):
    from retouch.inversion import as_factory

    model = adapter(pipes, "flux")
    z = model.encode_image(torch.rand(1, 3, 16, 16) * 2 - 1)
    inv = invert(model, z, PROMPTS[0], method="bdia", steps=6, cfg=2.5, progress=False)
    assert inv.nfe == 6  # one call per step: no negative branch
    # The inversion's guided denoiser is model.denoiser(prompt, cfg): the same network input.
    x, t = noise(model), float(model.time_grid(6)[2])
    inverting = as_factory(model, PROMPTS[0]).denoiser(cfg=2.5)
    assert torch.equal(inverting(x, t), model.denoiser(PROMPTS[0], cfg=2.5)(x, t))
