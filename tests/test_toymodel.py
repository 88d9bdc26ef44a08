"""The shipped ToyWorld model: loads offline with plain diffusers, is small, and is grounded."""

import numpy as np
import pytest

from retouch.models.pipeline import PipelineModel
from retouch.toyworld.folder import toyworld_model_dir
from retouch.toyworld.render import render
from retouch.toyworld.scene import caption

pytestmark = pytest.mark.toymodel

MAX_SHIPPED_MB = 25


@pytest.fixture(scope="module")
def model():
    return PipelineModel.load()


def test_shipped_weights_are_small_safetensors_and_load_with_plain_diffusers():
    from diffusers import StableDiffusionPipeline

    folder = toyworld_model_dir()
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < MAX_SHIPPED_MB * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".ckpt", ".pt", ".pth")]
    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    out = pipe("a big red circle", num_inference_steps=2, height=64, width=64, output_type="np")
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()


def test_attention_is_local_on_renders(model):
    """Object nouns put most of their cross-attention inside their objects (the grounding)."""
    from retouch.bench.toyworld import attention_mass, benchmark_scenes

    data = benchmark_scenes(8)
    mass = attention_mass(model, data, timesteps=(0.3, 0.6))
    areas = data.masks[:, :2].mean((2, 3))  # (N, 2) object area fractions, 0 if absent
    object_area = float(areas[areas > 0].mean())  # what uniform attention would put inside
    assert object_area < 0.1 and mass > 0.5


def test_coverage_is_measured_at_every_resolution_and_on_the_recipe_maps(model):
    """bench toyworld's coverage: soft and threshold IoU per cross-attention resolution (16, 8
    and the mid block's 4) and for the maps attention_maps returns, object and background
    words apart."""
    from retouch.bench.coverage import measure_coverage
    from retouch.bench.toyworld import benchmark_scenes

    measured = measure_coverage(model, benchmark_scenes(4, extended=True), timesteps=(0.4,),
                                recipe_steps=4)
    assert set(measured) == {"res16", "res8", "res4", "attention_maps"}
    for where, m in measured.items():
        assert m["words"] > 0 and m["background_words"] > 0, where
        for key in ("soft_iou", "threshold_iou", "background_soft_iou"):
            assert 0.0 <= m[key] <= 1.0, (where, key)


def _reconstruction_error(model, method: str) -> float:
    """Relative latent error of inverting a render at CFG 5 and reconstructing it."""
    from retouch.inversion import invert, reconstruct
    from retouch.toyworld.dataset import make_scenes

    scene = make_scenes(1, seed=5, size=64, mask_size=16, progress=False).scenes[0]
    image = render(scene).image
    z = model.encode_image(image)
    inv = invert(model, image, caption(scene).text, method=method, steps=10, cfg=5.0,
                 progress=False)
    rec = reconstruct(inv, model, progress=False)
    return float((rec - z).norm() / z.norm())


@pytest.mark.parametrize("method", ["edict", "bdia", "direct", "ddpm_edit_friendly"])
def test_exact_inversions_reach_the_vae_ceiling_at_cfg_5(model, method):
    assert _reconstruction_error(model, method) < 1e-3


def test_generations_follow_their_prompts(model):
    """The checker reads most attributes of generated images as the prompt asks (the full
    measurement is `retouch bench toyworld`: 0.95 of 256 prompts all right)."""
    from retouch.bench.toyworld import benchmark_scenes, prompt_adherence

    accuracy, scores, images, _ = prompt_adherence(model, benchmark_scenes(8).scenes)
    assert len(scores) == len(images) == accuracy["n"] == 8
    for attr in ("color", "shape", "position", "size", "background"):
        assert accuracy[attr] >= 0.75, attr


def test_vae_round_trips_keep_every_attribute(model):
    """The shipped decoder (fine-tuned with the encoder frozen) decodes renders so that the
    checker reads them as rendered: the ceiling of every adherence and editing measurement."""
    from retouch.bench.toyworld import benchmark_scenes, vae_round_trip

    psnr, all_right = vae_round_trip(model, benchmark_scenes(16))
    assert psnr > 33 and all_right >= 15 / 16


@pytest.fixture(scope="module")
def flow_model():
    return PipelineModel.load("toyworld-flow")


def test_shipped_flow_model_is_small_safetensors_and_loads_with_plain_diffusers():
    """The flow model (an SD3 transformer, two CLIP encoders, no T5) ships beside the UNet."""
    from diffusers import StableDiffusion3Pipeline

    folder = toyworld_model_dir("toyworld-flow")
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < MAX_SHIPPED_MB * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".ckpt", ".pt", ".pth")]
    pipe = StableDiffusion3Pipeline.from_pretrained(str(folder), text_encoder_3=None,
                                                    tokenizer_3=None)
    out = pipe("a big red circle", num_inference_steps=2, height=64, width=64,
               max_sequence_length=8, output_type="np")
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()


def test_flow_generations_follow_their_prompts(flow_model):
    """The full measurement is `retouch bench toyworld --model toyworld-flow`: all attributes
    right on 0.88 of 128 core prompts."""
    from retouch.bench.toyworld import benchmark_scenes, prompt_adherence

    accuracy, scores, images, _ = prompt_adherence(flow_model, benchmark_scenes(8).scenes)
    assert len(scores) == len(images) == accuracy["n"] == 8
    for attr in ("color", "shape", "position", "size", "background"):
        assert accuracy[attr] >= 0.75, attr


@pytest.mark.parametrize("method", ["bdia", "direct", "ddpm_edit_friendly"])
def test_exact_flow_inversions_reach_the_vae_ceiling_at_cfg_5(flow_model, method):
    assert _reconstruction_error(flow_model, method) < 1e-3
