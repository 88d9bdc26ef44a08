"""Appearance transfer by cross-image attention, on tiny SD1 and SDXL models."""

import json

import numpy as np
import pytest
import torch

from retouch.attention import BatchLayout, CrossImageAttention
from retouch.attention.control import AttnCall
from retouch.attention.sites import Site
from retouch.recipes.transfer import adain_latents, appearance_transfer
from retouch.samplers import ddim_step, sample
from tiny_models import tiny_model

SITE = Site("up_blocks.1.attentions.0.transformer_blocks.0.attn1", "self", "up", 1, 1, 8, 3, 1)
LAYOUT = BatchLayout(("appearance", "structure", "output"), ("cond",))


def _call(step: int, num_steps: int = 10) -> AttnCall:
    return AttnCall(step=step, t=500.0, num_steps=num_steps, layout=LAYOUT, latent_hw=(8, 8),
                    site=SITE, hw=(8, 8), heads=2)


def test_the_output_reads_the_appearance_and_periodically_the_structure():
    ctrl = CrossImageAttention(structure_every=5, structure_until=0.4)
    assert ctrl.bind([SITE]) == [SITE]  # the finest decoder resolution: rank 0
    q, k, v = (torch.randn(3, 2, 64, 4, generator=torch.Generator().manual_seed(i))
               for i in range(3))
    _, k1, v1 = ctrl.qkv(_call(1), q, k, v)
    assert torch.equal(k1[2], k[0]) and torch.equal(v1[2], v[0])
    assert torch.equal(k1[:2], k[:2])  # the inputs keep their own
    _, k5, _ = ctrl.qkv(_call(0), q, k, v)  # step 0: a structure step
    assert torch.equal(k5[2], k[1])
    assert ctrl.active(_call(1)) and not ctrl.active(_call(9))  # factor 1: steps 0.1-0.9


def test_attention_contrast_follows_the_formula_and_one_leaves_it():
    p = torch.softmax(torch.randn(3, 2, 16, 16, generator=torch.Generator().manual_seed(0)), -1)
    assert torch.equal(CrossImageAttention(contrast=1.0).probs(_call(1), p), p)
    out = CrossImageAttention(contrast=2.0).probs(_call(1), p)
    mean = p[2].mean(-1, keepdim=True)
    torch.testing.assert_close(out[2], ((p[2] - mean) * 2 + mean).clamp(0, 1))
    assert torch.equal(out[:2], p[:2])


def test_adain_of_latents_takes_the_references_channel_statistics():
    x, ref = torch.randn(4, 8, 8), torch.randn(4, 8, 8) * 3 + 1
    out = adain_latents(x, ref)
    torch.testing.assert_close(out.mean((-2, -1)), ref.mean((-2, -1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std((-2, -1)), ref.std((-2, -1)), atol=1e-3, rtol=1e-3)


def _images():
    rng = np.random.default_rng(0)
    return (rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
            rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))


def test_with_every_part_off_the_output_is_the_structures_regeneration():
    from retouch.inversion import invert

    model = tiny_model("sd1")
    struct, app = _images()
    off = appearance_transfer(model, struct, app, structure_prompt="a red square",
                              appearance_prompt="a blue circle", steps=4, cfg=3.0,
                              inversion="ddim", swap_guidance=1.0, adain_steps=(1.0, 1.0),
                              cross_image=False)
    inv = invert(model, struct, "a red square", steps=4, cfg=3.0, progress=False)
    with torch.no_grad():
        x = sample(model.denoiser(["a red square"], cfg=3.0), inv.trajectory[0], inv.times,
                   step=ddim_step)
    want = model.decode(x)[0]
    assert np.abs(off.output.astype(int) - want.astype(int)).max() <= 1


def test_after_edit_friendly_inversion_the_output_follows_the_structures_noise_maps():
    # Every part off and the structure's own prompt: the output row makes the same calls as the
    # structure's row with the same noise maps, so it lands on the structure image itself.
    model = tiny_model("sd1")
    struct, app = _images()
    off = appearance_transfer(model, struct, app, structure_prompt="a red square",
                              appearance_prompt="a blue circle", steps=4, cfg=3.0,
                              inversion="ddpm_edit_friendly", swap_guidance=1.0,
                              adain_steps=(1.0, 1.0), cross_image=False)
    assert np.abs(off.output.astype(int) - off.structure.astype(int)).max() <= 1
    assert np.abs(off.output.astype(int) - off.appearance.astype(int)).max() > 1
    skipped = appearance_transfer(model, struct, app, structure_prompt="a red square",
                                  appearance_prompt="a blue circle", steps=4, cfg=3.0,
                                  skip=0.5, swap_guidance=1.0, adain_steps=(1.0, 1.0),
                                  cross_image=False)  # from the structure's latent at step 2
    assert np.abs(skipped.output.astype(int) - off.structure.astype(int)).max() <= 1
    with pytest.raises(ValueError, match="sampler='ddpm'.*noise maps"):
        appearance_transfer(model, struct, app, structure_prompt="a red square",
                            appearance_prompt="a blue circle", inversion="ddpm_edit_friendly",
                            sampler="ddpm")


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_transfer_moves_the_output_and_keeps_the_inputs_on_their_inversions(kind):
    model = tiny_model(kind)
    struct, app = _images()
    common = dict(structure_prompt="a red square", appearance_prompt="a blue circle", steps=4,
                  cfg=3.0)
    on = appearance_transfer(model, struct, app, **common)
    off = appearance_transfer(model, struct, app, **common, swap_guidance=1.0,
                              adain_steps=(1.0, 1.0), cross_image=False)
    unswapped = appearance_transfer(model, struct, app, **common, swap_guidance=1.0)
    assert np.abs(on.output.astype(int) - off.output.astype(int)).max() > 1
    assert np.abs(on.output.astype(int) - unswapped.output.astype(int)).max() > 1
    assert np.abs(on.structure.astype(int) - off.structure.astype(int)).max() <= 1


def test_bad_transfer_options_are_refused():
    model = tiny_model("sd1")
    struct, app = _images()
    common = dict(structure_prompt="a red square", appearance_prompt="a blue circle")
    with pytest.raises(ValueError, match="contrast must be a positive number"):
        appearance_transfer(model, struct, app, **common, contrast=0.0)
    with pytest.raises(ValueError, match="swap_guidance must be"):
        appearance_transfer(model, struct, app, **common, swap_guidance=0.5)
    with pytest.raises(ValueError, match="differ in size"):
        appearance_transfer(model, struct, app[:8, :8], **common)
    with pytest.raises(ValueError, match=r"skip must be a share of the steps in \[0, 1\)"):
        appearance_transfer(model, struct, app, **common, skip=1.0)
    with pytest.raises(ValueError, match="leaves no step to run"):
        appearance_transfer(model, struct, app, **common, steps=2, skip=0.9)


def test_transfer_cli_writes_the_output(tiny_toy_pipeline, tmp_path, capsys):
    from PIL import Image

    from retouch.cli import main
    from retouch.toyworld.render import render
    from retouch.toyworld.scene import ObjectSpec, Scene

    paths = []
    for i, (shape, colour) in enumerate((("circle", "red"), ("square", "blue"))):
        paths.append(tmp_path / f"in{i}.png")
        scene = Scene((ObjectSpec(shape, colour, "big", "left"),))
        Image.fromarray(render(scene, 64).image).save(paths[-1])
    common = [str(paths[0]), str(paths[1]), "--structure-prompt", "a big red circle on the left",
              "--appearance-prompt", "a big blue square on the left", "--steps", "3",
              "--model", str(tiny_toy_pipeline)]
    assert main(["transfer", *common, "--out", str(tmp_path / "t")]) == 0
    assert Image.open(tmp_path / "t" / "output.png").size == (64, 64)
    tuned = ["--cfg", "1", "--inversion-cfg", "5", "--swap-guidance", "6", "--structure-every", "0"]
    assert main(["transfer", *common, *tuned, "--out", str(tmp_path / "tuned")]) == 0
    report = json.loads((tmp_path / "tuned" / "transfer.json").read_text())
    assert (report["cfg"], report["inversion_cfg"], report["structure_every"]) == (1.0, 5.0, 0)
    assert main(["transfer", *common, "--contrast", "0", "--out", str(tmp_path / "no")]) == 2
    assert "contrast must be a positive number" in capsys.readouterr().err
    assert main(["transfer", *common, "--out", str(paths[0])]) == 2  # a file, not a folder
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("inversion", ["direct", "edict", "bdia", "ddpm_edit_friendly"])
def test_transfer_takes_any_inversion_and_keeps_the_inputs_on_it(inversion):
    from retouch.inversion import invert

    model = tiny_model("sd1")
    struct, app = _images()
    out = appearance_transfer(model, struct, app, structure_prompt="a red square",
                              appearance_prompt="a blue circle", steps=4, cfg=3.0,
                              inversion=inversion)
    inv = invert(model, np.stack([app, struct]), ["a blue circle", "a red square"],
                 method=inversion, steps=4, cfg=3.0, progress=False)
    want = model.decode(inv.trajectory[-1])
    assert np.abs(out.appearance.astype(int) - want[0].astype(int)).max() <= 1
    assert np.abs(out.structure.astype(int) - want[1].astype(int)).max() <= 1
