"""Attention per call: grids and rows from each call, other processors kept, output terms."""

import pytest
import torch

from retouch.attention import AttentionStore, Controller, attention_control
from retouch.attention.sites import BatchLayout, find_sites
from tiny_models import TEXT_DIM, tiny_unet

ONE = BatchLayout(("image",), ("cond",))


def _kw(batch: int) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"encoder_hidden_states": torch.randn(batch, 5, TEXT_DIM, generator=g)}


class Grids(Controller):
    """Records each call's grid and row count."""

    uses_probs = True
    rewrites = False

    def __init__(self):
        self.seen = set()

    def probs(self, call, p):
        assert p.shape[2] == call.hw[0] * call.hw[1]
        self.seen.add((call.site.factor, call.hw, p.shape[0]))
        return p


@torch.no_grad()
@pytest.mark.parametrize("hw", [(12, 16), (8, 8), (6, 10)])
def test_controllers_work_on_latents_of_any_size(hw):
    """Latents of another size than the config's 8x8 (a window, a panorama): each call's grid
    comes from the call."""
    unet, grids = tiny_unet("sd1"), Grids()
    x = torch.randn(1, 4, *hw, generator=torch.Generator().manual_seed(0))
    ref = unet(x, 500, **_kw(1)).sample
    with attention_control(unet, [grids], layout=ONE) as session:
        with session.at_step(0, 500.0, num_steps=1, latent_hw=hw):
            got = unet(x, 500, **_kw(1)).sample
    assert (got - ref).abs().max() <= 1e-5
    expected = {(f, ((hw[0] + f - 1) // f, (hw[1] + f - 1) // f), 1) for f in (1, 2, 4)}
    assert grids.seen == expected


@torch.no_grad()
def test_a_cropped_window_through_the_denoiser_gets_its_own_grid_and_layout():
    from retouch.models.unet import UNetDenoiser
    from retouch.schedules import get_schedule

    unet, grids = tiny_unet("sd1"), Grids()
    canvas = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(0))
    windows = torch.cat([canvas[..., :, 0:16], canvas[..., :, 8:24]])  # two 16x16 crops
    den = UNetDenoiser(unet, get_schedule("scaled_linear"),
                       encoder_hidden_states=_kw(1)["encoder_hidden_states"])
    layout = BatchLayout(("left", "right"), ("cond",))
    with attention_control(unet, [grids], layout=layout) as session:
        session.denoiser(den, [500.0, 0.0])(windows, 500.0)
    assert grids.seen == {(1, (16, 16), 2), (2, (8, 8), 2), (4, (4, 4), 2)}


class WeightedProcessor(torch.nn.Module):
    """A processor with its own weights (as IP-Adapter's and some LoRA loaders' are): the
    stock attention plus a learned term on the output."""

    def __init__(self, dim: int):
        super().__init__()
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.base = AttnProcessor2_0()
        self.extra = torch.nn.Linear(dim, dim)
        torch.nn.init.normal_(self.extra.weight, std=0.5)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kw):
        out = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        return out + self.extra(hidden_states)


@torch.no_grad()
def test_a_processor_with_weights_keeps_working_beside_a_map_store():
    unet = tiny_unet("sd1")
    before = dict(unet.attn_processors)
    cross = [k for k, s in find_sites(unet).items() if s.kind == "cross"]
    custom = {k: WeightedProcessor(unet.get_submodule(k.removesuffix(".processor")).query_dim)
              for k in cross}
    unet.set_attn_processor({**before, **custom})
    try:
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        ref = unet(x, 500, **_kw(1)).sample
        store = AttentionStore(kinds=("cross",), places=("down", "mid", "up"))
        with attention_control(unet, [store], layout=ONE) as session:
            with session.at_step(0, 500.0, num_steps=1, latent_hw=(8, 8)):
                got = unet(x, 500, **_kw(1)).sample
            selfs = [k for k in session.sites if k not in cross]
            assert all(unet.attn_processors[k] is before[k] for k in selfs)  # untouched
        torch.testing.assert_close(got, ref, rtol=0, atol=0)  # the processor computed it
        assert store.counts["cross"] == len(cross)
        assert torch.allclose(store.cross().sum(-1), torch.ones(()))  # maps are distributions
        assert all(unet.attn_processors[k] is custom[k] for k in cross)  # restored

        class Rewriter(Controller):
            uses_probs = True

            def select(self, site):
                return site.kind == "cross"

        with pytest.raises(ValueError, match="Rewriter rewrites attention at .*attn2, where a "
                                             "WeightedProcessor is installed"):
            with attention_control(unet, [Rewriter()], layout=ONE):
                pass
    finally:
        unet.set_attn_processor(before)


class AddOutput(Controller):
    """Adds ``value`` to every attention output at the cross sites (before the projection)."""

    def __init__(self, value: float):
        self.value = value

    def select(self, site):
        return site.kind == "cross"

    def output(self, call, attn, q, out):
        return torch.full_like(q, self.value)


@torch.no_grad()
def test_controllers_can_add_an_output_term():
    unet = tiny_unet("sd1")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = unet(x, 500, **_kw(1)).sample

    def run(controller):
        with attention_control(unet, [controller], layout=ONE) as session:
            with session.at_step(0, 500.0, num_steps=1, latent_hw=(8, 8)):
                return unet(x, 500, **_kw(1)).sample

    assert (run(AddOutput(0.0)) - ref).abs().max() <= 1e-6
    assert (run(AddOutput(0.5)) - ref).abs().max() > 1e-3


def test_rows_that_do_not_match_the_layout_are_named():
    unet = tiny_unet("sd1")
    with pytest.raises(ValueError, match=r"has 3 rows but the batch layout"):
        with attention_control(unet, [Grids()], layout=ONE) as session:
            with torch.no_grad(), session.at_step(0, 500.0, num_steps=1, latent_hw=(8, 8)):
                unet(torch.zeros(3, 4, 8, 8), 500, **_kw(3))
