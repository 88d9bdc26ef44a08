"""Fusing diffusion paths: MultiDiffusion windows, SyncDiffusion, regions, grids."""

import json

import numpy as np
import pytest
import torch

from retouch.attention import AttentionStore
from retouch.attention.regional import RegionalPrompting
from retouch.fusion import (
    Bootstrap,
    FusedDenoiser,
    Region,
    RegionLayout,
    SyncDiffusion,
    VAEFeatureDistance,
    View,
    colour_statistics,
    lpips_distance,
    split_boxes,
    window_boxes,
)
from retouch.recipes.fusion import fuse, grid_views, panorama, regions, sync_diffusion
from retouch.recipes.generate import generate
from retouch.samplers import get_step, sample
from retouch.schedules import get_schedule
from tiny_models import CONFIGS, tiny_model

PROMPT = "a red square"


class Pointwise:
    """An analytic denoiser acting pixel by pixel: any fusion of its windows is itself."""

    schedule = get_schedule("scaled_linear")
    halves = ("cond",)

    def __call__(self, x, t):
        return 0.5 * torch.tanh(x) + 1e-4 * t


# --- windows ---------------------------------------------------------------------------------


def test_window_boxes_tile_any_canvas_with_a_last_window_flush_with_the_edge():
    assert window_boxes((8, 20), (8, 8), 4) == [(0, 0), (0, 4), (0, 8), (0, 12)]
    assert window_boxes((8, 19), (8, 8), 4) == [(0, 0), (0, 4), (0, 8), (0, 11)]
    assert window_boxes((12, 8), (8, 8), 8) == [(0, 0), (4, 0)]
    with pytest.raises(ValueError, match="smaller than one"):
        window_boxes((8, 6), (8, 8), 4)
    for stride in (0, 9, 2.5):
        with pytest.raises(ValueError, match="stride"):
            window_boxes((8, 20), (8, 8), stride)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "euler", "dpmpp_2m"])
def test_overlapping_windows_of_a_pointwise_denoiser_average_to_what_each_would_give(sampler):
    inner = Pointwise()
    times = torch.linspace(900, 0, 6).tolist()
    views = [View(top, left, 4, 4, weight=torch.rand(4, 4) + 0.1)
             for top, left in window_boxes((6, 11), (4, 4), 3)]
    fused = FusedDenoiser(inner, views, canvas_hw=(6, 11), times=times)
    x = torch.randn(2, 4, 6, 11, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fused(x, times[0]), inner(x, times[0]), rtol=0, atol=1e-6)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a = sample(fused, x, times, step=get_step(sampler), progress=False, generator=gen())
    b = sample(inner, x, times, step=get_step(sampler), progress=False, generator=gen())
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


class WindowMean(Pointwise):
    """An analytic denoiser that depends on the whole window (its mean), row by row."""

    def __call__(self, x, t):
        return 0.5 * x + 0.3 * x.mean((2, 3), keepdim=True) + 1e-4 * t


def _ddim(schedule, x, t, t_next, x0):
    (a, s), (a_n, s_n) = schedule.coeffs(t), schedule.coeffs(t_next)
    return a_n * x0 + s_n * (x - a * x0) / s


def test_fusion_equals_multidiffusion_stepping_each_window_then_averaging():
    inner, times = WindowMean(), torch.linspace(900, 0, 5).tolist()
    views = [View(top, left, 4, 4, weight=torch.rand(4, 4) + 0.1)
             for top, left in window_boxes((4, 11), (4, 4), 3)]
    fused = FusedDenoiser(inner, views, canvas_hw=(4, 11), times=times)
    x = torch.randn(1, 4, 4, 11, generator=torch.Generator().manual_seed(0))
    ours = sample(fused, x, times, progress=False)
    ref = x.clone()
    for t, t_next in zip(times[:-1], times[1:], strict=True):  # Bar-Tal et al.'s eq. 5
        value, total = torch.zeros_like(ref), torch.zeros(4, 11)
        for v in views:
            crop = ref[:, :, v.box[0], v.box[1]]
            value[:, :, v.box[0], v.box[1]] += v.weight * _ddim(inner.schedule, crop, t, t_next,
                                                                 inner(crop, t))
            total[v.box] += v.weight
        ref = value / total
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_syncdiffusion_equals_shifting_and_stepping_each_view_then_averaging():
    inner, times = WindowMean(), torch.linspace(900, 0, 4).tolist()
    views = [View(0, left, 4, 4) for _, left in window_boxes((4, 10), (4, 4), 3)]
    decode = lambda z: z[:, :3]  # noqa: E731
    distance = lambda a, b: ((a - b) ** 2).mean((1, 2, 3))  # noqa: E731
    sync = SyncDiffusion(decode, distance, weight=0.5, decay=0.9, steps=2)
    fused = FusedDenoiser(inner, views, canvas_hw=(4, 10), times=times, sync=sync)
    x = torch.randn(1, 4, 4, 10, generator=torch.Generator().manual_seed(1))
    ours = sample(fused, x, times, progress=False)
    ref = x.clone()
    for i, (t, t_next) in enumerate(zip(times[:-1], times[1:], strict=True)):
        crops = [ref[:, :, v.box[0], v.box[1]] for v in views]
        anchor = decode(inner(crops[1], t)).detach()  # the middle view
        value, total = torch.zeros_like(ref), torch.zeros(4, 10)
        for k, (v, crop) in enumerate(zip(views, crops, strict=True)):
            if i < 2 and k != 1:
                z = crop.clone().requires_grad_(True)
                (g,) = torch.autograd.grad(distance(decode(inner(z, t)), anchor).sum(), z)
                crop = crop - 0.5 * 0.9**i * g
            value[:, :, v.box[0], v.box[1]] += _ddim(inner.schedule, crop, t, t_next,
                                                     inner(crop, t))
            total[v.box] += 1
        ref = (value / total).detach()
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 0.25])  # a mask scaled as a fusion weight bootstraps alike
def test_bootstrapping_shows_a_noised_constant_colour_outside_the_mask_in_early_steps(scale):
    seen = []

    class Recorder(Pointwise):
        def __call__(self, x, t):
            seen.append(x.clone())
            return super().__call__(x, t)

    times = torch.linspace(900, 0, 5).tolist()
    mask = torch.zeros(4, 4)
    mask[:, :2] = 1
    colours = torch.full((1, 4, 4, 4), 0.7)
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    boot = Bootstrap(2, colours, noise)
    fused = FusedDenoiser(Recorder(), [View(0, 0, 4, 4, weight=scale * mask, bootstrap=True),
                                       View(0, 0, 4, 4, weight=1 - mask)],
                          canvas_hw=(4, 4), times=times, bootstrap=boot)
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    sample(fused, x, times, progress=False)
    for i, t in enumerate(times[:-1]):
        a, s = fused.schedule.coeffs(t)
        region, background = seen[i][0], seen[i][1]
        if i < 2:
            torch.testing.assert_close(region[:, :, 2:], a * 0.7 + s * noise[0, :, :, 2:])
        else:
            torch.testing.assert_close(region[:, :, 2:], background[:, :, 2:])
        torch.testing.assert_close(region[:, :, :2], background[:, :, :2])  # inside: the canvas


def test_uncovered_pixels_and_views_outside_the_canvas_are_refused():
    inner = Pointwise()
    with pytest.raises(ValueError, match="covered by no view"):
        FusedDenoiser(inner, [View(0, 0, 4, 4)], canvas_hw=(4, 8), times=[1, 0])
    with pytest.raises(ValueError, match="outside"):
        FusedDenoiser(inner, [View(0, 6, 4, 4)], canvas_hw=(4, 8), times=[1, 0])


# --- MultiDiffusion on the models -----------------------------------------------------------


@pytest.mark.parametrize("kind", CONFIGS)
def test_a_canvas_of_exactly_one_window_is_plain_generation(kind):
    model = tiny_model(kind)
    a = generate(model, PROMPT, steps=3, cfg=5.0, seed=2, progress=False)[0]
    b = panorama(model, PROMPT, width=model.image_size, steps=3, cfg=5.0, seed=2)
    assert np.array_equal(a, b)


def test_identical_windows_with_one_prompt_give_what_one_window_gives():
    model = tiny_model("sd1")
    one = fuse(model, [PROMPT], [View(0, 0, 8, 8)], (8, 8), steps=3, output="latent")
    three = fuse(model, [PROMPT], [View(0, 0, 8, 8)] * 3, (8, 8), steps=3, output="latent")
    # equal up to the round-off of a batch of 3 rows against 1 (other CPU kernels)
    torch.testing.assert_close(three, one, rtol=0, atol=1e-4)


def test_panoramas_run_with_any_sampler_and_with_controllers_on_the_windows():
    model = tiny_model("sd1")
    for sampler in ("dpmpp_2m", "ddpm", "rf_solver", "fireflow"):  # the last two: midpoints
        image = panorama(model, PROMPT, width=40, stride=4, steps=3, sampler=sampler)
        assert image.shape == (16, 40, 3)
    store = AttentionStore()
    panorama(model, PROMPT, width=32, stride=4, steps=3, controllers=[store])
    assert store.cross().shape[0] == len(window_boxes((8, 16), (8, 8), 4))  # one row a window


def test_grid_views_tile_one_canvas():
    model = tiny_model("sd1")
    views = grid_views(model, PROMPT, grid=(2, 3), steps=2)
    assert views.shape == (6, 16, 16, 3)


# --- SyncDiffusion --------------------------------------------------------------------------


def _fused_sample(model, sync, canvas=(8, 16), steps=3):
    views = [View(top, left, 8, 8) for top, left in window_boxes(canvas, (8, 8), 4)]
    times = model.time_grid(steps)
    den = model.denoiser([PROMPT] * len(views), cfg=5.0)
    fused = FusedDenoiser(den, views, canvas_hw=canvas, times=times, sync=sync)
    x = torch.randn(1, 4, *canvas, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return sample(fused, x, times, progress=False)


def test_syncdiffusion_with_weight_zero_is_multidiffusion():
    model = tiny_model("sd1")
    sync = sync_diffusion(model, weight=0.0, steps=3)
    torch.testing.assert_close(_fused_sample(model, sync), _fused_sample(model, None),
                               rtol=0, atol=1e-5)
    assert len(sync.losses) == 3  # the gradient pass ran at every synchronised step


def test_the_syncdiffusion_step_lowers_the_distance_to_the_anchor_and_keeps_the_anchor():
    model = tiny_model("sd1")
    views = [View(top, left, 8, 8) for top, left in window_boxes((8, 16), (8, 8), 4)]
    times = model.time_grid(4)
    fused = FusedDenoiser(model.denoiser([PROMPT] * 3, cfg=5.0), views, canvas_hw=(8, 16),
                          times=times)
    crops = fused.crops(torch.randn(1, 4, 8, 16, generator=torch.Generator().manual_seed(1)))
    dist = VAEFeatureDistance(model.vae)

    def loss(c):
        with torch.no_grad():
            images = model.decode_tensor(fused._inner(c, float(times[1]), 1))
            return float(dist(images, images[1:2].repeat(3, 1, 1, 1)).sum())

    sync = SyncDiffusion(model.decode_tensor, dist, weight=1e-3, decay=1.0, steps=4)
    shifted = sync.shift(fused, crops, float(times[1]), 1, 1)
    assert torch.equal(shifted[1], crops[1])  # the middle view is the anchor
    assert loss(shifted) < loss(crops)


def test_the_colour_distance_reads_colours_not_layout():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    shuffled = a.flatten(2)[:, :, torch.randperm(256, generator=g)].reshape(a.shape)
    torch.testing.assert_close(colour_statistics(a, shuffled), torch.zeros(2), atol=1e-6, rtol=0)
    red, blue = torch.full((1, 3, 8, 8), -1.0), torch.full((1, 3, 8, 8), -1.0)
    red[:, 0], blue[:, 2] = 1.0, 1.0
    assert float(colour_statistics(red, blue)[0]) == pytest.approx(8.0)  # two means differ by 2
    model = tiny_model("sd1")
    torch.testing.assert_close(  # as SyncDiffusion's distance by name, it changes the panorama
        _fused_sample(model, sync_diffusion(model, distance="colour", weight=0.0)),
        _fused_sample(model, None), rtol=0, atol=1e-5)
    assert not torch.allclose(_fused_sample(model, sync_diffusion(model, distance="colour",
                                                                  weight=50.0)),
                              _fused_sample(model, None), atol=1e-4)


def test_syncdiffusion_refuses_samplers_that_cannot_renoise_and_bad_settings():
    model = tiny_model("sd1")
    with pytest.raises(ValueError, match="ddim or ddpm"):
        panorama(model, PROMPT, width=32, sync=sync_diffusion(model), sampler="euler", steps=2)
    with pytest.raises(ValueError, match="weight"):
        sync_diffusion(model, weight=float("nan"))
    with pytest.raises(ValueError, match="distance"):
        sync_diffusion(model, distance="dino")


def test_lpips_says_which_weights_it_needs_and_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises((ValueError, FileNotFoundError), match="lpips|vgg16-397923af.pth"):
        lpips_distance("vgg")


# --- regions --------------------------------------------------------------------------------


def test_rpg_splits_give_complementary_boxes_in_reading_order():
    assert split_boxes("1,1") == [(0, 0, 0.5, 1), (0.5, 0, 1, 1)]  # no ";": columns
    assert split_boxes("1,1,2") == [(0, 0, 0.25, 1), (0.25, 0, 0.5, 1), (0.5, 0, 1, 1)]
    assert split_boxes("1;3") == [(0, 0, 1, 0.25), (0, 0.25, 1, 1)]  # rows of one region
    boxes = split_boxes("1,1,1;1,2,1,1")  # a row of 2 regions over a row of 3
    assert len(boxes) == 5 and boxes[2] == (0, 0.5, 0.5, 1)
    # float ratios still end exactly at the canvas edge (a valid layout)
    edges = split_boxes("0.18,1.74,2.73,1.63;2.06,0.13,1.92,1.84")
    assert max(b[2] for b in edges) == 1.0 and max(b[3] for b in edges) == 1.0
    RegionLayout(32, 16, tuple(Region(PROMPT, b) for b in edges))
    for bad in ("", "1,a", "1,-1", "1;;1"):
        with pytest.raises(ValueError):
            split_boxes(bad)


def _layout(**kw):
    return RegionLayout.from_dict({"width": 32, "height": 16, "split": "1,1",
                                   "prompts": [PROMPT, "a blue circle"], **kw})


def test_a_region_covering_the_canvas_is_the_plain_panorama_even_when_bootstrapped():
    model = tiny_model("sd1")
    whole = RegionLayout.from_dict({"width": 32, "height": 16,
                                    "regions": [{"prompt": PROMPT, "box": [0, 0, 1, 1]}]})
    a = regions(model, whole, stride=4, steps=3, bootstrap=1.0, output="latent")
    b = panorama(model, PROMPT, width=32, stride=4, steps=3, output="latent")
    assert torch.equal(a, b)


def test_regional_prompting_with_the_base_prompt_everywhere_changes_nothing():
    model = tiny_model("sd1")
    same = RegionLayout.from_dict({"width": 32, "height": 16, "split": "1,1",
                                   "prompts": [PROMPT, PROMPT], "base": PROMPT})
    a = regions(model, same, method="regional", stride=4, steps=3, output="latent")
    b = panorama(model, PROMPT, width=32, stride=4, steps=3, output="latent")
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    other = RegionLayout.from_dict({"width": 32, "height": 16, "split": "1,1",
                                    "prompts": ["a blue circle", PROMPT], "base": PROMPT})
    c = regions(model, other, method="regional", stride=4, steps=3, output="latent")
    assert not torch.allclose(c, b, atol=1e-3)  # a sub-prompt acts
    assert regions(model, _layout(), steps=2).shape == (16, 32, 3)
    half = RegionLayout.from_dict({"width": 32, "height": 16, "base": PROMPT, "base_ratio": 1.0,
                                   "regions": [{"prompt": "a blue circle", "box": [0, 0, .5, 1]}]})
    d = regions(model, half, method="regional", stride=4, steps=3, output="latent")
    torch.testing.assert_close(d, b, rtol=0, atol=1e-5)  # base ratio 1: the base alone


def test_regional_prompting_over_the_whole_canvas_with_no_base_is_its_sub_prompt():
    """SD1 reads text only through cross-attention: a region covering everything, at base
    ratio 0, is generation under the region's prompt (the unconditional half untouched)."""
    model = tiny_model("sd1")
    whole = RegionLayout.from_dict({"width": 16, "height": 16, "base": PROMPT, "base_ratio": 0.0,
                                    "regions": [{"prompt": "a blue circle", "box": [0, 0, 1, 1]}]})
    a = regions(model, whole, method="regional", steps=3, output="latent")
    b = panorama(model, "a blue circle", width=16, steps=3, output="latent")
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_regional_prompting_puts_its_windows_side_by_side_by_default():
    model = tiny_model("sd1")
    layout = RegionLayout.from_dict({"width": 32, "height": 16, "split": "1,1", "base": PROMPT,
                                     "prompts": ["a blue circle", PROMPT]})
    window = model.latent_shape(1)[-1]
    a = regions(model, layout, method="regional", steps=3, output="latent")
    b = regions(model, layout, method="regional", stride=window, steps=3, output="latent")
    assert torch.equal(a, b)


def test_the_fusion_benchmark_runs_one_part_alone_and_refuses_unknown_parts(
        tiny_toy_pipeline, tmp_path):
    from retouch.bench import fusion as bench

    doc = bench.run(quick=True, out=tmp_path, model=str(tiny_toy_pipeline), parts=("regions",))
    assert set(doc["headline"]) == {"region_adherence_multidiffusion",
                                    "region_adherence_regional"}
    assert json.loads((tmp_path / "fusion.json").read_text())["parts"] == ["regions"]
    assert "parts run: regions" in (tmp_path / "fusion.md").read_text()
    assert (tmp_path / "fusion_regions.png").exists() and not (tmp_path / "fusion.png").exists()
    with pytest.raises(ValueError, match="unknown fusion benchmark part.*seams.*valid: cost"):
        bench.run(quick=True, out=tmp_path / "x", model=str(tiny_toy_pipeline), parts=("seams",))
    assert not (tmp_path / "x").exists()


def test_splitting_the_windows_over_several_calls_changes_nothing():
    model = tiny_model("sd1")
    a = panorama(model, PROMPT, width=40, stride=4, steps=3, output="latent",
                 sync=sync_diffusion(model, weight=0.5, steps=2))
    b = panorama(model, PROMPT, width=40, stride=4, steps=3, output="latent", views_per_call=2,
                 sync=sync_diffusion(model, weight=0.5, steps=2))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="one model call"):
        panorama(model, PROMPT, width=40, stride=4, steps=2, views_per_call=2,
                 controllers=[AttentionStore()])


def test_regional_prompting_acts_only_inside_regions_and_on_the_conditional_half():
    model = tiny_model("sd1")
    embeds = model.encode(["a blue circle"]).embeds
    masks = torch.zeros(1, 1, 8, 8)
    ctrl = RegionalPrompting(embeds, masks, base_ratio=0.0)  # a region covering nothing
    b = panorama(model, PROMPT, width=16, steps=2, output="latent")
    a = panorama(model, PROMPT, width=16, steps=2, output="latent", controllers=[ctrl])
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_bad_layouts_are_refused_with_the_rule(tmp_path):
    with pytest.raises(ValueError, match="unknown key"):
        _layout(colour="red")
    with pytest.raises(ValueError, match="2 regions"):
        RegionLayout.from_dict({"width": 32, "height": 16, "split": "1,1", "prompts": ["a"]})
    with pytest.raises(ValueError, match="outside the canvas"):
        RegionLayout.from_dict({"width": 32, "height": 16,
                                "regions": [{"prompt": PROMPT, "box": [0.5, 0, 1.2, 1]}]})
    tiny = RegionLayout.from_dict({"width": 32, "height": 16,
                                   "regions": [{"prompt": PROMPT, "box": [0, 0, 0.01, 0.01]}]})
    with pytest.raises(ValueError, match="covers no latent pixel"):
        tiny.masks((8, 16))
    model = tiny_model("sd1")
    part = RegionLayout.from_dict({"width": 32, "height": 16,
                                   "regions": [{"prompt": PROMPT, "box": [0, 0, 0.5, 1]}]})
    with pytest.raises(ValueError, match="background prompt"):
        regions(model, part, steps=2)
    with pytest.raises(ValueError, match="base"):
        regions(model, _layout(), method="regional", steps=2)
    bad = tmp_path / "layout.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="layout"):
        RegionLayout.read(bad)
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="JSON object"):
        RegionLayout.read(bad)


def test_bad_canvases_are_refused_before_any_work():
    model = tiny_model("sd1")
    with pytest.raises(ValueError, match="smaller than one"):
        panorama(model, PROMPT, width=8)
    with pytest.raises(ValueError, match="multiple of 2"):
        panorama(model, PROMPT, width=33)
    with pytest.raises(ValueError, match="stride"):
        panorama(model, PROMPT, width=32, stride=0)
    with pytest.raises(ValueError, match="stride"):
        panorama(model, PROMPT, width=32, stride=9)


# --- command line ---------------------------------------------------------------------------


def test_panorama_and_regions_cli_write_their_images(tiny_toy_pipeline, tmp_path, capsys):
    from PIL import Image

    from retouch.cli import main

    model = ["--model", str(tiny_toy_pipeline), "--steps", "2"]
    out = tmp_path / "pano"
    assert main(["panorama", "a red circle", "--width", "128", "--sync", "--sync-steps", "1",
                 *model, "--out", str(out)]) == 0
    assert Image.open(out / "panorama.png").size == (128, 64)
    report = json.loads((out / "panorama.json").read_text())
    assert report["sync"] and len(report["sync_losses"]) == 1
    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps({
        "width": 128, "height": 64, "split": "1,1", "prompts": ["a red circle",
                                                                 "a blue square"],
        "base": "a red circle and a blue square"}))
    for method in ("multidiffusion", "regional"):
        folder = tmp_path / method
        assert main(["regions", str(layout), "--method", method, *model,
                     "--out", str(folder)]) == 0
        assert Image.open(folder / "regions.png").size == (128, 64)
    capsys.readouterr()
    for argv, text in (
        (["panorama", "a red circle", "--width", "60"], "smaller than one 64x64 window"),
        (["panorama", "a red circle", "--width", "128", "--stride", "17"], "stride 17"),
        (["panorama", "a red circle", "--width", "128", "--distance", "vae"], "add --sync"),
        (["regions", str(tmp_path / "missing.json")], "missing.json"),
        (["regions", str(layout), "--coverage-power", "-1"], "--coverage-power must be at least"),
    ):
        assert main([*argv, *model, "--out", str(tmp_path / "no")]) == 2
        assert text in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


def test_shared_anchor_attention_leaves_the_anchor_window_as_it_was():
    """With one window the anchor is the whole canvas: sharing with itself changes nothing."""
    model = tiny_model("sd1")
    a = panorama(model, PROMPT, width=16, steps=2, share_anchor=True, output="latent")
    b = panorama(model, PROMPT, width=16, steps=2, output="latent")
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)  # to float round-off (two key copies)
    c = panorama(model, PROMPT, width=32, stride=4, steps=2, share_anchor=True, output="latent")
    d = panorama(model, PROMPT, width=32, stride=4, steps=2, output="latent")
    assert not torch.allclose(c, d, atol=1e-4)


def test_a_panorama_edit_with_identical_prompts_changes_nothing_and_a_swap_edits():
    from retouch.recipes.fusion import panorama_edit

    model = tiny_model("sd1")
    plain = panorama(model, PROMPT, width=32, stride=4, steps=3, output="latent")
    same = panorama_edit(model, PROMPT, PROMPT, width=32, stride=4, steps=3, output="latent")
    torch.testing.assert_close(same[0:1], plain, rtol=0, atol=1e-4)  # the source is as alone
    torch.testing.assert_close(same[1:2], same[0:1], rtol=0, atol=1e-5)
    swap = panorama_edit(model, PROMPT, "a blue square", width=32, stride=4, steps=3,
                         output="latent")
    torch.testing.assert_close(swap[0:1], plain, rtol=0, atol=1e-4)
    assert not torch.allclose(swap[1], swap[0], atol=1e-3)
    with pytest.raises(ValueError, match="local blending"):
        panorama_edit(model, PROMPT, "a blue square", width=32, p2p={"blend_words": "changed"})


def test_mcnemars_exact_test_is_the_two_sided_binomial_test_of_the_discordant_pairs():
    from scipy.stats import binomtest

    from retouch.bench.common import mcnemar_p, paired_counts

    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(5, 0) == pytest.approx(2 / 32)  # 2 * P(X <= 0), X ~ Bin(5, 1/2)
    for only_a in range(0, 12, 3):
        for only_b in range(1, 12, 2):
            want = binomtest(only_a, only_a + only_b, 0.5).pvalue
            assert mcnemar_p(only_a, only_b) == pytest.approx(want)
            assert mcnemar_p(only_b, only_a) == pytest.approx(want)
    counts = paired_counts([1.0, 1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0, 0.0],
                           names=("a_only", "b_only"))
    assert counts == {"a_only": 2, "b_only": 1, "both": 1, "neither": 1,
                      "p": mcnemar_p(2, 1)}


def test_region_windows_weigh_the_share_of_the_window_their_region_fills(monkeypatch):
    from retouch.recipes import fusion as recipe

    model = tiny_model("sd1")  # 8x8 latent windows
    layout = RegionLayout.from_dict({"width": 64, "height": 32, "split": "1,1",
                                     "prompts": [PROMPT, "a blue square"]})
    seen = {}
    monkeypatch.setattr(recipe, "fuse", lambda model, prompts, views, canvas, **kw: seen.update(
        views=views))
    for power in (0.0, 2.0):
        recipe.regions(model, layout, stride=4, coverage_power=power)
        for v in seen["views"]:  # windows at 0, 4, 8 over a canvas of two 8-pixel regions
            share = float((v.weight > 0).float().mean())
            assert set(v.weight.unique().tolist()) <= {0.0, share ** power}
        assert {round(float((v.weight > 0).float().mean()), 2) for v in seen["views"]} == {
            1.0, 0.5}
    with pytest.raises(ValueError, match="coverage_power must be at least 0"):
        recipe.regions(model, layout, coverage_power=-1)
