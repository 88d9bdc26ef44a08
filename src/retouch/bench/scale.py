"""Scale benchmark: attention control at a real model's size, with no weights needed.

The full-size SD1.5 UNet architecture (its published config, 860 M parameters, random
weights: timing and memory do not depend on the values) runs on 64x64 latents (512x512
images; ``--quick``: 32x32) with 77-token text embeddings. One UNet call is timed with:

* ``diffusers``: diffusers' own attention processors (the baseline, 2 rows: CFG);
* ``empty_session``: ``attention_control`` with no controller (it installs nothing);
* ``no_controller``: an :class:`~retouch.attention.AttentionStore` at every cross site that is
  not active at this step (outside its window): retouch's processor routes each call and runs
  diffusers' processor unchanged -- the cost of "installed, nothing acts";
* ``map_store``: the store active (cross-attention probabilities materialised and pooled);
* ``diffusers_p2p_batch`` and ``p2p``: 4 rows (source and target, CFG), diffusers' processors
  against Prompt-to-Prompt's word swap, self-attention injection and a store.

Ratios are retouch / diffusers medians of interleaved repeats in the same process. Memory:
the process's peak RSS after diffusers' call and after the store's (``map_store_peak_mib``),
and the store's own bytes after 1, 2 and 3 steps (constant: it keeps running means).

Outputs: ``scale.json`` (headline ``no_controller_ratio``, ``map_store_ratio``, ``p2p_ratio``,
``map_store_peak_mib``), ``scale.md``.
"""

from __future__ import annotations

import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from .common import atomic_write_text, versions, write_markdown_table, write_result

__all__ = ["run", "sd15_unet"]

TOKENS, TEXT_DIM = 77, 768


def sd15_unet(sample_size: int = 64):
    """The SD1.5 UNet architecture (Rombach et al. 2022; the ``unet/config.json`` of
    stable-diffusion-v1-5) with random weights."""
    import diffusers

    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=TEXT_DIM, attention_head_dim=8,
    ).eval()


def _tokenizer():
    from transformers import CLIPTokenizer

    from ..toyworld.tokenizer import save_tokenizer

    words = ("a", "photo", "of", "cat", "dog", "on", "the", "grass")
    with tempfile.TemporaryDirectory() as d:
        save_tokenizer(words, Path(d), max_length=TOKENS)
        return CLIPTokenizer.from_pretrained(d)


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _store_bytes(store) -> int:
    return sum(t.numel() * t.element_size() for t in store.sums.values())


@torch.no_grad()
def run(*, quick: bool, out: Path) -> dict:
    from ..attention import AttentionStore, BatchLayout, attention_control
    from ..recipes.editors import p2p_editor

    started = versions()  # the commit and versions this run starts from
    side, repeats = (32, 1) if quick else (64, 3)
    unet = sd15_unet(side)
    g = torch.Generator().manual_seed(0)
    two, four = BatchLayout(("image",)), BatchLayout(("source", "target"))
    x2, x4 = torch.randn(2, 4, side, side, generator=g), torch.randn(4, 4, side, side, generator=g)
    e2, e4 = torch.randn(2, TOKENS, TEXT_DIM, generator=g), torch.randn(4, TOKENS, TEXT_DIM,
                                                                        generator=g)
    t, num_steps = 500.0, 10

    def forward(x, e, session=None, step=0) -> float:
        t0 = time.perf_counter()
        if session is None:
            unet(x, t, encoder_hidden_states=e)
        else:
            with session.at_step(step, t, num_steps=num_steps, latent_hw=(side, side)):
                unet(x, t, encoder_hidden_states=e)
        return time.perf_counter() - t0

    def controlled(controllers, layout, x, e, steps=(0,)):
        with attention_control(unet, controllers, layout=layout) as session:
            return [forward(x, e, session, s) for s in steps][-1]

    forward(x2, e2)  # warm-up
    peak_diffusers = _peak_mib()
    store = AttentionStore(kinds=("cross",))
    with attention_control(unet, [store], layout=two) as session:
        store_bytes = []
        for step in range(3):
            forward(x2, e2, session, step)
            store_bytes.append(_store_bytes(store))
    peak_store = _peak_mib()

    tok = _tokenizer()
    idle = AttentionStore(kinds=("cross",), steps=(0.5, 1.0))  # inactive at step 0 ...

    def idle_then_active():  # ... and active once, so the session sees it called
        with attention_control(unet, [idle], layout=two) as session:
            seconds = forward(x2, e2, session, 0)
            with session.at_step(num_steps - 1, t, num_steps=num_steps, latent_hw=(side, side)):
                unet(x2[:2], t, encoder_hidden_states=e2)
            return seconds

    modes = {
        "diffusers": lambda: forward(x2, e2),
        "empty_session": lambda: controlled([], two, x2, e2),
        "no_controller": idle_then_active,
        "map_store": lambda: controlled([AttentionStore(kinds=("cross",))], two, x2, e2),
        "diffusers_p2p_batch": lambda: forward(x4, e4),
        "p2p": lambda: controlled(
            [*p2p_editor(tok, "a photo of a cat", "a photo of a dog"),
             AttentionStore(kinds=("cross",))], four, x4, e4),
    }
    times: dict[str, list[float]] = {k: [] for k in modes}
    for r in range(repeats):
        names = list(modes)
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(modes[name]())
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "headline": {
            "no_controller_ratio": med["no_controller"] / med["diffusers"],
            "map_store_ratio": med["map_store"] / med["diffusers"],
            "p2p_ratio": med["p2p"] / med["diffusers_p2p_batch"],
            "map_store_peak_mib": peak_store,
        },
        "empty_session_ratio": med["empty_session"] / med["diffusers"],
        "seconds_per_call": med,
        "peak_rss_mib": {"after_diffusers": peak_diffusers, "after_map_store": peak_store},
        "map_store_bytes_after_steps": store_bytes,
        "setup": {"unet": "SD1.5 architecture, random weights",
                  "parameters_millions": sum(p.numel() for p in unet.parameters()) / 1e6,
                  "latent": [side, side], "tokens": TOKENS, "repeats": repeats,
                  "threads": torch.get_num_threads(),
                  "processors": sorted({type(p).__name__ for p in
                                        unet.attn_processors.values()})},
    }
    write_result(out / "scale.json", result, started=started)
    rows = [{"mode": k, "seconds per call": v} for k, v in med.items()]
    h = result["headline"]
    text = (
        f"# Scale: SD1.5 UNet ({result['setup']['parameters_millions']:.0f} M parameters, "
        f"random weights) at {side}x{side} latents, {torch.get_num_threads()} thread(s)\n\n"
        + write_markdown_table(rows, ["mode", "seconds per call"])
        + f"\nretouch / diffusers: no controller acting {h['no_controller_ratio']:.3f}, "
        f"empty session {result['empty_session_ratio']:.3f}, map store "
        f"{h['map_store_ratio']:.3f}, Prompt-to-Prompt (4 rows) {h['p2p_ratio']:.3f}.\n\n"
        f"Peak RSS {peak_diffusers:.0f} MiB after diffusers' call, {peak_store:.0f} MiB after "
        f"3 store steps; the store holds {store_bytes} bytes after 1, 2, 3 steps.\n"
    )
    atomic_write_text(out / "scale.md", text)
    return result
