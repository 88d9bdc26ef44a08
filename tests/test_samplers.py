"""Samplers against the analytic truth (GMM), loop behaviour and bad input."""

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from retouch.analytic import GaussianMixture, GMMDenoiser, reference_solution
from retouch.denoiser import Denoiser
from retouch.grids import discrete_grid, log_snr_grid, uniform_grid
from retouch.guidance import CFGDenoiser
from retouch.samplers import (
    SAMPLERS,
    SamplerState,
    check_grid,
    ddim_step,
    euler_step,
    get_step,
    sample,
)
from retouch.schedules import get_schedule

DETERMINISTIC = ("ddim", "euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc")
FIRST_ORDER = ("ddim", "euler")


@functools.cache
def problem(schedule_name: str):
    """GMM denoiser, start noise, grid maker and reference ODE solution for one schedule."""
    gmm = GaussianMixture.random()
    sch = get_schedule(schedule_name)
    x = torch.randn(32, gmm.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    if schedule_name == "rectified_flow":
        ref = reference_solution(gmm, sch, x, 1.0, 0.0)

        def grid(n):
            return uniform_grid(sch, n)
    else:
        ref = reference_solution(gmm, sch, x, 999.0, 0.0)

        def grid(n):
            return log_snr_grid(sch, n + 1, final=0.0)

    return GMMDenoiser(gmm, sch), x, grid, ref


def rms(a: torch.Tensor) -> float:
    return float(a.pow(2).mean().sqrt())


@pytest.mark.parametrize("schedule_name", ["scaled_linear", "rectified_flow"])
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_converges_to_reference_ode(schedule_name, name):
    den, x, grid, ref = problem(schedule_name)
    errs = [
        rms(sample(den, x, grid(n), step=get_step(name), progress=False) - ref) for n in (5, 10, 50)
    ]
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < (0.03 if name in FIRST_ORDER else 0.005), errs


def test_reference_solution_is_converged():
    den, x, _, ref = problem("scaled_linear")
    tighter = reference_solution(den.gmm, den.schedule, x[:4], 999.0, 0.0, rtol=1e-12, atol=1e-12)
    assert rms(tighter - ref[:4]) < 1e-8


def test_gmm_denoiser_is_the_posterior_mean():
    """Monte-Carlo check of E[x0 | x_t] and of x = alpha x0_hat + sigma eps_hat."""
    den, *_ = problem("scaled_linear")
    g = torch.Generator().manual_seed(0)
    x0 = den.gmm.sample(20000, generator=g)
    alpha, sigma = den.schedule.coeffs(500.0)
    xt = alpha * x0 + sigma * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x0_hat = den(xt, 500.0)
    # E[x0 - x0_hat(x_t)] = 0 and the error is uncorrelated with x0_hat (orthogonality).
    assert float((x0 - x0_hat).mean(0).abs().max()) < 0.03
    eps_hat = den.predict(xt, 500.0, kind="epsilon")
    torch.testing.assert_close(alpha * x0_hat + sigma * eps_hat, xt)


@settings(max_examples=25, deadline=None)
@given(t=st.floats(1.0, 999.0), frac=st.floats(0.0, 0.99), seed=st.integers(0, 1000))
def test_euler_equals_ddim(t, frac, seed):
    den, *_ = problem("scaled_linear")
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    t_next = -1.0 + frac * (t + 1.0)
    x0_hat = den(x, t)
    state = SamplerState(times=[t, t_next])
    a = euler_step(den, x, t, t_next, x0_hat, state)
    b = ddim_step(den, x, t, t_next, x0_hat, state)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m"])
def test_inversion_round_trip_float64(name):
    den, *_ = problem("scaled_linear")
    x0 = den.gmm.sample(16, generator=torch.Generator().manual_seed(2))
    errs = []
    for n in (50, 200):
        grid = log_snr_grid(den.schedule, n + 1, final=0.0)
        step = get_step(name)
        x_T = sample(den, x0, grid.flip(0), step=step, inverse=True, progress=False)
        assert rms(x_T) > 0.9  # really reached (almost) pure noise
        errs.append(rms(sample(den, x_T, grid, step=step, progress=False) - x0))
    assert errs[1] < errs[0] and errs[1] < 0.02, errs


def test_callbacks_see_context_and_can_replace_x():
    den, x, grid, _ = problem("scaled_linear")
    seen, inputs = [], []

    class Spy:
        schedule = den.schedule

        def __call__(self, x, t):
            inputs.append(x.clone())
            return den(x, t)

    def record(ctx):
        seen.append((ctx.i, ctx.t, ctx.t_next))
        torch.testing.assert_close(
            ctx.x_prev - den.schedule.coeffs(ctx.t)[0] * ctx.x0_hat,
            den.schedule.coeffs(ctx.t)[1] * ctx.eps_hat,
        )
        return None

    def zero_after_step_1(ctx):
        return torch.zeros_like(ctx.x) if ctx.i == 1 else None

    times = grid(4)
    plain = sample(den, x, times, progress=False)
    same = sample(den, x, times, callbacks=[record], progress=False)
    torch.testing.assert_close(same, plain, rtol=0, atol=0)
    assert [s[0] for s in seen] == [0, 1, 2, 3] and seen[0][1] == times[0]
    sample(Spy(), x, times, callbacks=[zero_after_step_1], progress=False)
    assert inputs[2].abs().max() == 0 and inputs[1].abs().max() > 0


def test_stochastic_noise_is_exposed_and_replayable():
    den, x, grid, _ = problem("scaled_linear")
    times, recorded = grid(6), []
    step = get_step("ddim", eta=0.7)
    a = sample(
        den,
        x,
        times,
        step=step,
        generator=torch.Generator().manual_seed(0),
        callbacks=[lambda ctx: recorded.append(ctx.noise)],
        progress=False,
    )
    assert all(z is not None and z.shape == x.shape for z in recorded)
    b = sample(den, x, times, step=step, noises=recorded, progress=False)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = sample(den, x, times, step=step, noises=[torch.zeros_like(x)] * 6, progress=False)
    assert rms(c - a) > 1e-3  # the supplied noise is really what is injected


def test_ddpm_samples_have_the_data_moments():
    den, *_ = problem("scaled_linear")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(400, 64, generator=g, dtype=torch.float64)
    grid = discrete_grid(den.schedule, 200, spacing="trailing")  # few steps under-disperse
    out = sample(den, x, grid, step=get_step("ddpm"), generator=g, progress=False)
    data = den.gmm.sample(20000, generator=g)
    assert float((out.mean(0) - data.mean(0)).abs().max()) < 0.15
    assert abs(float((out.std(0) / data.std(0)).mean()) - 1) < 0.04


def test_heun_counts_two_calls_per_step_except_to_clean():
    den, x, _, _ = problem("scaled_linear")
    calls = []

    class Counted:
        schedule = den.schedule

        def __call__(self, x, t):
            calls.append(t)
            return den(x, t)

    sample(Counted(), x, [999.0, 500.0, 100.0, -1.0], step=get_step("heun"), progress=False)
    assert len(calls) == 5  # 2 + 2 + 1 (Euler on the step to clean)


def test_non_finite_latent_names_the_step():
    den, x, grid, _ = problem("scaled_linear")

    class Breaks:
        schedule = den.schedule
        n = 0

        def __call__(self, x, t):
            self.n += 1
            return den(x, t) * (float("nan") if self.n == 3 else 1.0)

    with pytest.raises(FloatingPointError, match="denoiser returned NaN or Inf at step 2"):
        sample(Breaks(), x, grid(5), progress=False)


def test_bad_grids_and_names_are_refused():
    den, x, _, _ = problem("scaled_linear")
    with pytest.raises(ValueError, match="at least 2 times"):
        sample(den, x, [999.0], progress=False)
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample(den, x, [999.0, 500.0, 500.0, 0.0], progress=False)
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample(den, x, [0.0, 500.0], progress=False)
    with pytest.raises(ValueError, match="strictly increasing"):
        check_grid([0.0, 500.0, 400.0], inverse=True)
    with pytest.raises(ValueError, match="non-finite"):
        check_grid([999.0, float("nan")])
    with pytest.raises(ValueError, match="ddim.*dpmpp_2m"):
        get_step("dpm++")
    with pytest.raises(ValueError, match="inversion"):
        sample(den, x, [0.0, 500.0], step=get_step("ddim", eta=1.0), inverse=True, progress=False)
    with pytest.raises(ValueError, match="noises has 1 entries"):
        sample(den, x, [999.0, 500.0, 0.0], noises=[None], progress=False)


def test_every_named_sampler_runs_with_shapes_kept():
    den, x, grid, _ = problem("rectified_flow")
    x4 = x.reshape(32, 4, 4, 4).float()
    for name in SAMPLERS:
        out = sample(
            den,
            x4,
            grid(4),
            step=get_step(name),
            progress=False,
            generator=torch.Generator().manual_seed(0),
        )
        assert out.shape == x4.shape and out.dtype == torch.float32
        assert bool(torch.isfinite(out).all())


def test_cfg_denoiser():
    den, x, _, _ = problem("scaled_linear")

    class Shifted:
        """A conditional toy denoiser: x0_hat + shift."""

        schedule = den.schedule

        def __call__(self, x, t, *, shift):
            return den(x, t) + shift

    inner = Shifted()
    assert isinstance(inner, Denoiser)
    cond, uncond = {"shift": torch.full((1, 64), 1.0)}, {"shift": torch.zeros(1, 64)}
    for batched in (True, False):
        cfg = CFGDenoiser(inner, cond=cond, uncond=uncond, scale=3.0, batched=batched)
        torch.testing.assert_close(cfg(x, 500.0), den(x, 500.0) + 3.0)
    with pytest.raises(ValueError, match="keys"):
        CFGDenoiser(inner, cond=cond, uncond={}, scale=1.0)
