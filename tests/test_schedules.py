"""Schedules: VP identities, diffusers' alpha_bar and timesteps, conversions, grids, bad input."""

import math

import diffusers
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from retouch.grids import discrete_grid, karras_grid, log_snr_grid, spaced_timesteps, uniform_grid
from retouch.schedules import (
    PREDICTION_TYPES,
    SCHEDULES,
    DiscreteVPSchedule,
    FlowSchedule,
    Schedule,
    get_schedule,
    to_eps,
    to_prediction,
    to_x0,
)

VP_NAMES = ("scaled_linear", "linear", "squaredcos_cap_v2")
SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012)
SCHEDULERS = {
    "ddim": diffusers.DDIMScheduler,
    "euler": diffusers.EulerDiscreteScheduler,
    "multistep": diffusers.DPMSolverMultistepScheduler,
}


@settings(max_examples=50, deadline=None)
@given(name=st.sampled_from(VP_NAMES), t=st.floats(-1.0, 999.0))
def test_vp_alpha_sigma_unit_norm(name, t):
    alpha, sigma = get_schedule(name).alpha_sigma(t)
    assert float(alpha**2 + sigma**2) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("name", VP_NAMES)
def test_alpha_bar_matches_diffusers_at_integer_t(name):
    ref = diffusers.DDIMScheduler(**SD, beta_schedule=name).alphas_cumprod.double()
    alpha, _ = get_schedule(name).alpha_sigma(torch.arange(1000.0))
    torch.testing.assert_close(alpha**2, ref, rtol=1e-12, atol=0)


def test_clean_and_flow_endpoints():
    vp, flow = get_schedule("scaled_linear"), get_schedule("rectified_flow")
    assert vp.coeffs(vp.t_clean) == (1.0, 0.0)
    assert flow.coeffs(0.0) == (1.0, 0.0) and flow.coeffs(1.0) == (0.0, 1.0)
    assert flow.coeffs(0.25) == (0.75, 0.25)
    assert math.isinf(float(vp.log_snr(-1.0)))
    lam = vp.log_snr(torch.linspace(-0.5, 999, 50, dtype=torch.float64))
    assert bool((lam[1:] < lam[:-1]).all()), "log-SNR must decrease with t"


def test_euler_fractional_sigmas_match_diffusers():
    sched = diffusers.EulerDiscreteScheduler(**SD, beta_schedule="scaled_linear")
    sched.set_timesteps(7)  # linspace: fractional timesteps
    assert (sched.timesteps != sched.timesteps.round()).any()
    ours = get_schedule("scaled_linear").k_sigma(sched.timesteps.double())
    torch.testing.assert_close(ours, sched.sigmas[:-1].double(), rtol=1e-6, atol=0)


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(SCHEDULES), u=st.floats(0.001, 0.999))
def test_k_sigma_inverse(name, u):
    sch = get_schedule(name)
    t = sch.t_clean + u * (sch.t_max - sch.t_clean)
    assert float(sch.t_from_k_sigma(sch.k_sigma(t))) == pytest.approx(t, rel=1e-9, abs=1e-9)
    assert float(sch.t_from_log_snr(sch.log_snr(t))) == pytest.approx(t, rel=1e-9, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(
    convention=st.sampled_from(sorted(SCHEDULERS)),
    spacing=st.sampled_from(["leading", "trailing", "linspace"]),
    steps=st.integers(1, 60),
    offset=st.integers(0, 1),
)
def test_spaced_timesteps_equal_diffusers(convention, spacing, steps, offset):
    sched = SCHEDULERS[convention](
        **SD, beta_schedule="scaled_linear", timestep_spacing=spacing, steps_offset=offset
    )
    sched.set_timesteps(steps)
    ours = spaced_timesteps(steps, spacing=spacing, steps_offset=offset, convention=convention)
    assert ours.tolist() == sched.timesteps.double().tolist()


def test_discrete_grid_final_times():
    sch = get_schedule("scaled_linear")
    grid = discrete_grid(sch, 10, spacing="leading", steps_offset=1)
    assert grid[0] == 901 and grid[-2] == 1 and grid[-1] == sch.t_clean and len(grid) == 11
    assert discrete_grid(sch, 10, spacing="trailing", final=0.0)[-1] == 0.0


@settings(max_examples=100, deadline=None)
@given(
    kind=st.sampled_from(PREDICTION_TYPES),
    alpha=st.floats(0.05, 1.0),
    sigma=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**16),
)
def test_conversions_round_trip(kind, alpha, sigma, seed):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(3, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 5, generator=g, dtype=torch.float64)
    x = alpha * x0 + sigma * eps
    pred = to_prediction(x0, x, alpha, sigma, kind)
    torch.testing.assert_close(to_x0(pred, x, alpha, sigma, kind), x0)
    torch.testing.assert_close(to_eps(pred, x, alpha, sigma, kind), eps)


def test_v_and_flow_definitions():
    x0, eps = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    a, s = 0.6, 0.8
    x = a * x0 + s * eps
    torch.testing.assert_close(to_prediction(x0, x, a, s, "v_prediction"), a * eps - s * x0)
    torch.testing.assert_close(to_prediction(x0, x, a, s, "flow_prediction"), eps - x0)
    per_sample = torch.tensor([0.6, 0.6, 0.6, 0.6], dtype=torch.float64)
    torch.testing.assert_close(to_x0(eps, x, per_sample, 0.8, "epsilon"), x0)


def test_from_diffusers_config():
    ddim = diffusers.DDIMScheduler(
        **SD, beta_schedule="scaled_linear", prediction_type="v_prediction"
    )
    sch = Schedule.from_diffusers_config(ddim.config)
    assert isinstance(sch, DiscreteVPSchedule) and sch.name == "scaled_linear"
    torch.testing.assert_close(sch.alphas_cumprod, ddim.alphas_cumprod.double(), rtol=0, atol=0)
    flow = Schedule.from_diffusers_config(diffusers.FlowMatchEulerDiscreteScheduler().config)
    assert isinstance(flow, FlowSchedule)
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        Schedule.from_diffusers_config({**ddim.config, "rescale_betas_zero_snr": True})


def test_karras_and_log_snr_grids():
    sch = get_schedule("scaled_linear")
    grid = karras_grid(sch, 8)
    assert grid[0] == 999 and grid[-2] == 0 and grid[-1] == -1 and len(grid) == 9
    s = sch.k_sigma(grid[:-1])
    rho = 7.0
    torch.testing.assert_close(
        s ** (1 / rho),
        torch.linspace(float(s[0]) ** (1 / rho), float(s[-1]) ** (1 / rho), 8, dtype=torch.float64),
    )
    lam = sch.log_snr(log_snr_grid(sch, 6, final=0.0))
    torch.testing.assert_close(lam.diff(), lam.diff().mean().expand(5))
    flow = uniform_grid(get_schedule("rectified_flow"), 4)
    assert flow.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_karras_grid_matches_diffusers_karras_sigmas():
    sched = diffusers.EulerDiscreteScheduler(
        **SD, beta_schedule="scaled_linear", use_karras_sigmas=True
    )
    sched.set_timesteps(12)
    sch = get_schedule("scaled_linear")
    ours = sch.k_sigma(karras_grid(sch, 12)[:-1])
    torch.testing.assert_close(ours, sched.sigmas[:-1].double(), rtol=1e-5, atol=0)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="scaled_linear.*rectified_flow"):
        get_schedule("cosine")
    with pytest.raises(ValueError, match="epsilon"):
        to_x0(torch.zeros(1), torch.zeros(1), 1.0, 0.5, "eps")
    with pytest.raises(ValueError, match="leading"):
        spaced_timesteps(10, spacing="even")
    with pytest.raises(ValueError, match="at least 1 step"):
        spaced_timesteps(0)
    with pytest.raises(ValueError, match="outside"):
        get_schedule("scaled_linear").alpha_sigma(1000.0)
    with pytest.raises(ValueError, match="outside"):
        get_schedule("rectified_flow").alpha_sigma(-0.1)
