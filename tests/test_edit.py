"""edit_generated on tiny random SD1.x, SD2-v and SDXL pipelines (same code path for all)."""

import functools
from types import SimpleNamespace

import diffusers
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from retouch.denoiser import CFGDenoiser
from retouch.models.pipeline import PipelineModel
from retouch.models.unet import UNetDenoiser
from retouch.recipes.edit import edit_generated
from test_attention import TEXT_DIM, TOKENS, tiny_tokenizer, tiny_unet

STEPS = 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class SDXLModel(PipelineModel):
    """A PipelineModel whose denoiser adds SDXL's pooled-text and size conditioning."""

    def _added(self, prompts):
        ids = self.tokenizer(prompts, padding="max_length", max_length=TOKENS,
                             return_tensors="pt").input_ids
        pooled = self.text_encoder(ids)[1]  # (B, TEXT_DIM)
        size = self.image_size
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)
        return {"text_embeds": pooled, "time_ids": time_ids.expand(len(prompts), -1)}

    @torch.no_grad()
    def denoiser(self, prompts, *, cfg=5.0, negative=""):
        cond = {"encoder_hidden_states": self.encode_prompt(prompts),
                "added_cond_kwargs": self._added(prompts)}
        uncond = {"encoder_hidden_states": self.encode_prompt(negative),
                  "added_cond_kwargs": self._added([negative])}
        inner = UNetDenoiser(self.unet, self.schedule, prediction_type=self.prediction_type)
        return CFGDenoiser(inner, cond=cond, uncond=uncond, scale=cfg)


@functools.cache
def tiny_model(kind: str) -> PipelineModel:
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=TOKENS, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()
    vae = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8, sample_size=16).eval()
    scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
        prediction_type="v_prediction" if kind == "sd2v" else "epsilon")
    pipe = SimpleNamespace(unet=tiny_unet(kind), vae=vae, tokenizer=tok, text_encoder=text,
                           scheduler=scheduler)
    return (SDXLModel if kind == "sdxl" else PipelineModel)(pipe)


def run(kind="sd1", source="a red square", target="a blue square", **kw):
    kw.setdefault("steps", STEPS)
    kw.setdefault("cfg", 3.0)
    return edit_generated(tiny_model(kind), source, target, **kw)


@pytest.mark.parametrize(("editor", "options"), [
    ("p2p", {}),
    ("masactrl", {"start_step": 1, "start_layer": 3}),
    ("pnp", {}),
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
    with pytest.raises(TypeError, match="start_step"):
        run(editor="p2p", start_step=2)
    with pytest.raises(ValueError, match="unknown editor 'magic'"):
        run(editor="magic")
    with pytest.raises(RuntimeError, match="never called"):  # default S = 4 of 4 steps
        run(editor="masactrl", start_layer=0)
