"""Sampler accuracy benchmark against the exact probability-flow ODE of a Gaussian mixture.

Setup (the same for every row): SD's ``scaled_linear`` VP schedule; the exact GMM denoiser
(:mod:`retouch.analytic`, d = 64, 8 components, seed 0), given to diffusers schedulers as an
eps-prediction model; start noise ``x_T ~ N(0, I)`` at ``t = 999``; every solver stops at
``t = 0`` (``alpha_bar[0]``, the least noisy training level: DDIM ``set_alpha_to_one=False``,
``final_sigmas_type="sigma_min"``) and is scored by the RMS distance to the reference ODE
solution at ``t = 0`` (DOP853, rtol 1e-10, float64). Ending at ``t = 0`` rather than at clean
keeps a shared first-order "jump to clean" from hiding every solver's order.

Grids: ``trailing`` = diffusers' ``timestep_spacing="trailing"`` plus the final ``t = 0``
(both libraries); ``logsnr`` = retouch's grid uniform in ``lambda`` between the same ends.
NFE counts actual denoiser calls: Heun uses 2 per step (its last step ends at ``t = 0``, not at
clean, so it needs the correction too), so a budget of 5 gives Heun 4 calls.
diffusers' Euler and Heun work on ``x / alpha``; they start from ``x_T / alpha(999)`` (the same
point; their pipelines' ``init_noise_sigma`` approximates it) and end mapped back by ``alpha(0)``.
diffusers' Heun always appends a step to clean; it is driven over the grid and stopped after
the correction that lands on ``t = 0``.

**Flow form** (``flow_rows``): the same mixture under rectified flow (``alpha = 1 - t``,
``sigma = t``), every solver from pure noise ``t = 1`` to clean ``t = 0`` on a uniform grid,
scored against the reference ODE solution at ``t = 0``. RF-Solver costs 2 calls per step and
FireFlow ``steps + 1``; each is compared with Euler run at the very NFE it used
(``*_error_ratio`` = its error / Euler's).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from retouch.analytic import GaussianMixture, GMMDenoiser, reference_solution
from retouch.bench.common import (
    atomic_write_bytes,
    atomic_write_text,
    loglog_plot,
    versions,
    write_markdown_table,
    write_result,
)
from retouch.denoiser import CountedDenoiser
from retouch.grids import discrete_grid, log_snr_grid, uniform_grid
from retouch.samplers import get_step, sample
from retouch.schedules import Schedule, get_schedule

__all__ = ["run", "NFES"]

NFES = (5, 10, 20, 50)  # NFE budgets
T_START, T_END = 999.0, 0.0  # shared grid endpoints (model time)
RETOUCH_SAMPLERS = ("ddim", "euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc")
DIFFUSERS_SAMPLERS = ("ddim", "euler", "heun", "dpmpp_2m", "unipc")
FLOW_SAMPLERS = ("euler", "heun", "rf_solver", "fireflow", "dpmpp_2m")


def _steps(sampler: str, budget: int) -> int:
    if sampler in ("heun", "rf_solver"):  # 2 calls per step
        return max(1, budget // 2)
    if sampler == "fireflow":  # one call per step and one more on the first
        return max(1, budget - 1)
    return budget


def _grid(schedule: Schedule, grid: str, steps: int) -> torch.Tensor:
    if grid == "trailing":
        return discrete_grid(schedule, steps, spacing="trailing", final=T_END)
    return log_snr_grid(schedule, steps + 1, t_start=T_START, t_stop=T_END, final=T_END)


def _run_retouch(den: GMMDenoiser, x_t: torch.Tensor, sampler: str, grid: str, budget: int):
    counted = CountedDenoiser(den)
    times = _grid(den.schedule, grid, _steps(sampler, budget))
    out = sample(counted, x_t, times, step=get_step(sampler), progress=False)
    return out, counted.calls


def _diffusers_scheduler(sampler: str):
    import diffusers

    cfg = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_spacing="trailing",
    )
    if sampler == "ddim":
        return diffusers.DDIMScheduler(**cfg, clip_sample=False, set_alpha_to_one=False)
    if sampler == "euler":
        return diffusers.EulerDiscreteScheduler(**cfg, final_sigmas_type="sigma_min")
    if sampler == "heun":
        return diffusers.HeunDiscreteScheduler(**cfg)
    if sampler == "dpmpp_2m":
        return diffusers.DPMSolverMultistepScheduler(**cfg, final_sigmas_type="sigma_min")
    return diffusers.UniPCMultistepScheduler(**cfg, final_sigmas_type="sigma_min")


def _run_diffusers(den: GMMDenoiser, x_t: torch.Tensor, sampler: str, budget: int):
    sched = _diffusers_scheduler(sampler)
    steps = _steps(sampler, budget)
    alpha_0 = den.schedule.coeffs(T_END)[0]
    if sampler == "heun":
        grid = discrete_grid(den.schedule, steps, spacing="trailing", final=T_END)
        sched.set_timesteps(timesteps=grid.tolist())
        timesteps = sched.timesteps[: 2 * steps]  # drop the appended step to clean
    else:
        sched.set_timesteps(steps)
        timesteps = sched.timesteps
    ve = sampler in ("euler", "heun")
    x = x_t / den.schedule.coeffs(T_START)[0] if ve else x_t.clone()
    calls = 0
    for t in timesteps:
        model_in = sched.scale_model_input(x, t)
        eps = den.predict(model_in, float(t), kind="epsilon")
        calls += 1
        x = sched.step(eps, t, x).prev_sample
    return (x * alpha_0 if ve else x), calls


def _flow_rows(gmm: GaussianMixture, x_t: torch.Tensor) -> dict:
    """Every flow solver at every budget, Euler at each NFE another one used, orders and the
    error ratios to Euler at equal NFE (see the module doc)."""
    schedule = get_schedule("rectified_flow")
    den = GMMDenoiser(gmm, schedule)
    ref = reference_solution(gmm, schedule, x_t, 1.0, 0.0)

    def run_one(sampler: str, steps: int) -> tuple[int, float]:
        counted = CountedDenoiser(den)
        x = sample(counted, x_t, uniform_grid(schedule, steps), step=get_step(sampler),
                   progress=False)
        return counted.calls, float((x - ref).pow(2).mean().sqrt())

    rows, euler = [], {}
    for sampler in FLOW_SAMPLERS:
        for budget in NFES:
            calls, err = run_one(sampler, _steps(sampler, budget))
            rows.append({"sampler": sampler, "nfe_budget": budget, "nfe": calls, "rmse": err})
    for r in rows:
        if r["nfe"] not in euler:
            euler[r["nfe"]] = run_one("euler", r["nfe"])[1]
    ratios = {
        s: {str(r["nfe"]): r["rmse"] / euler[r["nfe"]] for r in rows if r["sampler"] == s}
        for s in ("rf_solver", "fireflow", "heun", "dpmpp_2m")
    }
    by = {}
    for r in rows:
        by.setdefault(r["sampler"], {})[r["nfe_budget"]] = (r["nfe"], r["rmse"])
    ratio_10 = {s: next(r["rmse"] / euler[r["nfe"]] for r in rows
                        if r["sampler"] == s and r["nfe_budget"] == 10)
                for s in ("rf_solver", "fireflow")}
    return {"rows": rows, "orders": {s: _order(v) for s, v in by.items()}, "ratios": ratios,
            "ratio_10": ratio_10, "euler": euler}


def _flow_markdown(flow: dict) -> str:
    table = []
    for sampler in FLOW_SAMPLERS:
        cells = {"sampler": sampler}
        for r in flow["rows"]:
            if r["sampler"] == sampler:
                note = "" if r["nfe"] == r["nfe_budget"] else f" ({r['nfe']})"
                ratio = ("" if sampler == "euler"
                         else f", ×{r['rmse'] / flow['euler'][r['nfe']]:.3g} Euler")
                cells[f"NFE {r['nfe_budget']}"] = f"{r['rmse']:.3g}{note}{ratio}"
        cells["order 10→20"] = flow["orders"][sampler]
        table.append(cells)
    cols = ["sampler", *[f"NFE {b}" for b in NFES], "order 10→20"]
    r10 = flow["ratio_10"]
    return (
        "\n## Flow form: RF-Solver and FireFlow\n\n"
        "The same mixture and start samples under rectified flow (alpha = 1 - t, sigma = t), "
        "every solver from t = 1 to clean t = 0 on a uniform grid. A number in parentheses is "
        "the actual NFE (RF-Solver and Heun: 2 calls per step, Heun 1 on its last step; "
        "FireFlow: steps + 1); ×r is the error divided by Euler's at that same NFE.\n\n"
        + write_markdown_table(table, cols)
        + f"\nAt 10 NFE: RF-Solver's error is {r10['rf_solver']:.3g} × Euler's, FireFlow's "
        f"{r10['fireflow']:.3g} × (`rf_solver_error_ratio`, `fireflow_error_ratio`).\n"
    )


def _order(by_nfe: dict[int, tuple[int, float]], a: int = 10, b: int = 20) -> float | None:
    if a not in by_nfe or b not in by_nfe:
        return None
    (n_a, e_a), (n_b, e_b) = by_nfe[a], by_nfe[b]
    return math.log(e_a / e_b) / math.log(n_b / n_a)


def run(*, quick: bool, out: Path) -> dict:
    """Run the benchmark; write ``samplers.json``, ``samplers.md`` and ``samplers.png`` in ``out``.

    ``quick`` uses 256 start samples (about 15 s on 2 cores) instead of 1024.
    Returns the JSON document ``{"rows": [...], ...}``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: more threads only add contention
    try:
        return _run(quick=quick, out=Path(out))
    finally:
        torch.set_num_threads(threads)


def _run(*, quick: bool, out: Path) -> dict:
    started = versions()  # the commit and versions this run starts from
    schedule = get_schedule("scaled_linear")
    gmm = GaussianMixture.random(dim=64, components=8, seed=0)
    den = GMMDenoiser(gmm, schedule)
    n = 256 if quick else 1024
    x_t = torch.randn(n, gmm.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = reference_solution(gmm, schedule, x_t, T_START, T_END)

    def rmse(x: torch.Tensor) -> float:
        return float((x - ref).pow(2).mean().sqrt())

    rows: list[dict] = []
    configs = [("retouch", s, g) for g in ("trailing", "logsnr") for s in RETOUCH_SAMPLERS]
    configs += [("diffusers", s, "trailing") for s in DIFFUSERS_SAMPLERS]
    for impl, sampler, grid in configs:
        for budget in NFES:
            if impl == "retouch":
                x, calls = _run_retouch(den, x_t, sampler, grid, budget)
            else:
                x, calls = _run_diffusers(den, x_t, sampler, budget)
            name = sampler if grid == "trailing" else f"{sampler}/{grid}"
            rows.append(
                {
                    "impl": impl,
                    "sampler": name,
                    "grid": grid,
                    "nfe": calls,
                    "nfe_budget": budget,
                    "rmse": rmse(x),
                }
            )
    summary = _summarise(rows)
    t = summary["targets"]
    flow = _flow_rows(gmm, x_t)
    doc = {
        "headline": {
            "best_retouch_rmse_10_nfe": t["best_retouch_10"]["rmse"],
            "best_diffusers_rmse_10_nfe": t["best_diffusers_10"]["rmse"],
            "retouch_beats_diffusers_10_nfe": t["retouch_best_le_diffusers_best"],
            "rf_solver_error_ratio": flow["ratio_10"]["rf_solver"],
            "fireflow_error_ratio": flow["ratio_10"]["fireflow"],
        },
        "rows": rows,
        "flow_rows": flow["rows"],
        "flow_orders": flow["orders"],
        "flow_error_ratios": flow["ratios"],
        "orders_10_20": summary["orders"],
        "targets": summary["targets"],
        "setup": {
            "schedule": "scaled_linear",
            "prediction": "epsilon",
            "samples": n,
            "t_start": T_START,
            "t_end": T_END,
            "gmm": {"dim": 64, "components": 8, "seed": 0},
        },
    }
    write_result(out / "samplers.json", doc, started=started)
    atomic_write_text(out / "samplers.md", _markdown(rows, summary, n) + _flow_markdown(flow))
    series = {}
    for r in rows:
        series.setdefault((r["impl"], r["sampler"]), []).append((r["nfe"], r["rmse"]))
    labels = {
        f"{impl} {s}": (s.split("/")[0], impl, grid)
        for impl, s, grid in {(r["impl"], r["sampler"], r["grid"]) for r in rows}
    }
    png = loglog_plot(
        {f"{impl} {s}": pts for (impl, s), pts in series.items()},
        colour_of={k: v[0] for k, v in labels.items()},
        dash_of={
            k: "dashed" if v[1] == "diffusers" else "solid" if v[2] == "logsnr" else "dotted"
            for k, v in labels.items()
        },
        title="RMS error vs NFE (GMM d=64, SD scaled_linear, t 999 -> 0)\n"
        "solid: retouch, log-SNR grid; dotted: retouch, trailing; dashed: diffusers, trailing",
        xlabel="NFE (denoiser calls)",
        ylabel="RMSE to reference ODE solution",
    )
    atomic_write_bytes(out / "samplers.png", png)
    return doc


def _summarise(rows: list[dict]) -> dict:
    by: dict[tuple[str, str], dict[int, tuple[int, float]]] = {}
    for r in rows:
        by.setdefault((r["impl"], r["sampler"]), {})[r["nfe_budget"]] = (r["nfe"], r["rmse"])
    orders = {f"{i} {s}": _order(v) for (i, s), v in by.items()}

    def best(impl: str) -> tuple[str, float]:
        cands = [
            (r["rmse"], r["sampler"])
            for r in rows
            if r["impl"] == impl and r["nfe"] <= 10 and r["nfe_budget"] == 10
        ]
        e, s = min(cands)
        return s, e

    (s_r, e_r), (s_d, e_d) = best("retouch"), best("diffusers")
    heun = {k: v for k, v in orders.items() if k.startswith("retouch heun")}
    targets = {
        "best_retouch_10": {"sampler": s_r, "rmse": e_r},
        "best_diffusers_10": {"sampler": s_d, "rmse": e_d},
        "retouch_best_le_diffusers_best": e_r <= e_d,
        "dpmpp_2m_order": {k: v for k, v in orders.items() if "retouch dpmpp_2m" in k},
        "heun_order": heun,
    }
    return {"orders": orders, "targets": targets}


def _markdown(rows: list[dict], summary: dict, n: int) -> str:
    table = []
    keys = sorted({(r["impl"], r["sampler"]) for r in rows}, key=lambda k: (k[1].split("/")[0], k))
    for impl, s in keys:
        cells = {"impl": impl, "sampler": s}
        for r in rows:
            if (r["impl"], r["sampler"]) == (impl, s):
                note = "" if r["nfe"] == r["nfe_budget"] else f" ({r['nfe']})"
                cells[f"NFE {r['nfe_budget']}"] = f"{r['rmse']:.3g}{note}"
        cells["order 10→20"] = summary["orders"][f"{impl} {s}"]
        table.append(cells)
    cols = ["impl", "sampler", *[f"NFE {b}" for b in NFES], "order 10→20"]
    t = summary["targets"]
    return (
        "# Sampler accuracy vs NFE\n\n"
        f"RMSE of final latents to the reference probability-flow ODE solution, {n} start "
        "samples, GMM d=64 (8 components), SD `scaled_linear` VP schedule, eps form, every "
        "solver from t=999 to t=0 (`alpha_bar[0]`). Grid `trailing` = diffusers' "
        '`timestep_spacing="trailing"` (both libraries); `/logsnr` = uniform in log-SNR, '
        "same ends. A number in parentheses is the actual NFE where it differs from the "
        "column's budget (Heun: 2 calls per step). Order = log(e10/e20)/log(nfe20/nfe10).\n\n"
        + write_markdown_table(table, cols)
        + f"\nBest at 10 NFE: retouch `{t['best_retouch_10']['sampler']}` "
        f"{t['best_retouch_10']['rmse']:.3g}; diffusers `{t['best_diffusers_10']['sampler']}` "
        f"{t['best_diffusers_10']['rmse']:.3g}. Empirical order 10→20 of retouch DPM-Solver++(2M): "
        + ", ".join(f"`{k.split()[1]}` {v:.2f}" for k, v in t["dpmpp_2m_order"].items())
        + "; Heun: "
        + ", ".join(f"`{k.split()[1]}` {v:.2f}" for k, v in t["heun_order"].items())
        + ".\n\n![error vs NFE](samplers.png)\n"
    )
