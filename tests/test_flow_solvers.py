"""RF-Solver and FireFlow: sampling and inversion against the exact flow ODE of a Gaussian
mixture, their network-call counts, and attention control on their midpoint calls."""

import functools
import math

import pytest
import torch

from retouch.analytic import GaussianMixture, GMMDenoiser, reference_solution
from retouch.attention.session import ControlledDenoiser
from retouch.denoiser import CountedDenoiser
from retouch.grids import uniform_grid
from retouch.inversion import invert, reconstruct
from retouch.samplers import (
    FireFlowStep,
    SamplerState,
    flow_view,
    get_step,
    sample,
    time_at_tau,
)
from retouch.schedules import get_schedule


@functools.cache
def flow_problem():
    schedule = get_schedule("rectified_flow")
    gmm = GaussianMixture.random(dim=16, components=4)
    x = torch.randn(32, gmm.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return GMMDenoiser(gmm, schedule), x, reference_solution(gmm, schedule, x, 1.0, 0.0)


def rms(a: torch.Tensor) -> float:
    return float(a.pow(2).mean().sqrt())


def run(name: str, steps: int) -> tuple[int, float]:
    den, x, ref = flow_problem()
    counted = CountedDenoiser(den)
    out = sample(counted, x, uniform_grid(den.schedule, steps), step=get_step(name),
                 progress=False)
    return counted.calls, rms(out - ref)


@pytest.mark.parametrize("name", ["rf_solver", "fireflow"])
def test_second_order_and_better_than_euler_at_equal_nfe(name):
    (n10, e10), (n40, e40) = run(name, 10), run(name, 40)
    order = math.log(e10 / e40) / math.log(n40 / n10)
    assert order > 1.5, (e10, e40, order)  # Euler's is 1
    for steps in (5, 10, 20):
        calls, err = run(name, steps)
        assert err < 0.5 * run("euler", calls)[1]


def test_network_calls_per_step():
    assert run("rf_solver", 7)[0] == 14  # a midpoint call per step
    assert run("fireflow", 7)[0] == 8  # the midpoint velocity is reused: one more, on step 0


def test_fireflow_predicts_the_reused_velocity():
    den, x, _ = flow_problem()
    step, state_times = FireFlowStep(), uniform_grid(den.schedule, 4).tolist()
    state = SamplerState(times=state_times)
    t, t_next = state_times[0], state_times[1]
    x_next = step(den, x, t, t_next, step.predict(den, x, t, state), state)
    reused_t, v_m = state.scratch["fireflow.velocity"]
    assert reused_t == t_next
    # Without a model call, predict's x0_hat implies exactly the stored velocity at (x', t').
    counted = CountedDenoiser(den)
    x0 = step.predict(counted, x_next, t_next, state)
    assert counted.calls == 0
    c, tau = flow_view(den.schedule, t_next)
    torch.testing.assert_close((x_next / c - x0) / tau, v_m)
    # A start that is not the last step's end asks the model.
    step.predict(counted, x_next, state_times[2], state)
    assert counted.calls == 1


@pytest.mark.parametrize("method", ["rf_solver", "fireflow"])
def test_flow_inversions_converge_at_second_order(method):
    den, _, _ = flow_problem()
    x0 = den.gmm.sample(8, generator=torch.Generator().manual_seed(3))
    truth = reference_solution(den.gmm, den.schedule, x0, 0.0, 1.0)
    errors, rec, euler = [], [], []
    for n in (10, 40):
        times = uniform_grid(den.schedule, n)
        inv = invert(den, x0, method=method, times=times, progress=False)
        assert inv.nfe == (2 * n if method == "rf_solver" else n + 1)
        errors.append(rms(inv.latent - truth))
        rec.append(rms(reconstruct(inv, den, progress=False) - x0))
        euler.append(rms(invert(den, x0, method="ddim", times=times, progress=False).latent
                         - truth))
    assert errors[1] < errors[0] / 8 and rec[1] < rec[0] / 8, (errors, rec)  # order > 1.5
    assert errors[0] < euler[0] / 3, (errors, euler)  # far better than Euler (ddim) inversion


def test_time_at_tau_inverts_the_flow_view():
    for name, t in (("rectified_flow", 0.3), ("scaled_linear", 420.0)):
        schedule = get_schedule(name)
        assert time_at_tau(schedule, flow_view(schedule, t)[1]) == pytest.approx(t, rel=1e-6)


def test_midpoint_calls_are_reported_as_the_step_they_lie_in():
    den, _, _ = flow_problem()
    times = [1.0, 0.5, 0.0]
    controlled = ControlledDenoiser(den, None, times)  # step_of needs no session
    assert [controlled.step_of(t) for t in (1.0, 0.75, 0.5, 0.25)] == [0, 0, 1, 1]
    inverse = ControlledDenoiser(den, None, [0.0, 0.5, 1.0])
    assert inverse.step_of(0.25) == 0
    with pytest.raises(ValueError, match="not on this session's time grid"):
        controlled.step_of(1.5)


def test_flowedit_identity_and_edit():
    from retouch.recipes.flowedit import flowedit
    from tiny_models import tiny_model

    m = tiny_model("sd1")
    z = torch.randn(m.latent_shape(1), generator=torch.Generator().manual_seed(0))
    same = flowedit(m, z, "a red square", "a red square", steps=6, cfg=3.0)
    assert torch.equal(same.latents[1], same.latents[0])  # the velocities cancel exactly
    edit = flowedit(m, z, "a red square", "a blue square", steps=6, cfg=3.0, averages=2)
    assert torch.equal(edit.latents[0], z[0]) and edit.edited.shape == (16, 16, 3)
    assert float((edit.latents[1] - z).abs().max()) > 1e-3
    assert torch.equal(flowedit(m, z, "a red square", "a blue square", steps=6,
                                strength=0.0).latents[1], z[0])
    with pytest.raises(ValueError, match="strength"):
        flowedit(m, z, "a red square", "a blue square", strength=1.5)
    with pytest.raises(ValueError, match=r"final_steps=6 must be in \[0, 5\]"):
        flowedit(m, z, "a red square", "a blue square", steps=6, final_steps=6)
    with pytest.raises(ValueError, match="final_steps must be a whole number, got 1.5"):
        flowedit(m, z, "a red square", "a blue square", steps=6, final_steps=1.5)


def test_flowedit_final_steps_are_plain_target_sampling():
    """``final_steps`` = every step run: SDEdit in the flow view (noise the image to the first
    time with the edit's first draw, then Euler on the target velocity)."""
    from retouch.recipes.flowedit import flowedit
    from retouch.samplers import flow_view
    from retouch.samplers.flow import flow_velocity
    from tiny_models import tiny_model

    m = tiny_model("sd1")
    z = torch.randn(m.latent_shape(1), generator=torch.Generator().manual_seed(0))
    steps, strength = 6, 0.7  # runs 4 steps
    edit = flowedit(m, z, "a red square", "a blue square", steps=steps, strength=strength,
                    cfg=3.0, final_steps=4, seed=5)
    times = [float(t) for t in m.time_grid(steps)][steps - 4:]
    tar = m.denoiser(["a blue square"], cfg=3.0)
    c_clean, _ = flow_view(m.schedule, times[-1])
    x = z / c_clean
    _, tau = flow_view(m.schedule, times[0])
    w = (1 - tau) * x + tau * torch.randn(z.shape, generator=torch.Generator().manual_seed(5))
    for t, t_next in zip(times[:-1], times[1:], strict=True):
        w = w + (flow_view(m.schedule, t_next)[1] - flow_view(m.schedule, t)[1]) * (
            flow_velocity(tar, w, t))
    torch.testing.assert_close(edit.latents[1:], c_clean * w, rtol=1e-5, atol=1e-5)
    mixed = flowedit(m, z, "a red square", "a blue square", steps=steps, strength=strength,
                     cfg=3.0, final_steps=1, seed=5)
    plain = flowedit(m, z, "a red square", "a blue square", steps=steps, strength=strength,
                     cfg=3.0, seed=5)
    assert not torch.allclose(mixed.latents[1], plain.latents[1])


def test_loss_guidance_leaves_the_pure_noise_call_of_a_flow_model_unguided():
    from retouch.guidance import LossGuidance

    den, x, _ = flow_problem()
    guided = LossGuidance(den, lambda x0, x_t, t: x0.pow(2).sum(), scale=10.0)
    assert torch.equal(guided(x, 1.0), den(x, 1.0))  # alpha = 0: no guided x0 exists
    assert not torch.allclose(guided(x, 0.5), den(x, 0.5))


def test_review_refusals():
    """A FlowEdit that would run no step, an unknown places string, and a bench refusal type."""
    from retouch.inversion.core import MethodRefused
    from retouch.recipes.editors import rf_solver_editor
    from retouch.recipes.flowedit import flowedit
    from tiny_models import tiny_model

    m = tiny_model("sd1")
    z = torch.randn(m.latent_shape(1), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="runs no step"):
        flowedit(m, z, "a red square", "a blue square", steps=4, strength=0.1)
    assert rf_solver_editor(None, "a", "b", places="up")[0].places == ("up",)
    with pytest.raises(ValueError, match="places must name"):
        rf_solver_editor(None, "a", "b", places="left")
    assert issubclass(MethodRefused, ValueError)


def test_rf_inversion_is_euler_without_its_pulls_and_holds_the_image_with_them():
    den, _, _ = flow_problem()
    x0 = den.gmm.sample(8, generator=torch.Generator().manual_seed(3))
    times = uniform_grid(den.schedule, 10)
    plain = invert(den, x0, method="rf_inversion", times=times, progress=False,
                   config={"gamma": 0.0, "eta": 0.0})
    # gamma = 0: forward Euler on the velocity (at the step's start; off the clean time, at
    # its end, where the start's velocity cannot be read from x0_hat)
    from retouch.samplers.flow import flow_velocity

    ts, z = times.tolist()[::-1], x0
    for k, (t, t_next) in enumerate(zip(ts[:-1], ts[1:], strict=True)):
        z = z + (t_next - t) * flow_velocity(den, z, t_next if k == 0 else t)
    torch.testing.assert_close(plain.latent, z, rtol=1e-12, atol=1e-12)
    assert plain.nfe == 10
    # The pull to the image: eta = 1 over every step lands on it exactly, whatever the
    # inversion (x0_hat := y0 makes each Euler step a straight line to y0); a pull in the
    # first half of the steps brings the reconstruction closer than none.
    def rec(**options):
        inv = invert(den, x0, method="rf_inversion", times=times, progress=False,
                     config=options)
        return rms(reconstruct(inv, den, progress=False) - x0)

    assert rec(eta=1.0, eta_end=1.0) < 1e-12
    assert rec(eta=0.9, eta_end=0.5) < rec(eta=0.0)
    with pytest.raises(ValueError, match="0 <= gamma <= 1"):
        invert(den, x0, method="rf_inversion", times=times, config={"gamma": 2.0})
