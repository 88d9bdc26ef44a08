"""Shared attention (StyleAligned) on tiny SD1 and SDXL models and on ToyWorld renders."""

import numpy as np
import pytest
import torch

from retouch.attention import BatchLayout, SharedAttention, adain, attention_control
from retouch.recipes.consistency import style_aligned
from tiny_models import tiny_model

PROMPTS = ["a red square", "a blue circle", "a green square"]


def test_adain_gives_each_row_its_references_statistics():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(3, 2, 16, 4, generator=g) * torch.tensor([1.0, 3.0, 0.5]).view(3, 1, 1, 1)
    out = adain(f, torch.tensor([0, 0, 0]))
    torch.testing.assert_close(out[0], f[0], rtol=1e-5, atol=1e-5)  # the reference: unchanged
    for r in (1, 2):
        torch.testing.assert_close(out[r].mean(-2), f[0].mean(-2), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out[r].std(-2), f[0].std(-2), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_the_reference_is_generated_as_it_would_be_alone(kind):
    model = tiny_model(kind)
    shared = style_aligned(model, PROMPTS, steps=4, cfg=3.0, seed=1)
    alone = style_aligned(model, PROMPTS, steps=4, cfg=3.0, seed=1, share=False)
    assert np.abs(shared[0].astype(int) - alone[0].astype(int)).max() <= 1
    assert np.abs(shared[1:].astype(int) - alone[1:].astype(int)).max() > 1  # the others move


@pytest.mark.parametrize("kind", ["sd3", "flux"])
@pytest.mark.parametrize("shift", [0.0, -1.0])  # SDPA, and the probabilities path
def test_the_reference_is_generated_as_alone_on_joint_attention(kind, shift):
    """On an MMDiT the image keys share the joint softmax with the text keys: the appended
    reference keys leave the text's share as it was, so the reference row is unchanged."""
    from retouch.attention import guidance_halves
    from retouch.models.flux import FluxModel
    from retouch.models.sd3 import SD3Model
    from retouch.samplers import sample
    from tiny_models import tiny_flux_pipeline, tiny_sd3_pipeline

    model = SD3Model(tiny_sd3_pipeline()) if kind == "sd3" else FluxModel(tiny_flux_pipeline())
    den = model.denoiser(PROMPTS, cfg=3.0)
    times = model.time_grid(4)
    noise = torch.randn(model.latent_shape(3), generator=torch.Generator().manual_seed(1))
    layout = BatchLayout(("reference", "image", "image"), guidance_halves(den))
    with torch.no_grad():
        alone = sample(den, noise, times, progress=False)
        with attention_control(model.network, [SharedAttention(score_shift=shift)],
                               layout=layout) as session:
            shared = sample(session.denoiser(den, times), noise, times, progress=False)
    torch.testing.assert_close(shared[0], alone[0], rtol=1e-5, atol=1e-5)
    assert (shared[1:] - alone[1:]).abs().max() > 1e-3  # the others take the reference's


def test_sharing_with_no_weight_on_the_reference_changes_nothing():
    model = tiny_model("sd1")
    off = style_aligned(model, PROMPTS, steps=4, cfg=3.0, seed=2, adain_queries=False,
                        adain_keys=False, score_shift=-1e4, share_group_norm=False)
    alone = style_aligned(model, PROMPTS, steps=4, cfg=3.0, seed=2, share=False)
    assert np.abs(off.astype(int) - alone.astype(int)).max() <= 1


def test_a_real_reference_follows_its_inversion():
    from retouch.inversion import invert

    model = tiny_model("sd1")
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    inv = invert(model, image, PROMPTS[0], method="ddim", steps=4, cfg=3.0, progress=False)
    out = style_aligned(model, PROMPTS, steps=4, cfg=3.0, reference_inversion=inv)
    want = model.decode(inv.trajectory[-1])[0]
    assert np.abs(out[0].astype(int) - want.astype(int)).max() <= 1
    with pytest.raises(ValueError, match="invert one image with steps=6"):
        style_aligned(model, PROMPTS, steps=6, cfg=3.0, reference_inversion=inv)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="score_scale must be a positive number"):
        SharedAttention(score_scale=0.0)
    with pytest.raises(ValueError, match="at least one more"):
        style_aligned(tiny_model("sd1"), ["a red square"])
    with pytest.raises(ValueError, match="no row has role 'reference'"):
        from tiny_models import tiny_unet

        unet = tiny_unet("sd1")
        with attention_control(unet, [SharedAttention()], layout=BatchLayout(("a", "b"))) as s:
            with torch.no_grad(), s.at_step(0, 500.0, num_steps=1, latent_hw=(8, 8)):
                unet(torch.zeros(4, 4, 8, 8), 500, encoder_hidden_states=torch.zeros(4, 5, 32))


def test_identical_prompts_from_shared_noise_give_identical_images_with_or_without_sharing():
    model = tiny_model("sd1")
    same = ["a red square"] * 3
    shared = style_aligned(model, same, steps=4, cfg=3.0, seed=3, shared_noise=True)
    plain = style_aligned(model, same, steps=4, cfg=3.0, seed=3, shared_noise=True, share=False)
    assert np.abs(shared.astype(int) - plain.astype(int)).max() <= 1
    assert np.abs(shared[1:].astype(int) - shared[0].astype(int)).max() <= 1


def test_style_aligned_cli_writes_the_batch(tiny_toy_pipeline, tmp_path, capsys):
    from PIL import Image

    from retouch.cli import main
    from retouch.toyworld.render import render
    from retouch.toyworld.scene import ObjectSpec, Scene

    model = ["--model", str(tiny_toy_pipeline), "--steps", "3"]
    prompts = ["a big red circle on the left", "a small blue square on the right"]
    assert main(["style-aligned", *prompts, *model, "--out", str(tmp_path / "g")]) == 0
    assert Image.open(tmp_path / "g" / "batch.png").size == (128, 64)
    ref = tmp_path / "ref.png"
    scene = Scene((ObjectSpec("circle", "red", "big", "left"),))
    Image.fromarray(render(scene, 64).image).save(ref)
    assert main(["style-aligned", *prompts, "--reference", str(ref), *model,
                 "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "image_001.png").exists()
    assert main(["style-aligned", *prompts, "--option", "colour=1", *model,
                 "--out", str(tmp_path / "no")]) == 2
    assert "--option" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()
