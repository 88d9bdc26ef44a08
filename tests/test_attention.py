"""Attention control on tiny random SD1.x, SD2 (v, linear projection) and SDXL UNets."""

import numpy as np
import pytest
import torch

from retouch.attention import (
    AttentionStore,
    AttnCall,
    BatchLayout,
    Controller,
    CrossAttentionInjection,
    LocalBlend,
    MutualSelfAttention,
    PlugAndPlay,
    SelfAttentionInjection,
    attention_control,
    find_sites,
    label_segments,
    refinement_map,
    reweight,
    save_heatmaps,
    segment_self_attention,
    token_heatmaps,
    word_positions,
    word_swap,
)
from retouch.attention.sites import Site
from retouch.grids import discrete_grid
from retouch.guidance import CFGDenoiser
from retouch.models import UNetDenoiser
from retouch.samplers import sample
from retouch.schedules import get_schedule
from tiny_models import CONFIGS, TEXT_DIM, TOKENS, tiny_tokenizer, tiny_unet


def unet_kwargs(kind: str, batch: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    kw = {"encoder_hidden_states": torch.randn(batch, 5, TEXT_DIM, generator=g)}
    if kind == "sdxl":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, TEXT_DIM, generator=g),
                                   "time_ids": torch.randn(batch, 6, generator=g)}
    return kw


LAYOUT = BatchLayout(("source", "target"))  # model rows: [u_src, u_tgt, c_src, c_tgt]


def fake_call(kind: str = "cross", *, step: int = 0, num_steps: int = 10, hw=(2, 2)) -> AttnCall:
    site = Site("x.attn", kind, "up", 1, 2, hw[0], 0, 0)
    return AttnCall(step, 100.0, num_steps, LAYOUT, (2 * hw[0], 2 * hw[1]), site=site, hw=hw,
                    heads=2)


# --- the processor -----------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("kind", CONFIGS)
def test_processor_matches_diffusers_and_restores(kind):
    unet, kw = tiny_unet(kind), unet_kwargs(kind, 4)
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    ref = unet(x, 500, **kw).sample
    before = unet.attn_processors
    with attention_control(unet, [], layout=LAYOUT):
        got = unet(x, 500, **kw).sample
    assert (got - ref).abs().max() <= 1e-6
    # Reading every map (materialised softmax) leaves the output unchanged, too.
    store = AttentionStore(kinds=("cross", "self"), places=("down", "mid", "up"))
    with attention_control(unet, [store], layout=LAYOUT) as session:
        with session.at_step(0, 500.0, num_steps=1, latent_hw=(8, 8)):
            read = unet(x, 500, **kw).sample
    assert (read - ref).abs().max() <= 1e-5
    n_sites = len(find_sites(unet))
    assert store.counts["cross"] + store.counts["self"] == n_sites
    after = unet.attn_processors
    assert all(after[k] is before[k] for k in before)


def test_sites_know_their_place_and_resolution():
    sites = find_sites(tiny_unet("sdxl"))
    by_name = {s.name: s for s in sites.values()}
    bottom = [s for s in by_name.values() if s.place == "down" and s.block == 2]
    assert {s.resolution for s in bottom} == {2} and len(bottom) == 4  # 2 layers x self/cross
    assert by_name["up_blocks.1.attentions.0.transformer_blocks.0.attn2"].resolution == 4
    self_layers = sorted(s.layer for s in by_name.values() if s.kind == "self")
    assert self_layers == list(range(len(self_layers)))
    assert all(s.factor == 1 for s in find_sites(tiny_unet("sd1")).values()
               if s.name.startswith("down_blocks.0"))


@torch.no_grad()
def test_processors_restored_after_exception():
    unet = tiny_unet("sd1")
    before = unet.attn_processors
    with pytest.raises(KeyError, match="boom"), attention_control(unet, [AttentionStore()],
                                                                  layout=LAYOUT):
        raise KeyError("boom")
    after = unet.attn_processors
    assert all(after[k] is before[k] for k in before)


def test_installed_but_never_called_is_an_error():
    with pytest.raises(RuntimeError, match="never called"):
        with attention_control(tiny_unet("sd1"), [AttentionStore()], layout=LAYOUT):
            pass


@torch.no_grad()
def test_controllers_need_the_step():
    unet, kw = tiny_unet("sd1"), unet_kwargs("sd1", 4)
    with pytest.raises(RuntimeError, match="session.denoiser"):
        with attention_control(unet, [AttentionStore()], layout=LAYOUT):
            unet(torch.zeros(4, 4, 8, 8), 10, **kw)


def test_missing_resolution_names_the_existing_ones():
    with pytest.raises(ValueError, match=r"resolution 32.*resolutions 8, 4, 2"):
        with attention_control(tiny_unet("sd1"), [LocalBlend([1], [1], resolutions={32})],
                               layout=LAYOUT):
            pass
    with pytest.raises(ValueError, match=r"start_layer=50.*\(7 layers\)"):
        with attention_control(tiny_unet("sd1"), [MutualSelfAttention(start_layer=50)],
                               layout=LAYOUT):
            pass


# --- Prompt-to-Prompt on synthetic maps ---------------------------------------------------


def test_word_swap_on_synthetic_attention_swaps_exactly():
    tok = tiny_tokenizer()
    ctrl = word_swap(tok, "a red square", "a blue square", steps=0.5, word_steps={"blue": 0.2})
    p = torch.rand(4, 2, 4, TOKENS, generator=torch.Generator().manual_seed(0))
    out = ctrl.probs(fake_call(step=3), p.clone())
    blue = word_positions(tok, "a blue square", "blue")
    others = [j for j in range(TOKENS) if j not in blue]
    torch.testing.assert_close(out[:3], p[:3], rtol=0, atol=0)  # uncond + source untouched
    torch.testing.assert_close(out[3][..., others], p[2][..., others], rtol=0, atol=0)
    torch.testing.assert_close(out[3][..., blue], p[3][..., blue], rtol=0, atol=0)  # 3 >= 0.2N
    late = ctrl.probs(fake_call(step=5), p.clone())  # outside the window: nothing swapped
    torch.testing.assert_close(late, p, rtol=0, atol=0)
    assert not ctrl.active(fake_call(step=5))


def test_refinement_alignment_maps_tokens():
    tok = tiny_tokenizer()
    mapper, mask = refinement_map(tok, "a red square", "a big red square")
    # target: [BOS, a, big, red, square, EOS, pad...]; source: [BOS, a, red, square, EOS, ...]
    assert mapper[:6].tolist()[:2] == [0, 1] and mapper[3:6].tolist() == [2, 3, 4]
    assert mask[:6].tolist() == [1, 1, 0, 1, 1, 1]
    assert mapper[6:].tolist() == list(range(5, TOKENS - 1))  # padding: same offset from end
    ctrl = CrossAttentionInjection(mapper, mask)
    p = torch.rand(4, 1, 3, TOKENS, generator=torch.Generator().manual_seed(1))
    out = ctrl.probs(fake_call(step=0), p.clone())
    torch.testing.assert_close(out[3, ..., 3], p[2, ..., 2])  # "red" from the source's "red"
    torch.testing.assert_close(out[3, ..., 2], p[3, ..., 2])  # "big" keeps its own map


def test_reweight_scales_and_refuses_unknown_words():
    tok = tiny_tokenizer()
    ctrl = reweight(tok, "a red square", {"red": 3.0})
    p = torch.rand(4, 1, 3, TOKENS)
    out = ctrl.probs(fake_call(), p.clone())
    j = word_positions(tok, "a red square", "red")[0]
    torch.testing.assert_close(out[3, ..., j], 3 * p[3, ..., j])
    torch.testing.assert_close(out[:3], p[:3])
    with pytest.raises(ValueError, match="cannot re-weight 'blue'"):
        reweight(tok, "a red square", {"blue": 2.0})


def test_word_swap_with_different_token_counts_is_refused():
    tok = tiny_tokenizer()  # ToyWorld words are one token; "zebra" is spelled in bytes
    with pytest.raises(ValueError, match=r"'cat' \(1 tokens\) -> 'zebra'.*refine"):
        word_swap(tok, "a red cat", "a red zebra")
    with pytest.raises(ValueError, match="same number of words.*refine"):
        word_swap(tok, "a cat", "a red cat")


def test_self_injection_copies_source_rows_in_the_cond_half():
    ctrl = SelfAttentionInjection(steps=1.0)
    p = torch.rand(4, 2, 4, 4)
    out = ctrl.probs(fake_call("self"), p.clone())
    torch.testing.assert_close(out[3], p[2])
    torch.testing.assert_close(out[:3], p[:3])


def test_masactrl_and_pnp_rewrite_the_right_rows():
    q, k, v = (torch.rand(4, 2, 4, 3) for _ in range(3))
    call = fake_call("self", step=5)
    q2, k2, v2 = MutualSelfAttention(start_step=4, start_layer=0).qkv(call, q, k, v)
    assert torch.equal(q2, q)
    for new, old in ((k2, k), (v2, v)):
        assert torch.equal(new[1], old[0]) and torch.equal(new[3], old[2])  # each half
        assert torch.equal(new[0], old[0]) and torch.equal(new[2], old[2])
    q3, k3, v3 = PlugAndPlay().qkv(call, q, k, v)  # each target row reads its own half
    assert torch.equal(q3[3], q[2]) and torch.equal(k3[1], k[0]) and torch.equal(v3, v)
    q4, k4, _ = PlugAndPlay(source_half="uncond").qkv(call, q, k, v)  # the reference's choice
    assert torch.equal(q4[3], q[0]) and torch.equal(k4[3], k[0]) and torch.equal(q4[2], q[2])


# --- maps, heatmaps, segmentation ---------------------------------------------------------


@torch.no_grad()
def test_store_is_bounded_and_makes_heatmaps(tmp_path):
    unet, schedule = tiny_unet("sd2v"), get_schedule("scaled_linear")
    ehs = torch.randn(2, TOKENS, TEXT_DIM, generator=torch.Generator().manual_seed(3))
    den = CFGDenoiser(UNetDenoiser(unet, schedule, prediction_type="v_prediction"),
                      cond={"encoder_hidden_states": ehs},
                      uncond={"encoder_hidden_states": torch.zeros(1, TOKENS, TEXT_DIM)},
                      scale=3.0)
    times = discrete_grid(schedule, 3, steps_offset=1)
    store = AttentionStore(kinds=("cross", "self"), steps=(0.0, 1.0))
    with attention_control(unet, [store], layout=LAYOUT) as session:
        sample(session.denoiser(den, times), torch.randn(2, 4, 8, 8), times, progress=False,
               callbacks=[session.callback])
    n_cross = sum(s.kind == "cross" and s.place != "mid" for s in find_sites(unet).values())
    assert store.counts["cross"] == 3 * n_cross  # 3 steps x sites, summed into one tensor
    assert store.size == 4 and store.cross().shape == (2, 4, 4, TOKENS)
    assert store.self_attention().shape == (2, 16, 16)
    torch.testing.assert_close(store.cross().sum(-1), torch.ones(2, 4, 4))  # softmax rows
    # Self maps from 8x8 and 4x4 sites stay distributions over the 4x4 keys.
    torch.testing.assert_close(store.self_attention().sum(-1), torch.ones(2, 16))
    maps = token_heatmaps(store.cross()[1], {"w": [1, 2]})
    assert maps["w"].shape == (4, 4) and maps["w"].max() == pytest.approx(1.0)
    png = save_heatmaps(tmp_path / "maps.png", maps, image=np.zeros((8, 8, 3), np.uint8))
    assert png.stat().st_size > 0


def test_self_attention_segmentation_and_labels():
    side = 4
    ys, xs = np.mgrid[:side, :side]
    truth = torch.from_numpy((xs >= 2).astype(np.int64).reshape(-1))  # left / right halves
    same = (truth[:, None] == truth[None, :]).float()
    maps = same / same.sum(1, keepdim=True) + 0.01 * torch.rand(side * side, side * side)
    labels = segment_self_attention(maps, clusters=2)
    flat = labels.reshape(-1)
    assert len(flat.unique()) == 2 and all(
        len(flat[truth == g].unique()) == 1 for g in (0, 1))  # each half is one segment
    cross = torch.zeros(side, side, 3)
    cross[:, 2:, 1] = 1.0  # token 1 ("cat") attends to the right half only
    names = label_segments(labels, cross, {"cat": [1]})
    right = int(labels[0, 3])
    assert names[right][0] == "cat" and names[1 - right][0] == "background"


class _Counting(Controller):
    def __init__(self):
        self.calls = 0

    def select(self, site):
        return site.kind == "cross"

    def probs(self, call, p):
        self.calls += 1
        return p


def test_only_reading_sites_materialise_probabilities():
    c = _Counting()
    unet, kw = tiny_unet("sd1"), unet_kwargs("sd1", 4)
    with torch.no_grad(), attention_control(unet, [c], layout=LAYOUT) as session:
        with session.at_step(0, 10.0, num_steps=1, latent_hw=(8, 8)):
            unet(torch.zeros(4, 4, 8, 8), 10, **kw)
    assert c.calls == 0  # uses_probs is False: probs are never computed or shown
    c.uses_probs = True
    with torch.no_grad(), attention_control(unet, [c], layout=LAYOUT) as session:
        with session.at_step(0, 10.0, num_steps=1, latent_hw=(8, 8)):
            unet(torch.zeros(4, 4, 8, 8), 10, **kw)
    assert c.calls == sum(s.kind == "cross" for s in find_sites(unet).values())
