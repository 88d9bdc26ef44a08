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
