"""Loading model folders safely, the pipeline adapter, generation, and the demo."""

import json
import shutil

import numpy as np
import pytest
import torch

from retouch.models.loading import ModelFolderError, check_model_folder, load_pipeline
from retouch.models.pipeline import PipelineModel
from retouch.recipes.generate import generate


def test_plain_diffusers_loads_and_generates(tiny_toy_pipeline):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_toy_pipeline))
    assert {p.dtype for p in pipe.unet.parameters()} == {torch.float32}
    assert pipe.text_encoder.dtype == torch.float32
    out = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np")
    assert out.images.shape == (1, 64, 64, 3)
    assert json.loads((tiny_toy_pipeline / "toyworld.json").read_text())["vocabulary"]


def test_generate_is_seeded_and_shaped(tiny_toy_pipeline):
    model = PipelineModel.load(tiny_toy_pipeline)
    prompts = ["a red circle", "a big blue square on the left on a black background"]
    a = generate(model, prompts, steps=3, seed=5, progress=False)
    b = generate(model, prompts, steps=3, seed=5, progress=False)
    c = generate(model, prompts, steps=3, seed=6, progress=False)
    assert a.shape == (2, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_out_of_vocabulary_prompt_is_refused_naming_words(tiny_toy_pipeline):
    model = PipelineModel.load(tiny_toy_pipeline)
    with pytest.raises(ValueError, match="does not know the word.*dog, pink.*vocabulary is"):
        model.encode_prompt("a pink dog")
    with pytest.raises(ValueError, match="unknown sampler 'nope'.*ddim"):
        generate(model, "a red circle", steps=2, sampler="nope", progress=False)


def test_time_grid_follows_the_scheduler_config(tiny_toy_pipeline):
    model = PipelineModel.load(tiny_toy_pipeline)
    # leading spacing, steps_offset 1, set_alpha_to_one False -> last step to t = 0
    assert model.time_grid(4).tolist() == [751.0, 501.0, 251.0, 1.0, 0.0]


def test_missing_corrupt_and_pickle_files_are_named(tiny_toy_pipeline, tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist"):
        check_model_folder(tmp_path / "nope")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_toy_pipeline, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"\x00garbage")
    shutil.rmtree(broken / "scheduler")
    with pytest.raises(ModelFolderError) as err:
        load_pipeline(broken)
    assert "corrupt weights file" in str(err.value) and str(weights) in str(err.value)
    assert "missing folder" in str(err.value) and "scheduler" in str(err.value)
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_toy_pipeline, pickled)
    weights = pickled / "vae" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ModelFolderError, match="only pickle weights.*refuses"):
        check_model_folder(pickled)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFolderError, match="model_index.json is missing"):
        check_model_folder(tmp_path / "empty")


def test_demo_writes_a_self_contained_gallery(tiny_toy_pipeline, tmp_path):
    from retouch.report.demo import run_demo

    index = run_demo(tmp_path / "demo", model=str(tiny_toy_pipeline), n=2)
    html = index.read_text()
    for title in ("Text-to-image", "Samplers", "Inversion", "Where each word looks",
                  "FlowEdit", "Self-guidance", "Panoramas and regions"):
        assert f"<h2>{title}" in html
    assert html.count("checker:") == 2  # one verdict per generated image
    assert "src='http" not in html and "data:image/png;base64," in html  # self-contained


def test_demo_flowedit_section_runs_on_a_flow_model(tiny_flow_pipeline):
    """The demo's FlowEdit section on the shipped flow model, here on a tiny one."""
    from retouch.models.pipeline import PipelineModel
    from retouch.report.demo import _flowedit_section

    section = _flowedit_section(PipelineModel.load(tiny_flow_pipeline), n=2)
    assert "flow model" in section.title and len(section.figures) == 2
    assert "--model toyworld-flow" in section.see


def test_model_names_the_shipped_models_and_an_existing_path_wins(tmp_path, monkeypatch):
    from retouch.models.loading import ModelFolderError, check_model_folder
    from retouch.toyworld.folder import model_folder, shipped_name, toyworld_model_dir

    assert model_folder(None) == toyworld_model_dir() == model_folder("toyworld")
    assert model_folder("toyworld-flow") == toyworld_model_dir("toyworld-flow")
    assert shipped_name(model_folder("toyworld-flow")) == "toyworld-flow"
    assert shipped_name(tmp_path) is None and shipped_name(None) is None
    monkeypatch.chdir(tmp_path)
    (tmp_path / "toyworld-flow").mkdir()  # a user's own folder of that name is read instead
    assert model_folder("toyworld-flow").resolve() == tmp_path / "toyworld-flow"
    with pytest.raises(ValueError, match="no shipped model is called 'flux'"):
        toyworld_model_dir("flux")
    with pytest.raises(ModelFolderError, match="does not exist.*toyworld, toyworld-flow"):
        check_model_folder(model_folder("toyworld-flux"))


def test_only_toyworld_json_says_whether_a_model_learnt_the_extended_words(tmp_path):
    from pathlib import Path

    from retouch.toyworld.folder import toyworld_extended, toyworld_model_dir, toyworld_vocabulary

    core = Path(__file__).parents[1] / "checkpoints" / "toyworld-core"
    assert "striped" in toyworld_vocabulary(core)  # its tokenizer knows the word ...
    assert not toyworld_extended(core)  # ... but the core model never learnt it
    assert toyworld_extended(toyworld_model_dir())
    assert not toyworld_extended(tmp_path) and not toyworld_extended(None)


def test_a_model_recommends_its_guidance_scale_in_toyworld_json(tmp_path):
    """The shipped model recommends the scale its benchmark found best; a folder without a
    recommendation gets the default; a broken one is refused naming the value."""
    from retouch.toyworld.folder import DEFAULT_GUIDANCE, generation_guidance, toyworld_model_dir

    assert generation_guidance(toyworld_model_dir()) == generation_guidance(None) == 3.0
    assert generation_guidance("toyworld") == 3.0  # a shipped model's name, as --model takes it
    assert generation_guidance(tmp_path) == DEFAULT_GUIDANCE
    for bad in (0.5, "3", float("inf")):
        (tmp_path / "toyworld.json").write_text(json.dumps({"guidance_scale": bad}))
        with pytest.raises(ValueError, match="guidance_scale .* must be a finite number >= 1"):
            generation_guidance(tmp_path)


def test_generate_without_a_scale_uses_the_one_the_model_recommends(tiny_toy_pipeline,
                                                                    tmp_path, monkeypatch):
    """`retouch generate` without --cfg samples at toyworld.json's guidance_scale."""
    import retouch.recipes.generate as recipe

    folder = tmp_path / "pipe"
    shutil.copytree(tiny_toy_pipeline, folder)
    info = json.loads((folder / "toyworld.json").read_text())
    (folder / "toyworld.json").write_text(json.dumps({**info, "guidance_scale": 2.5}))
    used = []

    def fake_generate(model, prompts, *, cfg, **kw):
        used.append(cfg)
        return np.zeros((len(prompts), 8, 8, 3), np.uint8)

    monkeypatch.setattr(recipe, "generate", fake_generate)
    recipe.generate_to_file("a red circle", tmp_path / "a.png", model=folder)
    recipe.generate_to_file("a red circle", tmp_path / "b.png", model=folder, cfg=4.0)
    assert used == [2.5, 4.0]
    # the command line leaves the scale to the model unless --cfg names one
    from retouch.cli import build_parser

    command = ["generate", "a red circle", "--out", "a.png"]
    assert build_parser().parse_args(command).cfg is None
    assert build_parser().parse_args([*command, "--cfg", "4"]).cfg == 4.0


def test_generate_samples_at_the_recommended_scale_when_given_none(tiny_toy_pipeline, tmp_path):
    """The library's generate() takes cfg=None as the model's recommendation: the same image
    as that scale named; a model built in memory (no folder) gets DEFAULT_GUIDANCE."""
    from retouch.models.pipeline import PipelineModel
    from retouch.recipes.generate import generate, recommended_cfg
    from retouch.toyworld.folder import DEFAULT_GUIDANCE

    folder = tmp_path / "pipe"
    shutil.copytree(tiny_toy_pipeline, folder)
    info = json.loads((folder / "toyworld.json").read_text())
    (folder / "toyworld.json").write_text(json.dumps({**info, "guidance_scale": 2.5}))
    model = PipelineModel.load(folder)
    assert recommended_cfg(model) == 2.5
    kw = dict(steps=2, seed=3, progress=False)
    assert np.array_equal(generate(model, "a red circle", **kw),
                          generate(model, "a red circle", cfg=2.5, **kw))
    assert not np.array_equal(generate(model, "a red circle", **kw),
                              generate(model, "a red circle", cfg=DEFAULT_GUIDANCE, **kw))
    model.folder = None
    assert recommended_cfg(model) == DEFAULT_GUIDANCE


def test_an_export_records_the_guidance_scale_it_is_given(tiny_toy_run, tmp_path):
    from retouch.toyworld.folder import generation_guidance
    from retouch.training.export import export_pipeline

    for bad in (0.5, True, "3", float("nan")):
        with pytest.raises(ValueError, match="--guidance-scale .* must be a finite number >= 1"):
            export_pipeline(tiny_toy_run, tmp_path / "refused", guidance_scale=bad)
    assert not (tmp_path / "refused").exists() and not (tmp_path / "refused.tmp").exists()
    assert generation_guidance(export_pipeline(tiny_toy_run, tmp_path / "p",
                                               guidance_scale=2.5)) == 2.5
    # exporting over it without a scale drops the old weights' recommendation, saying so
    with pytest.warns(UserWarning, match="recommended guidance scale 2.5 for its old weights"):
        export_pipeline(tiny_toy_run, tmp_path / "p")
    assert "guidance_scale" not in json.loads((tmp_path / "p" / "toyworld.json").read_text())
    from retouch.cli import build_parser

    args = build_parser().parse_args(["toyworld", "export", "run", "--guidance-scale", "2.5"])
    assert args.guidance_scale == 2.5


def test_benchmarks_name_the_weights_they_measured(tmp_path):
    """A benchmark's model label carries the SHA-256 prefix of the denoiser weights, so a result
    stays attributable after the shipped weights change."""
    import hashlib

    from retouch.bench.common import model_label
    from retouch.toyworld.folder import toyworld_model_dir, weights_fingerprint

    unet = toyworld_model_dir() / "unet" / "diffusion_pytorch_model.safetensors"
    digest = hashlib.sha256(unet.read_bytes()).hexdigest()[:12]
    assert model_label(None) == f"shipped toyworld (denoiser sha256 {digest})"
    assert weights_fingerprint(tmp_path) == "unknown"
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "a.safetensors").write_bytes(b"x")
    assert weights_fingerprint(tmp_path) == hashlib.sha256(b"x").hexdigest()[:12]
    assert model_label(tmp_path).startswith(f"{tmp_path} (denoiser sha256 ")


def test_an_extended_export_says_what_a_caption_without_a_style_word_asks(tiny_toy_run,
                                                                           tmp_path):
    """``toyworld.json`` records the grammar the run trained: ``any`` fill style with
    ``--free-style``, ``solid`` (the older grammar) without."""
    from retouch.training.export import export_pipeline

    for free_style, omitted in ((0.25, "any"), (0.0, "solid")):
        run = tmp_path / f"run{free_style}"
        shutil.copytree(tiny_toy_run, run)
        config = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps({**config, "extended": True,
                                                     "free_style": free_style}))
        info = json.loads((export_pipeline(run, tmp_path / f"pipe{free_style}")
                           / "toyworld.json").read_text())
        assert info["style_omitted"] == omitted
    core = json.loads((export_pipeline(tiny_toy_run, tmp_path / "core") / "toyworld.json")
                      .read_text())
    assert "style_omitted" not in core  # no style words at all
