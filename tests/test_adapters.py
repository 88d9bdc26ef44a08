"""Model adapters against diffusers' own pipelines, and SDXL through every layer.

Generation with retouch's loop equals the diffusers pipeline's output for the same start
latents and scheduler on tiny SD1, SD2-v and SDXL; the exact inversions reconstruct on SDXL
in float64; identical-prompt Prompt-to-Prompt gives the source on SDXL; an SDXL folder runs
through the command line.
"""

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from retouch.inversion import invert, reconstruct
from retouch.models.conditioning import Conditioning
from retouch.models.pipeline import PipelineModel
from retouch.models.sdxl import SDXLModel
from retouch.samplers import ddim_step, sample
from tiny_models import tiny_model, tiny_model_f64

PROMPT, STEPS, CFG = "a red square", 4, 3.0


def _diffusers_pipeline(model: PipelineModel):
    """The diffusers pipeline made of the same parts as ``model``."""
    p = model.pipe
    common = dict(vae=p.vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer, unet=p.unet,
                  scheduler=diffusers.DDIMScheduler.from_config(p.scheduler.config))
    if isinstance(model, SDXLModel):
        return diffusers.StableDiffusionXLPipeline(
            **common, text_encoder_2=p.text_encoder_2, tokenizer_2=p.tokenizer_2,
            force_zeros_for_empty_prompt=True)
    return diffusers.StableDiffusionPipeline(**common, safety_checker=None,
                                             feature_extractor=None,
                                             requires_safety_checker=False)


@torch.no_grad()
@pytest.mark.parametrize("kind", ["sd1", "sd2v", "sdxl"])
def test_generation_equals_the_diffusers_pipeline(kind):
    model = tiny_model(kind)
    pipe = _diffusers_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(model.latent_shape(1), generator=torch.Generator().manual_seed(0))
    size = model.image_size
    want = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=CFG, latents=noise.clone(),
                output_type="latent", height=size, width=size).images
    times = model.time_grid(STEPS)
    got = sample(model.denoiser(PROMPT, cfg=CFG), noise * pipe.scheduler.init_noise_sigma,
                 times, step=ddim_step, progress=False)
    rel = float((got - want).norm() / want.norm())
    assert rel <= 1e-4, rel


def test_sdxl_conditioning_has_pooled_embeddings_and_size_ids():
    model = tiny_model("sdxl")
    cond = model.encode(["a red square", "a blue circle"])
    assert isinstance(cond, Conditioning) and cond.rows == 2
    assert cond.embeds.shape[-1] == model.unet.config.cross_attention_dim
    s = model.image_size
    assert cond.added["time_ids"].tolist() == [[s, s, 0, 0, s, s]] * 2
    empty = model.encode_negative([""])
    assert not empty.embeds.any() and not empty.added["text_embeds"].any()
    both = Conditioning.cat([cond, empty.expand(2)])
    assert both.rows == 4 and both[3].added["time_ids"].shape == (1, 6)
    with pytest.raises(ValueError, match="needs added conditions"):
        model.denoiser(cond.embeds, cfg=1.0)


@pytest.mark.parametrize("method", ["edict", "bdia", "ddpm_edit_friendly", "direct"])
def test_exact_inversions_reconstruct_on_sdxl(method):
    model = tiny_model_f64("sdxl")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    inv = invert(model, x, PROMPT, method=method, steps=6, cfg=CFG, progress=False)
    rec = reconstruct(inv, model, progress=False)
    err = float((rec - x).norm() / x.norm())
    assert err <= 1e-5, err


def test_identical_prompt_p2p_reproduces_the_source_on_sdxl():
    from retouch.recipes.edit import edit

    model = tiny_model_f64("sdxl")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    result = edit(model, x, PROMPT, PROMPT, inversion="bdia", editor="p2p", steps=6, cfg=CFG)
    assert np.array_equal(result.edited, result.source)


def test_an_sdxl_folder_runs_through_the_command_line(tmp_path, capsys):
    from retouch.cli import main

    model = tiny_model("sdxl")
    folder = tmp_path / "sdxl"
    _diffusers_pipeline(model).save_pretrained(folder, safe_serialization=True)
    loaded = PipelineModel.load(folder)
    assert isinstance(loaded, SDXLModel)
    assert main(["generate", PROMPT, "--model", str(folder), "--steps", "2",
                 "--out", str(tmp_path / "g.png")]) == 0
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "in.png")
    assert main(["invert", str(tmp_path / "in.png"), "--model", str(folder), "--prompt", PROMPT,
                 "--method", "bdia", "--steps", "2", "--out", str(tmp_path / "inv")]) == 0
    assert main(["edit", str(tmp_path / "in.png"), "--model", str(folder), "--source", PROMPT,
                 "--target", "a blue square", "--steps", "3", "--out", str(tmp_path / "e")]) == 0
    assert main(["attention", "--prompt", PROMPT, "--model", str(folder), "--steps", "2",
                 "--out", str(tmp_path / "a")]) == 0
    import shutil

    shutil.rmtree(folder / "text_encoder_2")
    capsys.readouterr()
    assert main(["generate", PROMPT, "--model", str(folder), "--out",
                 str(tmp_path / "h.png")]) == 2
    err = capsys.readouterr().err
    assert f"missing folder {folder / 'text_encoder_2'}" in err and len(err.splitlines()) == 1


def test_an_edit_encodes_each_prompt_once():
    from retouch.recipes.edit import edit

    model = tiny_model("sd1")
    calls = []
    hook = model.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
        edit(model, x, PROMPT, "a blue square", inversion="direct", editor="p2p", steps=4)
    finally:
        hook.remove()
    assert len(calls) == 3  # source, empty negative, target


def test_conditioning_rows_are_kept_consistent():
    model = tiny_model("sdxl")
    cond = model.encode(["a red square", "a blue circle", "a green square"])
    assert cond[-1].rows == 1 and cond[-1].added["text_embeds"].shape[0] == 1
    torch.testing.assert_close(cond[-1].embeds, cond.embeds[2:])
    with pytest.raises(ValueError, match="cannot put 6 rows of embeddings into a conditioning "
                                         "of 3 rows"):
        cond.with_embeds(torch.zeros(6, *cond.embeds.shape[1:]))
    one = cond.with_embeds(cond.embeds[:1])  # one row shared by all three
    assert one.rows == 3 and one.added["text_embeds"].shape[0] == 3
    wide = model.encode(["a red square"]).with_embeds(cond.embeds)
    assert wide.rows == 3 and wide.added["time_ids"].shape[0] == 3


def test_sdxl_keeps_its_added_conditions_under_an_embedding_override():
    model = tiny_model("sdxl")
    cond = model.encode(["a red square"])
    den = model.unet_denoiser(cond)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(den(x, 500.0, encoder_hidden_states=cond.embeds), den(x, 500.0))


def test_image_tensors_are_checked_for_range_and_size():
    model = tiny_model("sd1")
    with pytest.raises(ValueError, match=r"values in \[-1, 1\], got up to 255"):
        model.encode_image(torch.full((1, 3, 16, 16), 255.0))
    with pytest.raises(ValueError, match="this model takes 16x16"):
        model.encode_image(torch.zeros(1, 3, 8, 8))
