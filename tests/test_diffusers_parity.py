"""retouch's steps reproduce diffusers' schedulers on a tiny random UNet2DConditionModel.

The settings mapping is documented in :mod:`retouch.samplers` (module docstring table).
"""

import functools

import diffusers
import pytest
import torch

from retouch.grids import discrete_grid
from retouch.models import CFGDenoiser, UNetDenoiser
from retouch.samplers import get_step, sample
from retouch.schedules import FlowSchedule, Schedule, get_schedule

SD = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
)
RTOL = 1e-4
PREDICTIONS = ("epsilon", "v_prediction")


@functools.cache
def tiny_unet() -> diffusers.UNet2DConditionModel:
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=8,
        attention_head_dim=2,  # diffusers: the number of heads
    ).eval()


def inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 4, 8, 8, generator=g), torch.randn(1, 5, 32, generator=g)


def diffusers_loop(sched, x, ehs, *, eta=0.0, noises=None):
    unet, ehs = tiny_unet(), ehs.expand(x.shape[0], -1, -1)
    for i, t in enumerate(sched.timesteps):
        out = unet(sched.scale_model_input(x, t), t, encoder_hidden_states=ehs).sample
        kw = {"eta": eta, "variance_noise": noises[i]} if eta else {}
        x = sched.step(out, t, x, **kw).prev_sample
    return x


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def retouch_run(sched, prediction, grid, x, ehs, step, **kw):
    schedule = Schedule.from_diffusers_config(sched.config)
    den = UNetDenoiser(tiny_unet(), schedule, prediction_type=prediction, encoder_hidden_states=ehs)
    return sample(den, x, grid(schedule), step=step, progress=False, **kw)


@torch.no_grad()
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize(
    ("spacing", "offset", "alpha_to_one", "steps"),
    [
        ("leading", 1, True, 10),
        ("leading", 1, False, 7),
        ("trailing", 0, True, 10),
        ("trailing", 0, False, 10),
    ],
)
def test_ddim(prediction, spacing, offset, alpha_to_one, steps):
    x, ehs = inputs()
    sched = diffusers.DDIMScheduler(
        **SD,
        prediction_type=prediction,
        timestep_spacing=spacing,
        steps_offset=offset,
        set_alpha_to_one=alpha_to_one,
        clip_sample=False,
    )
    sched.set_timesteps(steps)
    ref = diffusers_loop(sched, x, ehs)

    def grid(s):
        return discrete_grid(
            s, steps, spacing=spacing, steps_offset=offset, final=None if alpha_to_one else 0.0
        )

    assert rel(retouch_run(sched, prediction, grid, x, ehs, get_step("ddim")), ref) < RTOL


@torch.no_grad()
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_ddim_eta_with_supplied_noise(prediction):
    x, ehs = inputs()
    sched = diffusers.DDIMScheduler(
        **SD,
        prediction_type=prediction,
        timestep_spacing="leading",
        steps_offset=1,
        clip_sample=False,
    )
    sched.set_timesteps(8)
    noises = [torch.randn(x.shape, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    ref = diffusers_loop(sched, x, ehs, eta=0.6, noises=noises)
    got = retouch_run(
        sched,
        prediction,
        lambda s: discrete_grid(s, 8, steps_offset=1),
        x,
        ehs,
        get_step("ddim", eta=0.6),
        noises=noises,
    )
    assert rel(got, ref) < RTOL


@torch.no_grad()
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize(
    ("spacing", "offset", "steps"), [("linspace", 0, 7), ("trailing", 0, 10), ("leading", 1, 10)]
)
def test_euler(prediction, spacing, offset, steps):
    x, ehs = inputs()
    sched = diffusers.EulerDiscreteScheduler(
        **SD, prediction_type=prediction, timestep_spacing=spacing, steps_offset=offset
    )
    sched.set_timesteps(steps)
    x_ve = x * sched.init_noise_sigma  # diffusers' Euler state is x / alpha
    ref = diffusers_loop(sched, x_ve, ehs)

    def grid(s):
        return discrete_grid(s, steps, spacing=spacing, steps_offset=offset, convention="euler")

    schedule = get_schedule("scaled_linear")
    x_vp = x_ve * schedule.coeffs(float(grid(schedule)[0]))[0]
    got = retouch_run(sched, prediction, grid, x_vp, ehs, get_step("euler"))
    assert rel(got, ref) < RTOL  # both end at clean, where x / alpha = x


@torch.no_grad()
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize(
    ("spacing", "steps", "order", "final"),
    [
        ("linspace", 10, 2, "zero"),
        ("trailing", 20, 2, "zero"),
        ("leading", 8, 2, "sigma_min"),
        ("linspace", 16, 2, "sigma_min"),
        ("linspace", 10, 3, "zero"),
        ("trailing", 16, 3, "sigma_min"),
    ],
)
def test_dpm_solver_multistep(prediction, spacing, steps, order, final):
    x, ehs = inputs()
    sched = diffusers.DPMSolverMultistepScheduler(
        **SD,
        prediction_type=prediction,
        timestep_spacing=spacing,
        solver_order=order,
        final_sigmas_type=final,
    )
    sched.set_timesteps(steps)
    ref = diffusers_loop(sched, x, ehs)

    def grid(s):
        return discrete_grid(
            s,
            steps,
            spacing=spacing,
            convention="multistep",
            final=None if final == "zero" else 0.0,
        )

    step = get_step("dpmpp_2m" if order == 2 else "dpmpp_3m")
    assert rel(retouch_run(sched, prediction, grid, x, ehs, step), ref) < RTOL


@torch.no_grad()
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize(
    ("steps", "order", "variant", "final"),
    [(10, 2, "bh2", "zero"), (16, 3, "bh2", "zero"), (12, 3, "bh1", "sigma_min")],
)
def test_unipc(prediction, steps, order, variant, final):
    x, ehs = inputs()
    sched = diffusers.UniPCMultistepScheduler(
        **SD,
        prediction_type=prediction,
        solver_order=order,
        solver_type=variant,
        final_sigmas_type=final,
    )
    sched.set_timesteps(steps)
    ref = diffusers_loop(sched, x, ehs)

    def grid(s):
        return discrete_grid(
            s,
            steps,
            spacing="linspace",
            convention="multistep",
            final=None if final == "zero" else 0.0,
        )

    step = get_step("unipc", order=order, variant=variant)
    assert rel(retouch_run(sched, prediction, grid, x, ehs, step), ref) < RTOL


@torch.no_grad()
def test_cfg_is_one_batched_unet_call_matching_sd_guidance():
    x, ehs = inputs()
    uncond = torch.zeros_like(ehs)
    unet, calls = tiny_unet(), []
    hook = unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        schedule = get_schedule("scaled_linear")
        den = UNetDenoiser(unet, schedule)
        cfg = CFGDenoiser(
            den,
            cond={"encoder_hidden_states": ehs},
            uncond={"encoder_hidden_states": uncond},
            scale=7.5,
        )
        x0 = cfg(x, 500.0)
        assert calls == [4]
        # SD pipelines guide eps: eps_u + w (eps_c - eps_u); the same as guiding x0.
        eps_u = unet(x, 500, encoder_hidden_states=uncond.expand(2, -1, -1)).sample
        eps_c = unet(x, 500, encoder_hidden_states=ehs.expand(2, -1, -1)).sample
        alpha, sigma = schedule.coeffs(500.0)
        want = (x - sigma * (eps_u + 7.5 * (eps_c - eps_u))) / alpha
        assert rel(x0, want) < RTOL
    finally:
        hook.remove()


@torch.no_grad()
def test_flow_adapter_maps_time_to_sigma_times_1000():
    seen = []

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, t, **kw):
            seen.append(float(t))
            return (torch.ones_like(x),)  # flow velocity u = eps - x0 = 1

    den = UNetDenoiser(Spy(), FlowSchedule(), prediction_type="flow_prediction")
    x = torch.full((1, 4, 2, 2), 0.5)
    x0 = den(x, 0.25)
    assert seen == [250.0]
    torch.testing.assert_close(x0, x - 0.25 * torch.ones_like(x))  # x0 = x - sigma u
    with pytest.raises(ValueError, match="epsilon"):
        UNetDenoiser(Spy(), FlowSchedule(), prediction_type="flow")
