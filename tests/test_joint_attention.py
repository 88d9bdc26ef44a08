"""Attention control on SD3's and Flux's joint attention: sites and views, a controller that
changes nothing changes nothing, cross-attention maps over the text tokens, and editors that
reproduce the source with identical prompts."""

import functools

import pytest
import torch

from retouch.attention import AttentionStore, BatchLayout, Controller, attention_control
from retouch.attention.sites import find_sites, site_views
from retouch.models.flux import FluxModel
from retouch.models.sd3 import SD3Model
from retouch.recipes.edit import edit_generated
from retouch.samplers import sample
from tiny_models import tiny_flux_pipeline, tiny_sd3_pipeline

PROMPT = "a red square"
FAMILIES = ("sd3", "flux")


@functools.cache
def model(kind: str = "sd3"):
    return SD3Model(tiny_sd3_pipeline()) if kind == "sd3" else FluxModel(tiny_flux_pipeline())


def start(rows: int = 1, kind: str = "sd3") -> torch.Tensor:
    noise = torch.randn(model(kind).latent_shape(1), generator=torch.Generator().manual_seed(3))
    return noise.expand(rows, *noise.shape[1:]).clone()


class Idle(Controller):
    """Acts at every view, reads the probabilities and rewrites q, k, v to themselves."""

    uses_probs = True

    def __init__(self):
        self.seen = set()

    def qkv(self, call, q, k, v):
        self.seen.add((call.site.name, call.site.kind, q.shape[2], k.shape[2]))
        return q, k, v


def run(controllers, kind="sd3", prompts=(PROMPT,), steps=4):
    from retouch.attention import guidance_halves

    m = model(kind)
    den = m.denoiser(list(prompts), cfg=3.0)
    times = m.time_grid(steps)
    layout = BatchLayout(tuple(f"row{i}" for i in range(len(prompts))), guidance_halves(den))
    with torch.no_grad(), attention_control(m.network, controllers, layout=layout) as s:
        return sample(s.denoiser(den, times), start(len(prompts), kind), times, progress=False)


def test_sites_are_joint_with_self_and_cross_views():
    sites = list(find_sites(model().network).values())
    assert [(s.kind, s.place, s.resolution) for s in sites] == [("joint", "down", 4),
                                                                ("joint", "up", 4)]
    assert [v.kind for v in site_views(sites[0])] == ["self", "cross"]


@pytest.mark.parametrize("kind", FAMILIES)
def test_a_controller_that_changes_nothing_changes_nothing(kind):
    m = model(kind)
    plain = sample(m.denoiser([PROMPT], cfg=3.0), start(kind=kind), m.time_grid(4),
                   progress=False)
    idle = Idle()
    controlled = run([idle], kind)
    torch.testing.assert_close(controlled, plain, rtol=1e-5, atol=1e-5)
    # Both views of every block: 16 image queries over 16 image keys and over the text tokens.
    text = m.encode(PROMPT).embeds.shape[1]
    assert {(view, n, k) for _, view, n, k in idle.seen} == {("self", 16, 16),
                                                            ("cross", 16, text)}
    names = {name for name, *_ in idle.seen}  # Flux: double- and single-stream blocks
    assert len(names) == len(find_sites(m.network))


@pytest.mark.parametrize("kind", FAMILIES)
def test_cross_attention_maps_are_distributions_over_the_text(kind):
    store = AttentionStore(kinds=("cross", "self"), places=("down", "up"), size=4)
    run([store], kind)
    cross, self_maps = store.cross(), store.self_attention()
    text = model(kind).encode(PROMPT).embeds.shape[1]
    assert cross.shape == (1, 4, 4, text) and self_maps.shape == (1, 16, 16)
    for maps in (cross.reshape(1, 16, text), self_maps):  # each view over its own keys
        torch.testing.assert_close(maps.sum(-1), torch.ones(1, 16), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("editor", "options"), [
    ("p2p", {"blend_words": "changed"}),
    ("masactrl", {"start_step": 1, "start_layer": 0}),
    ("rf_solver", {}),
    ("pnp", {"feature_module": None, "first_layer": 0}),
])
@pytest.mark.parametrize("kind", FAMILIES)
def test_identical_prompts_give_the_source(kind, editor, options):
    r = edit_generated(model(kind), PROMPT, PROMPT, editor=editor, steps=4, cfg=3.0, **options)
    torch.testing.assert_close(r.latents[1], r.latents[0], rtol=0, atol=1e-5)


def test_an_edit_changes_the_target_and_keeps_the_source():
    m = model()
    r = edit_generated(m, PROMPT, "a blue square", editor="rf_solver", steps=4, cfg=3.0,
                       start=start())
    plain = sample(m.denoiser([PROMPT], cfg=3.0), start(), m.time_grid(4), progress=False)
    torch.testing.assert_close(r.latents[:1], plain, rtol=1e-5, atol=1e-5)  # source row intact
    assert not torch.allclose(r.latents[1], r.latents[0])


@pytest.mark.parametrize("target", ["a blue square", "a big red square"])
def test_prompt_to_prompt_maps_both_text_segments(target):
    from retouch.attention.tokens import refinement_map, word_positions

    m = model()
    seq = m.text_tokens
    clip = m.tokenizer.model_max_length
    assert seq.segments[1][1] == m.encode(PROMPT).embeds.shape[1] - clip
    # "red" follows the start token and "a" in both segments (the tiny model's word tokenizer
    # doubles as T5's, start token included).
    assert word_positions(seq, PROMPT, "red") == [2, clip + 2]
    mapper, mask = refinement_map(seq, PROMPT, target)
    assert len(mapper) == m.encode(PROMPT).embeds.shape[1]
    assert bool((mapper[clip:] >= clip).all())  # T5 tokens map within the T5 segment
    # A swap (same length) or a refinement runs, keeps the source row, and changes the target.
    r = edit_generated(m, PROMPT, target, editor="p2p", steps=4, cfg=3.0,
                       blend_words="changed", start=start())
    plain = sample(m.denoiser([PROMPT], cfg=3.0), start(), m.time_grid(4), progress=False)
    torch.testing.assert_close(r.latents[:1], plain, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(r.latents[1], r.latents[0]) and "local_blend" in r.masks


def test_attention_maps_of_words_on_sd3():
    from retouch.recipes.attention_maps import attention_maps

    maps = attention_maps(model(), PROMPT, steps=4, cfg=3.0)
    assert set(maps.heatmaps) >= {"red", "square"}
    assert all(h.shape == (4, 4) for h in maps.heatmaps.values())


def test_prompt_to_prompt_on_flux_reads_the_t5_positions():
    from retouch.attention.tokens import word_positions

    m = model("flux")
    assert word_positions(m.text_tokens, PROMPT, "red") == [2]  # the tiny T5 adds a start token
    r = edit_generated(m, PROMPT, "a blue square", editor="p2p", steps=4, cfg=3.0,
                       blend_words="changed", start=start(kind="flux"))
    plain = sample(m.denoiser([PROMPT], cfg=3.0), start(kind="flux"), m.time_grid(4),
                   progress=False)
    torch.testing.assert_close(r.latents[:1], plain, rtol=1e-5, atol=1e-5)  # source row intact
    assert not torch.allclose(r.latents[1], r.latents[0]) and "local_blend" in r.masks


def test_an_edit_on_distilled_flux_reconstructs_with_the_guidance_it_inverted_with():
    from retouch.inversion import invert, reconstruct
    from retouch.recipes.edit import edit_inverted

    m = model("flux")
    z = m.encode_image(torch.rand(1, 3, 16, 16) * 2 - 1)
    inv = invert(m, z, PROMPT, method="bdia", steps=4, cfg=2.0, progress=False)
    r = edit_inverted(m, inv, PROMPT, editor="none")
    # The edit's source row is the inversion's own reconstruction (embedded guidance 2, one
    # branch), and the same prompt as target gives the same row.
    torch.testing.assert_close(r.latents[0], reconstruct(inv, m, progress=False)[0],
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(r.latents[1], r.latents[0], rtol=0, atol=1e-5)
