"""Inversion methods: exactness in float64, diffusers parity, the truth on the analytic GMM.

The network is a tiny random ``UNet2DConditionModel`` in float64 whose output layer is scaled
down (x0.2), so its eps is small and smooth like a trained model's rather than wild, and whose
text embeddings have 16 tokens, so (as in SD) the null embedding has more dimensions than the
latent it must steer.
"""

import functools
import re

import diffusers
import pytest
import torch
from PIL import Image

from retouch.analytic import GaussianMixture, GMMDenoiser, reference_solution
from retouch.grids import discrete_grid, uniform_grid
from retouch.images import prepare_image
from retouch.inversion import (
    METHODS,
    DenoiserFactory,
    Inversion,
    invert,
    load_inversion,
    reconstruct,
)
from retouch.models import UNetDenoiser
from retouch.samplers import sample
from retouch.schedules import get_schedule

STEPS = 8
EXACT = ("edict", "bdia", "direct", "ddpm_edit_friendly")
SD = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
)
# The toy network is far less sensitive to its embeddings than SD: null-text needs a larger
# step size and more iterations than the paper's lr=1e-2 x 10 to have the same authority.
NULL_TEXT = dict(lr=0.05, inner_steps=20)


@functools.cache
def tiny_unet(seed: int = 0) -> diffusers.UNet2DConditionModel:
    torch.manual_seed(seed)
    unet = (
        diffusers.UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            norm_num_groups=8,
            attention_head_dim=2,
        )
        .eval()
        .double()
    )
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.2)
        unet.conv_out.bias.mul_(0.2)
    return unet


@functools.cache
def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    cond = torch.randn(1, 16, 32, generator=g, dtype=torch.float64)
    uncond = torch.randn(1, 16, 32, generator=g, dtype=torch.float64)
    return x, cond, uncond


def factory(seed: int = 0, prediction: str = "epsilon") -> DenoiserFactory:
    _, cond, uncond = data()
    inner = UNetDenoiser(tiny_unet(seed), get_schedule("scaled_linear"), prediction_type=prediction)
    return DenoiserFactory(inner, cond=cond, uncond=uncond)


def grid():
    return discrete_grid(get_schedule("scaled_linear"), STEPS, steps_offset=1)


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@functools.cache
def inverted(method: str, cfg: float) -> Inversion:
    config = NULL_TEXT if method == "null_text" else None
    return invert(
        factory(), data()[0], method=method, cfg=cfg, times=grid(), config=config, progress=False
    )


@functools.cache
def rec_error(method: str, cfg: float) -> float:
    return rel(reconstruct(inverted(method, cfg), factory(), progress=False), data()[0])


@pytest.mark.parametrize("method", EXACT)
def test_exact_methods_reconstruct_at_high_cfg(method):
    assert rec_error(method, 7.5) <= 1e-6
    assert rec_error("ddim", 7.5) > 1e-2  # the setting really is hard for plain DDIM


def test_ddim_error_grows_with_cfg():
    errors = [rec_error("ddim", w) for w in (1.0, 3.0, 7.5)]
    assert errors[0] < errors[1] < errors[2], errors


def test_null_text_beats_ddim_at_high_cfg():
    ddim_same_cfg = rec_error("ddim", 7.5)
    x = data()[0]
    baseline = invert(
        factory(),
        x,
        method="ddim",
        cfg=7.5,
        times=grid(),
        config={"invert_cfg": 1.0},
        progress=False,
    )  # the paper's baseline
    ddim_cfg1 = rel(reconstruct(baseline, factory(), progress=False), x)
    null = rec_error("null_text", 7.5)
    assert null < 0.5 * ddim_same_cfg and null < 0.5 * ddim_cfg1, (null, ddim_same_cfg, ddim_cfg1)
    # NFE: pivot N + per step (cond + final uncond + Adam iterations)
    inv = inverted("null_text", 7.5)
    assert 3 * STEPS < inv.nfe <= 3 * STEPS + STEPS * NULL_TEXT["inner_steps"]


def test_renoise_improves_on_ddim():
    assert rec_error("renoise", 1.0) < 0.5 * rec_error("ddim", 1.0)


def test_negative_prompt_reconstruction_is_cfg_free():
    # ∅ := c makes the CFG sampler the w = 1 one, so any w reconstructs like ddim at w = 1.
    assert rec_error("negative_prompt", 7.5) == pytest.approx(rec_error("ddim", 1.0), rel=1e-9)


@pytest.mark.parametrize("alpha_to_one", [True, False])
@torch.no_grad()
def test_ddim_matches_diffusers_inverse_scheduler(alpha_to_one):
    """Settings coincide for eps-prediction: diffusers converts the output at the *current*
    time's alpha although the network ran at the target time, which for eps is holding eps
    (retouch's default on VP) but for v / sample prediction is a different approximation."""
    x, cond, _ = data()
    sched = diffusers.DDIMInverseScheduler(
        **SD, steps_offset=1, set_alpha_to_one=alpha_to_one, clip_sample=False
    )
    sched.set_timesteps(STEPS)
    ref = x
    for t in sched.timesteps:
        out = tiny_unet()(ref, t, encoder_hidden_states=cond).sample
        ref = sched.step(out, t, ref).prev_sample
    times = discrete_grid(
        get_schedule("scaled_linear"), STEPS, steps_offset=1, final=None if alpha_to_one else 0.0
    )
    inv = invert(factory(), x, method="ddim", times=times, progress=False)
    # diffusers takes square roots of its float32 alphas_cumprod in float32: a 1e-7 floor.
    assert rel(inv.latent, ref) < 1e-6
    assert inv.nfe == STEPS


@pytest.mark.parametrize("schedule_name", ["rectified_flow", "scaled_linear"])
def test_ddim_and_bdia_on_the_analytic_gmm(schedule_name):
    schedule = get_schedule(schedule_name)
    gmm = GaussianMixture.random(dim=16, components=4)
    den = GMMDenoiser(gmm, schedule)
    x0 = gmm.sample(8, generator=torch.Generator().manual_seed(3))
    # DDIM inversion converges to the exact probability-flow ODE solution (about first order;
    # VP holds eps, flow the velocity: see retouch.inversion.core).
    truth = reference_solution(gmm, schedule, x0, schedule.t_clean, schedule.t_max)
    errors, rec_errors = [], []
    for n in (10, 80):
        if schedule_name == "rectified_flow":
            times = uniform_grid(schedule, n)
        else:
            times = discrete_grid(schedule, n, spacing="trailing")
        inv = invert(den, x0, method="ddim", times=times, progress=False)
        errors.append(rel(inv.latent, truth))
        rec_errors.append(rel(reconstruct(inv, den, progress=False), x0))
    assert errors[1] < errors[0] / 3 and rec_errors[1] < rec_errors[0] / 3, (errors, rec_errors)
    # BDIA is exact on the same grid, at one network call per step.
    inv = invert(den, x0, method="bdia", times=times, progress=False)
    assert rel(reconstruct(inv, den, progress=False), x0) < 1e-10
    assert inv.nfe == 80


def test_every_method_round_trips_through_a_file(tmp_path):
    for method in METHODS:
        inv = inverted(method, 3.0)
        path = inv.save(tmp_path / f"{method}.safetensors")
        back = load_inversion(path, fingerprint=factory().fingerprint, steps=STEPS, method=method)
        assert back.equals(inv), method
        a = reconstruct(inv, factory(), progress=False)
        b = reconstruct(back, factory(), progress=False)
        assert torch.equal(a, b), method


def test_mismatching_inversion_file_is_refused(tmp_path):
    path = inverted("ddim", 3.0).save(tmp_path / "inv.safetensors")
    other = factory(seed=1)
    assert other.fingerprint != factory().fingerprint
    with pytest.raises(ValueError, match="another model"):
        load_inversion(path, fingerprint=other.fingerprint)
    with pytest.raises(ValueError, match=f"it has {STEPS} steps, 20 were requested"):
        load_inversion(path, steps=20)
    with pytest.raises(ValueError, match="'ddim' inversion, 'edict' was requested"):
        load_inversion(path, method="edict")
    with pytest.raises(ValueError, match="another model"):
        reconstruct(Inversion.load(path), other, progress=False)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_inversion(tmp_path / "junk.safetensors")


def test_target_branch_runs_free_beside_the_exact_source_branch():
    x, cond, _ = data()
    f = factory()
    inv = inverted("direct", 7.5)
    both = reconstruct(inv, f, target=cond, progress=False)
    assert both.shape[0] == 2
    assert rel(both[:1], x) < 1e-6  # source rows: offsets added
    assert inv.nfe == STEPS  # the offsets cost nothing extra: they act in the pass that runs
    with torch.no_grad():
        plain = sample(f.denoiser(cfg=7.5), inv.latent, inv.times, progress=False)
    assert rel(both[1:], plain) < 1e-10  # target rows: free DDIM with the target prompt
    # Methods whose corrections belong to both branches give identical rows for target = source.
    for method in ("null_text", "ddpm_edit_friendly", "bdia", "edict"):
        rows = reconstruct(inverted(method, 7.5), f, target=cond, progress=False)
        assert rel(rows[1:], rows[:1]) < 1e-10, method


def test_names_and_options_are_checked():
    x = data()[0]
    with pytest.raises(ValueError, match="valid: ddim, null_text, negative_prompt, edict"):
        invert(factory(), x, method="nope", progress=False)
    with pytest.raises(ValueError, match="unknown option.*lr.*valid: leapfrog, p"):
        invert(factory(), x, method="edict", config={"lr": 1}, progress=False)
    den = GMMDenoiser(GaussianMixture.random(dim=16, components=2), get_schedule("linear"))
    with pytest.raises(ValueError, match="text-conditional"):
        invert(
            den,
            torch.zeros(1, 16, dtype=torch.float64),
            method="ddim",
            cfg=5.0,
            steps=4,
            progress=False,
        )


def test_prepare_image_converts_resizes_or_refuses():
    img, notes = prepare_image(Image.new("RGBA", (128, 128)), 64)
    assert img.mode == "RGB" and img.size == (64, 64)
    assert any("RGBA" in n and "alpha" in n for n in notes)
    assert any("resized the 128x128" in n for n in notes)
    img, notes = prepare_image(Image.new("P", (64, 64)), 64)
    assert img.mode == "RGB" and notes == ["converted the P image to RGB"]
    with pytest.raises(ValueError, match=re.escape("is 128x64") + ".*crop"):
        prepare_image(Image.new("L", (128, 64)), 64)


def test_bdia_target_rows_take_the_source_correction():
    """In an edit, BDIA's target row is its own DDIM step plus the source row's backward
    correction (a one-step scheme; its own correction would make a leapfrog that never damps
    what the edit changes), and the source row stays exact."""
    from retouch.inversion import BDIAStep
    from retouch.inversion.core import step_state
    from retouch.samplers import ddim_step

    x, cond, _ = data()
    f = factory()
    inv = inverted("bdia", 7.5)
    target = cond + 0.5 * torch.randn(cond.shape, generator=torch.Generator().manual_seed(9),
                                      dtype=cond.dtype)
    both = reconstruct(inv, f, target=target, progress=False)
    assert rel(both[:1], x) < 1e-10

    den = GMMDenoiser(GaussianMixture.random(dim=16, components=2), get_schedule("linear"))
    g = torch.Generator().manual_seed(4)
    prev, cur = torch.randn(2, 16, generator=g), torch.randn(2, 16, generator=g)
    t_prev, t, t_next = 700.0, 600.0, 500.0
    step = BDIAStep(x_prev=prev, t_prev=t_prev, source_rows=1)
    out = step(den, cur, t, t_next, den(cur, t), step_state())
    state = step_state()
    down = ddim_step(den, cur, t, t_next, den(cur, t), state)
    up = ddim_step(den, cur, t, t_prev, den(cur, t), state)
    source_correction = prev[0] - up[0]
    assert torch.allclose(out[0], down[0] + source_correction, atol=1e-12)
    assert torch.allclose(out[1], down[1] + source_correction, atol=1e-12)


def test_invert_cli_replays_a_saved_inversion_only_on_its_image(tiny_toy_pipeline, tmp_path,
                                                                 capsys):
    import json
    import random

    import numpy as np

    from retouch.cli import main
    from retouch.toyworld.render import render
    from retouch.toyworld.scene import caption, random_scene

    scenes = [random_scene(random.Random(k), backgrounds=(bg,))
              for k, bg in enumerate(("white", "black"))]
    prompt = caption(scenes[0]).text
    paths = [tmp_path / "image0.png", tmp_path / "image1.png"]
    for scene, path in zip(scenes, paths):
        Image.fromarray(render(scene, 16).image).save(path)
    common = ["--model", str(tiny_toy_pipeline), "--prompt", prompt]
    first = tmp_path / "first"
    assert main(["invert", str(paths[0]), *common, "--method", "edict", "--steps", "3",
                 "--out", str(first)]) == 0
    report = json.loads((first / "inversion.json").read_text())
    assert report["steps"] == 3 and report["latent_rel_error"] < 1e-3
    saved = ["--from-inversion", str(first / "inversion.safetensors")]
    assert main(["invert", str(paths[0]), *common, *saved, "--out", str(tmp_path / "again")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again" / "reconstruction.png")),
                          np.asarray(Image.open(first / "reconstruction.png")))
    capsys.readouterr()
    assert main(["invert", str(paths[1]), *common, *saved, "--out", str(tmp_path / "no")]) == 2
    assert "is not the image" in capsys.readouterr().err
    assert main(["invert", str(paths[0]), *common, "--steps", "0",
                 "--out", str(tmp_path / "no")]) == 2
    assert "--steps: must be at least 1, got 0" in capsys.readouterr().err


def test_a_latent_layout_never_changes_the_bits():
    """Same values, other strides: the adapter runs the same kernels, so the bits are equal.

    (A channels-last latent from the VAE encoder once ran other convolution kernels than the
    same latent read back from a file, and a replayed reconstruction differed on some CPUs.)
    """
    import numpy as np

    from tiny_models import tiny_model

    model = tiny_model("sd1")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    strided = x.to(memory_format=torch.channels_last)
    assert not strided.is_contiguous()
    den = model.denoiser("a red square", cfg=3.0)
    with torch.no_grad():
        assert torch.equal(den(x, 500.0), den(strided, 500.0))
    assert np.array_equal(model.decode(x), model.decode(strided))
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    latent = model.encode_image(image)
    assert latent.is_contiguous()
    assert torch.equal(latent, model.encode_image(Image.fromarray(image)))


@pytest.mark.parametrize("method", METHODS)
def test_a_saved_inversion_replays_to_the_same_bits(method, tmp_path):
    """invert -> save -> load -> reconstruct equals the in-memory reconstruction bit for bit."""
    import numpy as np

    from tiny_models import tiny_model

    model = tiny_model("sd1")
    image = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    config = {"inner_steps": 2} if method == "null_text" else None
    inv = invert(model, image, "a red square", method=method, steps=3, cfg=2.0, config=config,
                 progress=False)
    first = reconstruct(inv, model, progress=False)
    loaded = load_inversion(inv.save(tmp_path / "inv.safetensors"))
    assert torch.equal(reconstruct(loaded, model, progress=False), first)
