"""Bad input, by kind and by command: a one-line refusal naming the value, the rule and the fix,
exit code 2, no traceback, nothing written and no input changed -- or a documented acceptance.

CLI cases run ``retouch.cli.main`` on a barely trained ToyWorld pipeline (plumbing only); API
cases call the public functions on tiny random models.
"""

import hashlib
import json
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retouch.checks import Note
from retouch.cli import main


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` with a hash of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def refused(tmp_path, capsys):
    """``refused(argv, *expected)``: main(argv) exits 2 with one stderr line holding every
    expected text, and no file under tmp_path was added, removed or changed."""

    def check(argv, *expected):
        before = _tree(tmp_path)
        capsys.readouterr()
        code = main([str(a) for a in argv])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if not line.startswith("retouch: note:")]
        assert code == 2, err
        assert "Traceback" not in err
        assert len(lines) == 1 and lines[0].startswith("retouch"), err
        for text in expected:
            assert text in lines[0], lines[0]
        assert _tree(tmp_path) == before, "a refused command wrote or changed files"
        return lines[0]

    return check


@pytest.fixture
def scene_png(tmp_path):
    """A rendered ToyWorld scene saved as tmp_path/images/scene.png, and its caption."""
    from retouch.toyworld.render import render
    from retouch.toyworld.scene import caption, random_scene

    scene = random_scene(random.Random(3), backgrounds=("white",))
    path = tmp_path / "images" / "scene.png"
    path.parent.mkdir()
    Image.fromarray(render(scene, 16).image).save(path)
    return path, caption(scene).text


# --- non-finite numbers ----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_cfg_is_refused_by_every_command(value, refused, scene_png, tmp_path):
    image, prompt = scene_png
    out = tmp_path / "out"
    rule, cfg = f"argument --cfg: {value} is not a finite number", f"--cfg={value}"
    assert refused(["invert", image, "--prompt", prompt, cfg, "--out", out], rule)
    assert refused(["generate", prompt, cfg, "--out", out / "g.png"], rule)
    assert refused(["edit", image, "--source", prompt, "--target", prompt, cfg, "--out", out], rule)
    assert refused(["attention", "--prompt", prompt, cfg, "--out", out], rule)
    assert refused(["toyworld", "train", f"--lr={value}", "--out", out], "argument --lr")


def test_bad_counts_and_fractions_are_refused(refused, scene_png, tmp_path):
    image, prompt = scene_png
    out = tmp_path / "out"
    assert refused(["generate", prompt, "--steps", "0", "--out", out / "g.png"],
            "--steps: must be at least 1, got 0")
    assert refused(["generate", prompt, "--n", "two", "--out", out / "g.png"],
                   "'two' is not a whole")
    assert refused(["edit", image, "--source", prompt, "--target", prompt, "--editor", "sdedit",
             "--strength", "1.5", "--out", out], "--strength: 1.5 is not in [0, 1]")
    assert refused(["bench", "editing", "--steps", "1", "--out", out],
                   "--steps: must be at least 2")
    assert refused(["bench", "nosuch", "--out", out], "unknown benchmark 'nosuch'", "valid:")
    assert refused(["bench", "toyworld", "--cfg", "nan", "--out", out],
                   "argument --cfg: nan is not a finite number")
    assert refused(["bench", "samplers", "--cfg", "3", "--out", out],
                   "retouch bench samplers does not take --cfg")


def test_editor_options_and_names_are_checked_before_any_work(refused, scene_png, tmp_path):
    image, prompt = scene_png
    edit = ["edit", image, "--source", prompt, "--target", prompt, "--out", tmp_path / "e"]
    assert refused([*edit, "--option", "cross_steps=nan"],
                   "p2p option cross_steps must be a fraction",
            "got 'nan'")
    assert refused([*edit, "--option", "cross_steps=2"], "0 <= start <= end <= 1, got 2")
    assert refused([*edit, "--option", "blend_dilation=-1"], "blend_dilation must be at least 0")
    assert refused([*edit, "--editor", "masactrl", "--option", "start_step=x"],
            "start_step must be a whole number")
    assert refused([*edit, "--option", "nosuch=1"], "takes no option nosuch", "its options:")
    assert refused(["generate", prompt, "--sampler", "nosuch", "--out", tmp_path / "g.png"],
            "unknown sampler 'nosuch'", "ddim")
    assert refused(["toyworld", "export", tmp_path / "norun", "--dest", tmp_path / "x"],
            "is not a finished `retouch toyworld train` run")
    (tmp_path / "afile").write_text("x")
    assert refused(["toyworld", "train", "--out", tmp_path / "afile"], "is a file")


def _inversion_file(tiny_toy_pipeline, scene_png, tmp_path) -> Path:
    image, prompt = scene_png
    first = tmp_path / "first"
    assert main(["invert", str(image), "--model", str(tiny_toy_pipeline), "--prompt", prompt,
                 "--method", "ddim", "--steps", "2", "--out", str(first)]) == 0
    return first / "inversion.safetensors"


def test_a_non_finite_inversion_file_is_refused(tiny_toy_pipeline, refused, scene_png,
                                                 tmp_path):
    from safetensors.torch import load_file, save_file

    from retouch.inversion.result import _META_KEY

    image, prompt = scene_png
    saved = _inversion_file(tiny_toy_pipeline, scene_png, tmp_path)
    from safetensors import safe_open

    with safe_open(str(saved), "pt") as f:
        meta = f.metadata()
    tensors = load_file(saved)
    tensors["trajectory"][0, 0, 0, 0, 0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(tensors, bad, metadata=meta)
    common = ["--model", tiny_toy_pipeline, "--prompt", prompt, "--out", tmp_path / "again"]
    assert refused(["invert", image, "--from-inversion", bad, *common],
            "trajectory holds 1 non-finite value", "invert the image again")
    doc = json.loads(meta[_META_KEY])
    save_file(load_file(saved), bad, metadata={_META_KEY: json.dumps({**doc, "cfg": float("inf")})})
    assert refused(["invert", image, "--from-inversion", bad, *common], "its cfg is inf")
    save_file(load_file(saved), bad, metadata={_META_KEY: "{not json"})
    assert refused(["invert", image, "--from-inversion", bad, *common],
                   "metadata is not valid JSON")


# --- output paths and inputs -----------------------------------------------------------------


def test_output_paths_are_checked_before_any_work(refused, scene_png, tmp_path):
    image, prompt = scene_png
    folder = tmp_path / "folder"
    folder.mkdir()
    afile = tmp_path / "afile.txt"
    afile.write_text("keep me")
    assert refused(["generate", prompt, "--out", folder], f"--out {folder} is a folder")
    assert refused(["generate", prompt, "--out", tmp_path / "gen.xyz"],
                   ".xyz is not an image format",
            ".png")
    assert refused(["generate", prompt, "--out", tmp_path / "gen"], "no extension")
    assert refused(["generate", prompt, "--out", afile / "gen.png"], "is a file, not a folder")
    for command in (["invert", image, "--prompt", prompt], ["attention", "--prompt", prompt],
                    ["edit", image, "--source", prompt, "--target", prompt], ["demo"],
                    ["bench", "samplers"]):
        assert refused([*command, "--out", afile], f"--out {afile} is a file")
    assert afile.read_text() == "keep me"


def test_no_command_writes_over_its_input(refused, scene_png):
    image, prompt = scene_png
    named = image.parent / "input.png"
    shutil.copy(image, named)
    assert refused(["invert", named, "--prompt", prompt, "--out", named.parent],
            f"would overwrite the input {named}", "choose another --out")
    assert refused(["edit", named, "--source", prompt, "--target", prompt, "--out", named.parent],
            "would overwrite the input")
    heat = image.parent / "heatmaps.png"
    shutil.copy(image, heat)
    assert refused(["attention", "--prompt", prompt, "--image", heat, "--out", heat.parent],
            "would overwrite the input")


def test_a_replay_may_write_beside_its_inversion(tiny_toy_pipeline, scene_png, tmp_path):
    """Documented acceptance: replaying into the inversion's own folder replaces the earlier
    outputs there, never the inversion file, which is read, not written."""
    image, prompt = scene_png
    saved = _inversion_file(tiny_toy_pipeline, scene_png, tmp_path)
    before = saved.read_bytes()
    assert main(["invert", str(image), "--model", str(tiny_toy_pipeline), "--from-inversion",
                 str(saved), "--out", str(saved.parent)]) == 0
    assert saved.read_bytes() == before


def test_the_image_format_follows_the_extension(tiny_toy_pipeline, tmp_path):
    """Documented acceptance: --out gen.jpg writes a JPEG, gen.webp a WebP; no temporary file
    is left behind."""
    for name, fmt in (("gen.jpg", "JPEG"), ("gen.webp", "WEBP"), ("gen.png", "PNG")):
        assert main(["generate", "a red circle", "--model", str(tiny_toy_pipeline),
                     "--steps", "1", "--out", str(tmp_path / name)]) == 0
        assert Image.open(tmp_path / name).format == fmt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen.jpg", "gen.png", "gen.webp"]


# --- models ----------------------------------------------------------------------------------


def _copy_with(tiny_toy_pipeline, tmp_path, name, edit) -> Path:
    folder = tmp_path / name
    shutil.copytree(tiny_toy_pipeline, folder)
    edit(folder)
    return folder


def test_unsupported_and_broken_model_folders_are_refused_at_load(
        tiny_toy_pipeline, refused, scene_png, tmp_path):
    image, prompt = scene_png

    def set_class(name):
        def edit(folder):
            index = json.loads((folder / "model_index.json").read_text())
            (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": name}))
        return edit

    img2img = _copy_with(tiny_toy_pipeline, tmp_path, "img2img",
                         set_class("StableDiffusionXLImg2ImgPipeline"))
    odd = _copy_with(tiny_toy_pipeline, tmp_path, "odd", set_class("MyPipeline"))
    bad_toy = _copy_with(tiny_toy_pipeline, tmp_path, "badtoy",
                         lambda f: (f / "toyworld.json").write_text("{oops"))
    bad_index = _copy_with(tiny_toy_pipeline, tmp_path, "badindex",
                           lambda f: (f / "model_index.json").write_text("[1,"))
    out = tmp_path / "out"
    invert = ["invert", image, "--prompt", prompt, "--out", out, "--model"]
    assert refused([*invert, img2img], "StableDiffusionXLImg2ImgPipeline folder (SDXL img2img)",
            "StableDiffusionPipeline (SD 1.x / 2.x), StableDiffusionXLPipeline (SDXL), "
            "StableDiffusion3Pipeline (SD3), FluxPipeline (Flux)")
    assert refused([*invert, odd], "unknown class 'MyPipeline'")
    assert refused([*invert, bad_toy],
                   "toyworld.json (ToyWorld model description) is not valid JSON")
    assert refused([*invert, bad_index], "model_index.json (pipeline index) is not valid JSON")
    assert refused([*invert, image], "is a file; pass the diffusers folder")
    assert refused(["generate", prompt, "--out", out / "g.png", "--model", img2img],
                   "(SDXL img2img)")
    assert not out.exists()


# --- prompts, images and notes ---------------------------------------------------------------


def test_prompts_are_never_truncated_silently(tiny_toy_pipeline, refused, tmp_path):
    long = " and ".join(["a big red circle on the left"] * 12)
    assert refused(["generate", long, "--model", tiny_toy_pipeline, "--out", tmp_path / "g.png"],
            "tokens with BOS/EOS", "reads at most", "shorten it")
    assert refused(["generate", "a cat dog", "--model", tiny_toy_pipeline,
             "--out", tmp_path / "g.png"], "does not know the word(s) cat, dog")


def test_bad_image_files_are_refused(tiny_toy_pipeline, refused, scene_png, tmp_path):
    image, prompt = scene_png
    wide = tmp_path / "images" / "wide.png"
    Image.new("RGB", (32, 16)).save(wide)
    junk = tmp_path / "images" / "junk.png"
    junk.write_text("not an image")
    common = ["--prompt", prompt, "--model", tiny_toy_pipeline, "--out", tmp_path / "out"]
    assert refused(["invert", wide, *common], "the image is 32x16", "crop it to a square")
    assert refused(["invert", junk, *common], f"cannot read {junk} as an image")
    assert refused(["invert", tmp_path / "missing.png", *common], "no image at")


def test_a_16_bit_image_is_scaled_not_clipped():
    from retouch.images import prepare_image

    grey = Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16))
    image, notes = prepare_image(grey, 8)
    assert np.asarray(image)[0, 0].tolist() == [156, 156, 156]  # 40000 / 257, not 255
    assert notes[0] == "scaled the 16-bit image to 8 bits"
    with pytest.raises(ValueError, match="floating-point"):
        prepare_image(Image.new("F", (8, 8)), 8)


def test_edit_says_when_a_word_swap_becomes_a_refinement(tiny_toy_pipeline, scene_png,
                                                          tmp_path, capsys):
    image, _ = scene_png
    code = main(["edit", str(image), "--model", str(tiny_toy_pipeline), "--source", "a circle",
                 "--target", "a big circle", "--steps", "5", "--out", str(tmp_path / "e")])
    assert code == 0
    assert "retouch: note: Prompt-to-Prompt runs as a refinement, not a word swap" in \
        capsys.readouterr().err


# --- the Python API --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    from tiny_models import tiny_model

    return tiny_model("sd1")


def test_api_images_are_checked_as_the_cli_checks_them(model):
    from retouch.inversion import invert

    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    cases = [
        (np.zeros((16, 16, 4), dtype=np.uint8), "drop an alpha channel"),
        (np.zeros((16, 16, 3)), "must be uint8 (0..255), got float64"),
        (np.zeros((8, 8, 3), dtype=np.uint8), "takes 16x16"),
        (Image.new("RGB", (32, 16)), "crop it to a square"),
        ("photo.png", "cannot read a str as images"),
    ]
    for image, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            invert(model, image, "a red square", steps=2, progress=False)
    with pytest.raises(ValueError, match="2 source prompts for 1 image"):
        invert(model, rgb, ["a red square", "a blue square"], steps=2, progress=False)
    with pytest.raises(ValueError, match="empty list"):
        invert(model, rgb, [], steps=2, progress=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        invert(model, Image.new("RGBA", (32, 32)), "a red square", steps=1, progress=False)
    assert {str(w.message) for w in seen if w.category is Note} >= {
        "converted the RGBA image to RGB (alpha dropped)", "resized the 32x32 image to the "
        "model's 16x16"}


def test_api_latents_numbers_and_grids_are_checked(model):
    from retouch.inversion import invert
    from retouch.recipes.edit import sdedit
    from retouch.recipes.generate import generate

    x = torch.zeros(1, 4, 8, 8)
    nan = x.clone()
    nan[0, 1, 2, 3] = float("nan")
    cases = [
        (lambda: invert(model, torch.zeros(1, 3, 8, 8), "a red square"), "has 3 channels"),
        (lambda: invert(model, torch.zeros(1, 4, 7, 8), "a red square"), "multiples of 4"),
        (lambda: invert(model, nan, "a red square"), "1 non-finite value"),
        (lambda: invert(model, x, "a red square", cfg=float("nan")), "cfg must be a finite"),
        (lambda: invert(model, x, "a red square", steps=0), "steps must be at least 1"),
        (lambda: invert(model, x, "a red square", times=torch.tensor([1.0, 500.0])),
         "strictly decreasing"),
        (lambda: generate(model, "a red square", cfg=float("inf")), "cfg must be a finite"),
        (lambda: generate(model, "a red square", steps=2.5), "steps must be a whole number"),
        (lambda: sdedit(model, x, "a red square", strength=float("nan")), "strength must be"),
        (lambda: model.decode(nan), "latents to decode has 1 non-finite"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_api_reconstruct_refuses_a_non_finite_inversion(model):
    from retouch.inversion import invert, reconstruct

    inv = invert(model, torch.zeros(1, 4, 8, 8), "a red square", steps=2, progress=False)
    inv.trajectory[0, 0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="trajectory holds 1 non-finite"):
        reconstruct(inv, model, progress=False)


def test_an_inversion_that_diverges_says_so(model):
    from retouch.inversion import invert

    with pytest.raises(ValueError, match="the ddim inversion it computed: its trajectory holds "
                                         ".* the computation diverged at cfg=1e"):
        invert(model, torch.zeros(1, 4, 8, 8), "a red square", cfg=1e38, steps=3,
               progress=False)


def test_sampling_names_the_part_that_made_nan(model):
    from retouch.samplers import ddim_step, sample

    den = model.denoiser("a red square", cfg=1.0)
    x, times = torch.zeros(1, 4, 8, 8), model.time_grid(3)

    def bad_step(*args):
        return ddim_step(*args) * float("nan")

    def bad_callback(ctx):
        return ctx.x * float("nan")

    with torch.no_grad():
        with pytest.raises(FloatingPointError, match="the bad_step step produced NaN or Inf at "
                                                     "step 0"):
            sample(den, x, times, step=bad_step, progress=False)
        with pytest.raises(FloatingPointError, match="callback .*bad_callback returned NaN"):
            sample(den, x, times, callbacks=[bad_callback], progress=False)
        with pytest.raises(ValueError, match="start latent holds NaN"):
            sample(den, x * float("nan"), times, progress=False)
