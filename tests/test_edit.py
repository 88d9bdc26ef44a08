"""Editing on tiny random SD1.x, SD2-v and SDXL pipelines: edit_generated, real-image edit
(every inversion x every editor), SDEdit, the edit CLI and the editing bench's plumbing."""

import functools
import json

import numpy as np
import pytest
import torch

import retouch.inversion
from retouch.cli import main
from retouch.inversion import METHODS, invert
from retouch.recipes.edit import edit, edit_generated, edit_inverted, sdedit
from retouch.recipes.editors import EDITORS, changed_tokens
from tiny_models import tiny_model, tiny_model_f64, tiny_tokenizer

STEPS = 4
# These tests run EDICT at a few steps on purpose (plumbing and exactness, not edit quality).
pytestmark = pytest.mark.filterwarnings("ignore:EDICT edits with:UserWarning")


def run(kind="sd1", source="a red square", target="a blue square", **kw):
    kw.setdefault("steps", STEPS)
    kw.setdefault("cfg", 3.0)
    return edit_generated(tiny_model(kind), source, target, **kw)


@pytest.mark.parametrize(("editor", "options"), [
    ("p2p", {}),
    ("masactrl", {"start_step": 1, "start_layer": 3}),
    ("pnp", {}),
    ("rf_solver", {"share_steps": 1.0, "places": ("down", "mid", "up")}),
])
def test_identical_prompts_give_the_source(editor, options):
    r = run(source="a red square", target="a red square", editor=editor, **options)
    torch.testing.assert_close(r.latents[1], r.latents[0], rtol=0, atol=1e-5)
    assert abs(r.edited.astype(int) - r.source.astype(int)).max() <= 1


@pytest.mark.parametrize("kind", ["sd1", "sd2v", "sdxl"])
def test_the_same_edit_runs_on_sd1_sd2v_sdxl(kind):
    # Random models attend almost uniformly (SDXL's coarse grid is 2x2): a threshold just
    # below the normalised maximum keeps each branch's argmax cells only.
    r = run(kind, blend_words=("red", "blue"), blend_threshold=0.999, blend_start=0.0,
            blend_dilation=0, maps=True)
    size = 2 * 8  # tiny VAE: factor 2 on an 8x8 latent
    assert r.source.shape == r.edited.shape == (size, size, 3)
    assert torch.isfinite(r.latents).all()
    mask = torch.from_numpy(r.masks["local_blend"])
    assert mask.shape == (8, 8) and 0 < mask.sum() < 64
    # Local blending ran on the last step: outside the mask the target is the source.
    outside = mask == 0
    torch.testing.assert_close(r.latents[1][:, outside], r.latents[0][:, outside])
    assert not torch.allclose(r.latents[1], r.latents[0])  # the edit changed something
    assert r.store is not None and r.store.cross().shape[0] == 2


def test_blending_pixels_keeps_the_source_pixels_outside_the_mask():
    """blend_space="pixels": the rows sample unblended and the edited image takes the source's
    pixels outside the mask (nearest-upsampled), exactly; inside it is the unblended edit's."""
    options = dict(blend_words=("red", "blue"), blend_threshold=0.999, blend_start=0.0,
                   blend_dilation=0)
    pixels = run(**options, blend_space="pixels")
    unblended = run()
    mask = pixels.masks["local_blend"] > 0
    assert 0 < mask.sum() < mask.size
    up = mask.repeat(2, 0).repeat(2, 1)  # tiny VAE: factor 2
    assert np.array_equal(pixels.edited[~up], pixels.source[~up])
    inside = pixels.edited[up].astype(int) - unblended.edited[up].astype(int)
    assert np.abs(inside).max() <= 1  # uint8 round-off of equal latents
    # (the map store computes attention explicitly: round-off apart)
    torch.testing.assert_close(pixels.latents, unblended.latents, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="space 'pixel' is not one of latents, pixels"):
        run(**options, blend_space="pixel")


def test_injection_makes_the_edit_closer_to_the_source():
    plain = run(editor="none")  # both prompts from the same noise, no control
    p2p = run(mode="swap", cross_steps=1.0, self_steps=1.0)
    gap = lambda r: float((r.latents[1] - r.latents[0]).norm())  # noqa: E731
    assert gap(p2p) < gap(plain)


def test_refinement_and_reweighting_run():
    r = run(source="a square", target="a big red square", mode="refine",
            weights={"red": 2.0})
    assert torch.isfinite(r.latents).all()
    with pytest.raises(ValueError, match="same number of words"):
        run(source="a square", target="a big red square", mode="swap")


def test_source_trajectory_pins_the_source_row():
    g = torch.Generator().manual_seed(5)
    trajectory = [torch.randn(1, 4, 8, 8, generator=g) for _ in range(STEPS + 1)]
    r = run(source_trajectory=trajectory)
    torch.testing.assert_close(r.latents[0], trajectory[-1][0])
    with pytest.raises(ValueError, match="grid of 5 times"):
        run(source_trajectory=trajectory[:-1])


def test_options_are_checked():
    with pytest.raises(ValueError, match="'p2p' takes no option start_step; its options: "):
        run(editor="p2p", start_step=2)
    with pytest.raises(ValueError, match="'none' takes no option cross_steps; its options: none"):
        run(editor="none", cross_steps=0.5)
    with pytest.raises(ValueError, match="unknown editor 'magic'"):
        run(editor="magic")
    with pytest.raises(RuntimeError, match="never called"):  # default S = 4 of 4 steps
        run(editor="masactrl", start_layer=0)


# --- real images: inversion x editor -------------------------------------------------------

EDIT_STEPS = 5  # BDIA's loop starts at step 1: P2P's self window 0.4 must reach step 1
EXACT = ("edict", "bdia", "ddpm_edit_friendly")  # corrections on both rows, exact
MASACTRL = {"start_step": 1, "start_layer": 3}  # tiny UNets have 7 self-attention layers


@functools.cache
def tiny_image() -> np.ndarray:
    """A smooth 16x16 RGB image (what the tiny VAE takes)."""
    g = torch.Generator().manual_seed(3)
    small = torch.rand(1, 3, 4, 4, generator=g)
    img = torch.nn.functional.interpolate(small, size=16, mode="bilinear")[0]
    return (img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


@pytest.mark.parametrize("method", EXACT)
def test_identical_prompts_give_back_the_source_reconstruction(method):
    m = tiny_model_f64("sd1")  # float64: the exact inversions are exact to round-off
    z = m.encode_image(tiny_image()).double()
    r = edit(m, z, "a red square", "a red square", inversion=method, editor="p2p",
             steps=EDIT_STEPS, cfg=3.0, blend_words="changed")
    assert r.latents.dtype == torch.float64
    torch.testing.assert_close(r.latents[1], r.latents[0], rtol=0, atol=1e-12)
    assert np.array_equal(r.edited, r.source)
    # ... and that reconstruction is the image's latent (an exact inversion).
    torch.testing.assert_close(r.latents[0], z[0], rtol=0, atol=1e-9)


def test_direct_inversion_pins_the_source_row_only():
    m = tiny_model("sd1")
    inv = invert(m, tiny_image(), "a red square", method="direct", steps=EDIT_STEPS, cfg=3.0,
                 progress=False)
    r = edit_inverted(m, inv, "a red square", editor="p2p")
    assert torch.equal(r.latents[0], inv.trajectory[-1][0])  # the source row is the pivot's end
    # The paper's choice: the target row runs without offsets, so even the same prompt moves.
    assert (r.latents[1] - r.latents[0]).abs().max() > 1e-3


@pytest.mark.parametrize("method", METHODS)
def test_every_inversion_runs_every_editor_or_refuses(method):
    m = tiny_model_f64("sd1")  # float64: source rows compare to round-off across editors
    inv = invert(m, m.encode_image(tiny_image()).double(), "a red square", method=method,
                 steps=EDIT_STEPS, cfg=3.0, progress=False)
    runs = {"none": {}, "p2p": {}, "p2p+blend": {"blend_words": "changed"},
            "masactrl": MASACTRL, "pnp": {},
            "rf_solver": {"share_steps": 0.5}}  # bdia replays from step 1: past the default
    assert set(EDITORS) == {k.split("+")[0] for k in runs}
    sources = []
    for name, options in runs.items():
        editor = name.split("+")[0]
        if method == "edict" and "blend_words" in options:
            with pytest.raises(ValueError, match=r"EDICT's coupled two-chain loop.*Valid: edict "
                                                 r"with p2p without local blending"):
                edit_inverted(m, inv, "a blue square", editor=editor, **options)
            continue
        r = edit_inverted(m, inv, "a blue square", editor=editor, **options)
        assert r.edited.shape == r.source.shape == (16, 16, 3)
        assert torch.isfinite(r.latents).all()
        assert not torch.allclose(r.latents[1], r.latents[0])  # the target prompt changed it
        assert ("local_blend" in r.masks) == ("blend_words" in options)
        sources.append(r.latents[0])
    for s in sources[1:]:  # the editor acts on the target row only
        torch.testing.assert_close(s, sources[0], rtol=0, atol=1e-9)


def test_edit_refuses_before_paying_for_the_inversion(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the inversion ran")

    monkeypatch.setattr(retouch.inversion, "invert", never)
    m, image = tiny_model("sd1"), tiny_image()
    with pytest.raises(ValueError, match="inversion 'edict' cannot run LocalBlend"), \
            pytest.warns(UserWarning, match="EDICT edits with 25 < 50 steps"):
        edit(m, image, "a red square", "a blue square", inversion="edict",
             blend_words="changed")
    with pytest.raises(ValueError, match="unknown inversion method 'magic'"):
        edit(m, image, "a red square", "a blue square", inversion="magic")
    with pytest.raises(ValueError, match="unknown option.*for null_text"):
        edit(m, image, "a red square", "a blue square", inversion="null_text",
             inversion_options={"lr_typo": 1})
    with pytest.raises(ValueError, match="takes no option start_step"):
        edit(m, image, "a red square", "a blue square", editor="p2p", start_step=2)


def test_changed_tokens():
    tok = tiny_tokenizer()
    assert changed_tokens(tok, "a red square", "a blue square") == ([2], [2])
    assert changed_tokens(tok, "a square", "a big red square") == ([], [2, 3])
    assert changed_tokens(tok, "a red square", "a red square") == ([], [])


def test_sdedit():
    m, image = tiny_model("sd1"), tiny_image()
    z = m.encode_image(image)
    roundtrip = m.decode(z)[0]
    r0 = sdedit(m, image, "a blue square", strength=0.0, steps=4)
    assert np.array_equal(r0.edited, roundtrip) and np.array_equal(r0.source, roundtrip)
    r = sdedit(m, image, "a blue square", strength=0.5, steps=4, cfg=3.0, seed=1)
    assert r.edited.shape == (16, 16, 3) and r.latents.shape == (2, 4, 8, 8)
    torch.testing.assert_close(r.latents[0], z[0])
    assert not torch.allclose(r.latents[1], r.latents[0])
    again = sdedit(m, image, "a blue square", strength=0.5, steps=4, cfg=3.0, seed=1)
    assert torch.equal(again.latents, r.latents)
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
        sdedit(m, image, "a blue square", strength=1.5)


# --- the CLI and the bench on a (barely trained) ToyWorld pipeline ---------------------------


def test_edit_cli_writes_images_and_masks(tiny_toy_pipeline, tmp_path, capsys):
    from PIL import Image

    from retouch.toyworld.editbench import make_cases

    case = make_cases(1, seed=5, edit_types=("color",))[0]
    src = tmp_path / "src.png"
    Image.fromarray(case.source_image).save(src)
    common = [str(src), "--source", case.source_prompt, "--target", case.target_prompt,
              "--steps", "4", "--model", str(tiny_toy_pipeline)]
    assert main(["edit", *common, "--blend", "changed", "--out", str(tmp_path / "p2p")]) == 0
    out = tmp_path / "p2p"
    for name in ("input.png", "edited.png", "source_reconstruction.png",
                 "mask_local_blend.png", "attention.png", "edit.json"):
        assert (out / name).stat().st_size > 0, name
    assert Image.open(out / "edited.png").size == Image.open(src).size
    assert main(["edit", *common, "--inversion", "edict", "--blend", "changed",
                 "--out", str(tmp_path / "no")]) == 2
    assert "EDICT's coupled two-chain loop" in capsys.readouterr().err
    assert main(["edit", *common, "--blend", "changed", "--blend-space", "pixels",
                 "--out", str(tmp_path / "px")]) == 0
    assert (tmp_path / "px" / "mask_local_blend.png").exists()
    assert main(["edit", *common, "--blend-space", "pixels", "--out", str(tmp_path / "no")]) == 2
    assert "turn it on with --blend changed" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()
    assert main(["edit", *common, "--editor", "sdedit", "--inversion", "direct",
                 "--out", str(tmp_path / "no")]) == 2
    assert main(["edit", *common, "--option", "steps=3", "--out", str(tmp_path / "no")]) == 2
    assert "takes no option steps" in capsys.readouterr().err
    assert main(["edit", *common, "--editor", "sdedit", "--strength", "0.5",
                 "--out", str(tmp_path / "sd")]) == 0
    assert (tmp_path / "sd" / "edited.png").exists()
    assert main(["edit", *common, "--editor", "flowedit", "--out", str(tmp_path / "fe")]) == 0
    report = json.loads((tmp_path / "fe" / "edit.json").read_text())
    assert report["strength"] == 0.85 and report["inversion"] is None
    assert main(["edit", *common, "--editor", "flowedit", "--blend", "changed",
                 "--out", str(tmp_path / "no")]) == 2
    assert "--editor flowedit inverts nothing" in capsys.readouterr().err
    assert main(["edit", *common, "--editor", "flowedit", "--option", "final_steps=2",
                 "--out", str(tmp_path / "fe2")]) == 0
    assert json.loads((tmp_path / "fe2" / "edit.json").read_text())["options"] == {
        "final_steps": 2}
    for bad in ("final_steps=1.5", "final_steps=two"):
        assert main(["edit", *common, "--editor", "flowedit", "--option", bad,
                     "--out", str(tmp_path / "no")]) == 2
        assert "final_steps must be a whole number" in capsys.readouterr().err
    assert main(["edit", *common, "--editor", "sdedit", "--option", "final_steps=2",
                 "--out", str(tmp_path / "no")]) == 2
    assert "--editor sdedit takes these options: none" in capsys.readouterr().err
    assert main(["edit", *common, "--inversion", "fireflow", "--editor", "rf_solver",
                 "--out", str(tmp_path / "rf")]) == 0


def test_bench_plumbing_on_two_cases(tiny_toy_pipeline):
    from retouch.bench.editing import aggregate, edit_case, methods, processor_overhead, score_case
    from retouch.models.pipeline import PipelineModel
    from retouch.toyworld.editbench import make_cases

    pm = PipelineModel.load(tiny_toy_pipeline)
    cases = make_cases(2, seed=1, edit_types=("size", "color"))
    chosen = methods(quick=True)
    records = []
    for case in cases:
        edits = edit_case(pm, case, chosen, steps=EDIT_STEPS)
        want = {m.label for m in chosen if case.edit_type in m.edit_types}
        assert set(edits) == want | {"reconstruction", "ceiling"}
        for label, (image, seconds) in edits.items():
            assert image.shape == case.source_image.shape and image.dtype == np.uint8
            score = score_case(image, case)
            assert score["success"] in (0.0, 1.0) and np.isfinite(score["bg_psnr"])
            records.append({"label": label, "method": label, "inversion": "x",
                            "edit_type": case.edit_type, "seconds": seconds, **score})
    rows = aggregate(records)
    by = {(r["method"], r["edit_type"]): r for r in rows}
    assert by[("masactrl/direct", "size")]["n"] == 1
    assert ("masactrl/direct", "color") not in by  # MasaCtrl runs on position / size only
    assert by[("p2p/direct", "all")]["n"] == 2
    assert by[("ceiling", "all")]["seconds"] != by[("ceiling", "all")]["seconds"]  # NaN: no edit
    o = processor_overhead(pm, repeats=1, forwards=1)
    assert o["ratio_no_controller"] > 0 and o["ratio_store"] > 0


def test_the_bench_runs_edict_at_its_own_steps_and_guidance(tiny_toy_pipeline, monkeypatch):
    from retouch.bench.editing import CFG, EDICT_CFG, EDICT_STEPS, edit_case, methods
    from retouch.models.pipeline import PipelineModel
    from retouch.toyworld.editbench import make_cases

    seen = []
    real = retouch.inversion.invert

    def spy(model, image, prompt, *, method, steps, cfg, **options):
        seen.append((method, steps, cfg))
        return real(model, image, prompt, method=method, steps=steps, cfg=cfg, **options)

    monkeypatch.setattr(retouch.inversion, "invert", spy)
    chosen = [m for m in methods(quick=False) if m.label in ("p2p/edict", "p2p/direct")]
    case = make_cases(1, seed=1, edit_types=("color",))[0]
    edits = edit_case(PipelineModel.load(tiny_toy_pipeline), case, chosen, steps=EDIT_STEPS)
    assert {"p2p/edict", "p2p/direct"} <= set(edits)
    assert sorted(seen) == [("direct", EDIT_STEPS, CFG), ("edict", EDICT_STEPS, EDICT_CFG)]
