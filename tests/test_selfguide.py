"""Self-guidance: properties read back from hand-built maps, the recorder, the energy's rows,
zero weights reproducing the unguided edit exactly, composition, and bad input."""

import math

import numpy as np
import pytest
import torch

from retouch.attention import BatchLayout, attention_control
from retouch.attention.properties import (
    SHAPE_SHARPNESS,
    PropertyRecorder,
    appearance,
    centroid,
    scale_about,
    shape,
    size,
    transform,
    translate,
)
from retouch.guidance import LossGuidance
from retouch.recipes.edit import edit, edit_generated
from retouch.recipes.guide import (
    GuideWeights,
    SelfGuidance,
    donor_looks,
    guide,
    guide_generated,
)
from tiny_models import tiny_model, tiny_model_f64

STEPS = 4
OFF = GuideWeights(centroid=0, size=0, shape=0, keep=0, appearance=0)


def test_centroid_of_a_point_and_of_a_symmetric_map():
    a = torch.zeros(8, 16)
    a[3, 10] = 0.7
    torch.testing.assert_close(centroid(a), torch.tensor([10.5 / 16, 3.5 / 8]), rtol=0,
                               atol=1e-7)
    b = torch.zeros(8, 8)
    b[2, 1] = b[2, 5] = 1.0  # two cells: the centroid is half way, in cell-centre units
    torch.testing.assert_close(centroid(b), torch.tensor([3.5 / 8, 2.5 / 8]), rtol=0, atol=1e-7)
    torch.testing.assert_close(centroid(torch.ones(2, 4, 4)), torch.full((2, 2), 0.5))


def test_size_is_the_mean_of_the_map():
    a = torch.zeros(8, 8)
    a[2:5, 1:3] = 1.0  # six cells of 64
    assert size(a).item() == pytest.approx(6 / 64, abs=1e-7)
    assert size(0.5 * a).item() == pytest.approx(3 / 64, abs=1e-7)


def test_shape_is_the_soft_threshold_of_the_normalised_map():
    a = torch.zeros(4, 4)
    a[1:3, 1:3] = 0.2  # normalised: 1 inside, 0 outside
    s = shape(a)
    inside, outside = 1 / (1 + math.exp(-SHAPE_SHARPNESS * 0.5)), 1 / (1 + math.exp(
        SHAPE_SHARPNESS * 0.5))
    assert torch.allclose(s[1:3, 1:3], torch.tensor(inside))
    assert torch.allclose(s[0], torch.tensor(outside))
    torch.testing.assert_close(shape(3.0 * a + 1.0), s)  # invariant to scale and offset


def test_appearance_is_the_weighted_mean_of_the_activations():
    feats = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    mask = torch.zeros(1, 4, 4)
    mask[0, 0, :2] = 1.0  # cells (0, 0) and (0, 1)
    torch.testing.assert_close(appearance(mask, feats), torch.tensor([[0.5, 16.5]]))


def test_translate_by_whole_cells_and_scale_by_one():
    a = torch.rand(8, 8)
    moved = translate(a, (2 / 8, -1 / 8))  # two cells right, one up
    want = torch.zeros(8, 8)
    want[:7, 2:] = a[1:, :6]
    torch.testing.assert_close(moved, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(scale_about(a, 1.0, (0.3, 0.6)), a, rtol=0, atol=1e-6)
    blob = torch.zeros(16, 16)
    blob[4:8, 9:13] = 1.0  # off centre: x in [9, 13), y in [4, 8) cells
    c = tuple(centroid(blob).tolist())
    grown = scale_about(blob, 2.0, c)
    assert size(grown).item() == pytest.approx(4 * size(blob).item(), rel=0.05)
    torch.testing.assert_close(centroid(grown), centroid(blob), rtol=0, atol=1e-5)
    torch.testing.assert_close(transform(blob, offset=(0.25, 0.125), factor=2.0, center=c),
                               translate(grown, (0.25, 0.125)))


def test_recorder_keeps_maps_with_gradients_only_in_guided_calls():
    m = tiny_model("sd1")
    rec = PropertyRecorder(feature_module="up_blocks.2")
    layout = BatchLayout(("source", "target"))
    x = torch.randn(2, 4, 8, 8)
    cond = m.encode(["a red square", "a blue circle"])
    den = m.denoiser(cond, cfg=3.0)
    times = m.time_grid(STEPS)
    with attention_control(m.unet, [rec], layout=layout) as session:
        controlled = session.denoiser(den, times)
        with torch.no_grad():
            controlled(x, float(times[0]))
        assert rec.take() == ([], None)  # no gradients: nothing recorded, nothing computed
        xg = x.clone().requires_grad_(True)
        controlled(xg, float(times[0]))
        maps, feats = rec.take()
    assert {tuple(mp.shape[:3]) for mp in maps} == {(2, 8, 8), (2, 4, 4), (2, 2, 2)}
    assert all(mp.shape[-1] == 16 and mp.requires_grad for mp in maps)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, 8, 8))  # probabilities
    assert feats.shape[0] == 2 and feats.requires_grad


def test_zero_weights_reproduce_the_unguided_edit_exactly():
    m = tiny_model("sd1")
    sg = SelfGuidance(move={"square": (0.2, 0.0)}, weights=OFF)
    guided = guide_generated(m, "a red square", sg, steps=STEPS, cfg=3.0, seed=3)
    plain = edit_generated(m, "a red square", "a red square", editor="none", steps=STEPS,
                           cfg=3.0, seed=3)
    assert torch.equal(guided.latents, plain.latents)


def test_zero_weights_reproduce_the_unguided_real_image_edit_exactly():
    m = tiny_model("sd1")
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sg = SelfGuidance(resize={"square": 1.5}, weights=OFF)
    guided = guide(m, z, "a red square", sg, inversion="bdia", steps=STEPS, cfg=3.0)
    plain = edit(m, z, "a red square", "a red square", inversion="bdia", editor="none",
                 steps=STEPS, cfg=3.0)
    assert torch.equal(guided.latents, plain.latents)


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_guidance_moves_the_target_row_only(kind):
    m = tiny_model(kind)
    prompt = "a red square on a blue circle"
    sg = SelfGuidance(move={"square": (0.25, 0.0)}, keep=["circle"], steps=1.0,
                      weights=GuideWeights(centroid=50, shape=50, keep=10, appearance=5))
    guided = guide_generated(m, prompt, sg, steps=STEPS, cfg=3.0, seed=1)
    plain = edit_generated(m, prompt, prompt, editor="none", steps=STEPS, cfg=3.0, seed=1)
    # The source is generated as alone (to round-off: a guided call materialises the
    # attention probabilities where SDPA ran before).
    torch.testing.assert_close(guided.latents[0], plain.latents[0], rtol=0, atol=1e-4)
    assert (guided.latents[1] - plain.latents[1]).abs().max() > 1e-4
    assert torch.isfinite(guided.latents).all()


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_guidance_with_the_look_term_runs_on_transformers(kind):
    """The look is read from a transformer's image tokens (``norm_out``, laid on the token
    grid): the source row is unchanged, the target row moves, and the look term is live."""
    from retouch.models.flux import FluxModel
    from retouch.models.sd3 import SD3Model
    from tiny_models import tiny_flux_pipeline, tiny_sd3_pipeline

    m = (SD3Model(tiny_sd3_pipeline()) if kind == "sd3" else FluxModel(tiny_flux_pipeline()))
    prompt = "a red square on a blue circle"
    sg = SelfGuidance(move={"square": (0.25, 0.0)}, keep=["circle"], steps=1.0,
                      weights=GuideWeights(centroid=50, shape=50, keep=10, appearance=5))
    bound = sg.bind(m, prompt, prompt)
    assert bound.recorder.feature_module == "norm_out"
    guided = edit_generated(m, prompt, prompt, editor="none", steps=STEPS, cfg=3.0, seed=1,
                            plugin=bound)
    plain = edit_generated(m, prompt, prompt, editor="none", steps=STEPS, cfg=3.0, seed=1)
    torch.testing.assert_close(guided.latents[0], plain.latents[0], rtol=0, atol=1e-4)
    assert (guided.latents[1] - plain.latents[1]).abs().max() > 1e-4
    no_look = SelfGuidance(move={"square": (0.25, 0.0)}, keep=["circle"], steps=1.0,
                           weights=GuideWeights(centroid=50, shape=50, keep=10, appearance=0))
    without = guide_generated(m, prompt, no_look, steps=STEPS, cfg=3.0, seed=1)
    assert (guided.latents[1] - without.latents[1]).abs().max() > 1e-4  # the look term acts
    looks = donor_looks(m, plain.latents[:1], prompt, ["circle"], sg, inversion="ddim",
                        steps=STEPS, cfg=3.0)
    assert sorted(looks) == list(range(STEPS))  # the window: every step
    assert looks[0]["circle"].shape == (m.network.config.caption_projection_dim
                                        if kind == "sd3" else m.network.inner_dim,)


def test_the_energy_falls_along_its_gradient():
    """One guided call's gradient step lowers the energy it was taken from (tiny SD1, float64)."""
    m = tiny_model_f64("sd1")
    sg = SelfGuidance(move={"square": (0.25, 0.1)}, resize={"red": 1.4},
                      weights=GuideWeights(centroid=1, size=1, shape=1, keep=0, appearance=1))
    bound = sg.bind(m, "a red square", "a red square")
    times = m.time_grid(STEPS)
    den = m.denoiser(m.encode(["a red square"] * 2), cfg=3.0)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)).double()
    t = float(times[1])
    with attention_control(m.unet, bound.controllers, layout=BatchLayout(("source", "target"))
                           ) as session:
        inner = session.denoiser(den, times)

        def energy_at(xv):
            with torch.enable_grad():
                xv = xv.detach().requires_grad_(True)
                e = bound.energy(inner(xv, t), xv, t)
                (g,) = torch.autograd.grad(e, [xv])
            return float(e.detach()), g

        e0, g = energy_at(x)
        g[0] = 0  # the target row only, as the guidance moves it
        e1, _ = energy_at(x - 1e-3 * g / g.norm())
    assert e1 < e0
    assert set(bound.terms) == {"centroid", "size", "shape", "appearance"}


def _hand_maps(shift: int) -> list[torch.Tensor]:
    """Cross maps (2 rows, 8x8, 16 tokens): the token of "square" (position 3 in "a red
    square") a 2x2 blob at columns 1-2 in the source row and ``shift`` cells right in the
    target row; everything else on the start token."""
    m = torch.zeros(2, 8, 8, 16)
    m[..., 0] = 1.0
    for row, col in ((0, 1), (1, 1 + shift)):
        m[row, 3:5, col:col + 2, 3], m[row, 3:5, col:col + 2, 0] = 1.0, 0.0
    return [m]


def test_the_energy_is_zero_at_the_asked_move_and_not_at_its_opposite():
    m = tiny_model("sd1")
    sg = SelfGuidance(move={"square": (2 / 8, 0.0)},
                      weights=GuideWeights(centroid=1, shape=1, keep=0, appearance=0))
    bound = sg.bind(m, "a red square", "a red square")
    assert bound.positions["square"] == ([3], [3])
    energies = {}
    for shift in (2, -1, 0):
        bound.recorder.maps, bound.recorder.features = _hand_maps(shift), None
        energies[shift] = float(bound.energy(None, torch.zeros(2, 4, 8, 8), 0.0))
    assert energies[2] == pytest.approx(0.0, abs=1e-6)
    assert energies[-1] > energies[0] > 0.1


def test_composes_with_prompt_to_prompt_and_an_inversion():
    m = tiny_model("sd1")
    sg = SelfGuidance(move={"square": (0.2, 0.0)}, steps=1.0,
                      weights=GuideWeights(centroid=20, shape=20, keep=0, appearance=2))
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    r = guide(m, z, "a red square", sg, target_prompt="a blue square", inversion="direct",
              editor="p2p", steps=STEPS, cfg=3.0, cross_steps=0.5)
    plain = edit(m, z, "a red square", "a blue square", inversion="direct", editor="p2p",
                 steps=STEPS, cfg=3.0, cross_steps=0.5)
    torch.testing.assert_close(r.latents[0], plain.latents[0], rtol=0, atol=1e-4)
    assert (r.latents[1] - plain.latents[1]).abs().max() > 1e-3


def test_a_look_transferred_from_the_image_itself_is_the_held_look():
    """``transfer`` reads the donor's looks from its own reconstruction: with the image as its
    own donor, the edit equals the one that holds the object's look in the same batch."""
    m = tiny_model("sd1")
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    w = GuideWeights(centroid=20, shape=20, keep=10, appearance=20)
    common = dict(inversion="ddim", steps=STEPS, cfg=3.0)
    held = guide(m, z, "a red square on a blue circle",
                 SelfGuidance(move={"square": (0.2, 0.0)}, keep=["circle"],
                              steps=1.0, weights=w), **common)
    own = guide(m, z, "a red square on a blue circle",
                SelfGuidance(move={"square": (0.2, 0.0)}, transfer={"square": "square"},
                             keep=["circle"], steps=1.0, weights=w),
                donor=(z, "a red square on a blue circle"), **common)
    torch.testing.assert_close(own.latents, held.latents, rtol=0, atol=1e-5)
    other = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    moved = guide(m, z, "a red square on a blue circle",
                  SelfGuidance(move={"square": (0.2, 0.0)}, transfer={"square": "circle"},
                               keep=["circle"], steps=1.0, weights=w),
                  donor=(other, "a green circle"), **common)
    torch.testing.assert_close(moved.latents[0], held.latents[0], rtol=0, atol=1e-4)
    assert (moved.latents[1] - held.latents[1]).abs().max() > 1e-4
    looks = donor_looks(m, other, "a green circle", ["circle"], SelfGuidance(keep=["circle"]),
                        **common)
    channels = m.network.config.block_out_channels[0]  # the last decoder block's
    assert sorted(looks) == [0, 1]  # the default window, (0, 0.6) of the 4 steps
    assert looks[0]["circle"].shape == (channels,)


def test_a_transfer_without_donor_or_with_a_missing_donor_word_is_refused():
    m = tiny_model("sd1")
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sg = SelfGuidance(transfer={"square": "circle"})
    with pytest.raises(ValueError, match="give donor="):
        guide(m, z, "a red square", sg, steps=STEPS)
    with pytest.raises(ValueError, match="'circle', which is not a word of the prompt"):
        guide(m, z, "a red square", sg, steps=STEPS, donor=(z, "a red square"))
    with pytest.raises(ValueError, match="both from this image"):
        SelfGuidance(restyle={"square": "circle"}, transfer={"square": "circle"})
    with pytest.raises(ValueError, match="weights.appearance=0 turns off"):
        SelfGuidance(transfer={"square": "circle"}, weights=OFF)
    with pytest.raises(ValueError, match="pass donor_looks="):
        sg.bind(m, "a red square", "a red square")


def test_a_non_finite_guided_step_is_named():
    m = tiny_model("sd1")
    den = m.denoiser(m.encode(["a red square"]), cfg=3.0)
    guided = LossGuidance(den, lambda x0, x, t: x0.sum() * float("nan"), scale=1.0)
    with pytest.raises(FloatingPointError, match="t=.*non-finite"):
        guided(torch.randn(1, 4, 8, 8), float(m.time_grid(STEPS)[0]))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"move": {"square": (1.2, 0.0)}}, "leaves the image"),
    ({"move": {"square": (0.1,)}}, r"\(dx, dy\)"),
    ({"resize": {"square": 0.0}}, "must be > 0"),
    ({"resize": {"square": float("nan")}}, "finite"),
    ({"move": {"square": (0.1, 0.0)}, "weights": {"centroid": float("inf")}},
     "weight centroid"),
    ({"move": {"square": (0.1, 0.0)}, "weights": {"size": -1.0}}, "weight size"),
    ({"move": {"square": (0.1, 0.0)}, "steps": (0.5, 0.2)}, "step window"),
    ({"move": {"square": (0.1, 0.0)}, "steps": (0.3, 0.3)}, "holds no step"),
    ({}, "something to do"),
])
def test_bad_input_is_refused_before_any_model(kwargs, message):
    with pytest.raises(ValueError, match=message):
        weights = kwargs.pop("weights", None)
        SelfGuidance(**kwargs, weights=None if weights is None else GuideWeights(**weights))


def test_a_word_naming_two_objects_or_missing_from_a_longer_target_is_refused():
    m = tiny_model("sd1")
    sg = SelfGuidance(move={"square": (0.1, 0.0)})
    with pytest.raises(ValueError, match="occurs 2 times"):
        sg.bind(m, "a red square on a square", "a red square on a square")
    with pytest.raises(ValueError, match="lacks, and the two prompts have different token"):
        sg.bind(m, "a red square", "a big red circle")
    assert sg.bind(m, "a red square", "a red circle").positions["square"] == ([3], [3])
    with pytest.raises(ValueError, match="resolutions \\[3\\]; this model has"):
        SelfGuidance(move={"square": (0.1, 0.0)}, resolutions={3}).bind(
            m, "a red square", "a red square")


def test_a_window_without_a_step_of_the_grid_is_refused():
    m = tiny_model("sd1")
    sg = SelfGuidance(move={"square": (0.1, 0.0)}, steps=(0.5, 0.55))
    with pytest.raises(ValueError, match="holds none of the 4 steps"):
        guide_generated(m, "a red square", sg, steps=STEPS, cfg=3.0)


def test_a_word_not_in_the_prompt_is_refused():
    sg = SelfGuidance(move={"triangle": (0.1, 0.0)})
    with pytest.raises(ValueError, match="'triangle', which is not a word of the prompt"):
        sg.check_prompt("a red square")
    sg.check_prompt("a red triangle on the left")  # no error
    with pytest.raises(ValueError, match="'triangle', which occurs 2 times"):
        sg.check_prompt("a red triangle on the left and a blue triangle on the right")


# --- the CLI on a (barely trained) ToyWorld pipeline, and the bench's move / resize cases ----


def test_guide_cli_writes_the_edit(tiny_toy_pipeline, tmp_path):
    import json

    from PIL import Image

    from retouch.cli import main
    from retouch.toyworld.editbench import make_cases

    case = make_cases(1, seed=5, edit_types=("position",))[0]
    src = tmp_path / "src.png"
    Image.fromarray(case.source_image).save(src)
    word = case.source.objects[0].shape
    out = tmp_path / "g"
    assert main(["guide", str(src), "--source", case.source_prompt, "--move", f"{word}:0.2,0",
                 "--resize", f"{word}:1.2", "--steps", "4", "--weight", "centroid=5",
                 "--model", str(tiny_toy_pipeline), "--out", str(out)]) == 0
    for name in ("input.png", "edited.png", "source_reconstruction.png", "guide.json"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "guide.json").read_text())
    assert report["move"] == {word: [0.2, 0.0]} and report["weights"]["centroid"] == 5.0
    assert report["inversion"] == "ddpm_edit_friendly" and report["keep"] == []
    target = case.target_prompt  # the caption naming the new position, in the same run
    assert main(["guide", str(src), "--source", case.source_prompt, "--target", target,
                 "--move", f"{word}:{case.offset[0]:.3f},0", "--steps", "4",
                 "--model", str(tiny_toy_pipeline), "--out", str(tmp_path / "t")]) == 0
    assert json.loads((tmp_path / "t" / "guide.json").read_text())["target"] == target
    donor = make_cases(1, seed=6, edit_types=("color",))[0]  # a look from another image
    Image.fromarray(donor.source_image).save(tmp_path / "donor.png")
    donor_word = donor.source.objects[0].shape
    assert main(["guide", str(src), "--source", case.source_prompt, "--transfer",
                 f"{word}:{donor_word}", "--donor", str(tmp_path / "donor.png"),
                 "--donor-prompt", donor.source_prompt, "--steps", "4",
                 "--model", str(tiny_toy_pipeline), "--out", str(tmp_path / "d")]) == 0
    report = json.loads((tmp_path / "d" / "guide.json").read_text())
    assert report["transfer"] == {word: donor_word} and report["donor"].endswith("donor.png")


@pytest.mark.parametrize(("args", "message"), [
    (["--move", "star:0.1,0"], "'star', which is not a word of the prompt"),
    (["--move", "{w}:1.5,0"], "leaves the image"),
    (["--move", "{w}:0.1"], "the move is DX,DY"),
    (["--resize", "{w}:-2"], "must be > 0"),
    (["--resize", "{w}:x"], "'x' is not a number"),
    (["--move", "{w}:0.1,0", "--weight", "centroid=nan"], "must be a finite number"),
    (["--move", "{w}:0.1,0", "--weight", "nosuch=1"], "--weight wants NAME=W"),
    (["--move", "{w}:0.1,0", "--window", "0.7,0.2"], "step window"),
    (["--move", "{w}:0.1,0", "--editor", "p2p"], "--target caption"),
    (["--transfer", "{w}:square"], "give --donor IMAGE2 and --donor-prompt"),
    (["--transfer", "{w}:square", "--donor", "d.png", "--donor-prompt", "a blue circle"],
     "'square', which is not a word of the prompt 'a blue circle'"),
    (["--move", "{w}:0.1,0", "--donor", "d.png"], "serve --transfer"),
])
def test_guide_cli_refuses_bad_input_before_the_model_loads(args, message, tmp_path, capsys,
                                                             monkeypatch):
    from retouch.cli import main
    from retouch.models.pipeline import PipelineModel

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(PipelineModel, "load", no_load)
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    args = [a.replace("{w}", "circle") for a in args]
    code = main(["guide", str(image), "--source", "a red circle", *args,
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_toybench_moves_and_resizes_carry_their_exact_offset_and_factor():
    from retouch.toyworld.editbench import make_cases
    from retouch.toyworld.render import render

    def moments(mask):  # bounding-box centre (x, y) in image fractions, sqrt(area)
        ys, xs = np.nonzero(mask > 0.5)
        side = mask.shape[0]
        box = np.array([xs.min() + xs.max() + 1, ys.min() + ys.max() + 1]) / (2 * side)
        return box, np.sqrt(len(xs))

    for case in make_cases(10, seed=3, edit_types=("position", "size")):
        k = case.object_index
        (c0, s0), (c1, s1) = (moments(render(sc, 128).masks[k])
                              for sc in (case.source, case.target))
        assert case.offset == pytest.approx(tuple(c1 - c0), abs=0.02)  # the renderer agrees
        assert case.factor == pytest.approx(s1 / s0, rel=0.05)
        if case.edit_type == "position":
            assert abs(case.offset[0]) > 0.2 and case.factor == pytest.approx(1.0)
        else:
            assert case.offset == pytest.approx((0.0, 0.0)) and case.factor != pytest.approx(1.0)


def test_the_editing_bench_skips_self_guidance_where_no_word_names_the_object_alone(
        tiny_toy_pipeline):
    """Two green circles: neither shape nor colour names the edited one, so the self-guidance
    rows leave the case out (the bench once stopped there) and the other rows edit it."""
    from retouch.bench.editing import edit_case, methods
    from retouch.models.pipeline import PipelineModel
    from retouch.toyworld.editbench import EditCase
    from retouch.toyworld.scene import ObjectSpec, Scene

    source = Scene((ObjectSpec("circle", "green", "small", "left"),
                    ObjectSpec("circle", "green", "big", "right")), "white")
    case = EditCase(source, source.replace(0, size="big"), "size", 0)
    chosen = [m for m in methods(False) if m.label in (
        "selfguide/ddpm_edit_friendly", "selfguide (caption kept)/ddpm_edit_friendly",
        "none/ddpm_edit_friendly")]
    edits = edit_case(PipelineModel.load(tiny_toy_pipeline), case, chosen, steps=2)
    assert set(edits) == {"none/ddpm_edit_friendly", "ceiling"}
