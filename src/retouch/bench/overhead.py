"""What retouch's attention processor costs: one model forward with diffusers' processors, with
retouch's processor and no controller acting, and with an AttentionStore reading the maps.

Part of ``retouch bench editing`` (its ``overhead``): ratios of medians of interleaved repeats
in the same run, so a busy machine slows every mode alike.
"""

from __future__ import annotations

import statistics
import time

import torch

__all__ = ["processor_overhead"]


@torch.no_grad()
def processor_overhead(model, *, repeats: int, forwards: int = 3) -> dict:
    """Median time of one UNet forward (2 latent rows x CFG) with diffusers' processors, with
    retouch's processor and no controller, and with an AttentionStore; ratios to diffusers'."""
    from ..attention import AttentionStore, BatchLayout, attention_control

    unet, layout = model.network, BatchLayout(("source", "target"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(model.latent_shape(layout.size), generator=g).to(model.device)
    net = model.network_denoiser(model.encode(["a red square on a white background"]
                                              * layout.size))
    from .coverage import model_time

    t, hw = model_time(model.schedule, 0.5), tuple(x.shape[-2:])

    def timed(session=None) -> float:
        t0 = time.perf_counter()
        for _ in range(forwards):
            if session is None:
                net(x, t)
            else:
                with session.at_step(0, t, num_steps=1, latent_hw=hw):
                    net(x, t)
        return (time.perf_counter() - t0) / forwards

    def retouch(controllers) -> float:
        with attention_control(unet, controllers, layout=layout) as session:
            return timed(session)

    modes = {"diffusers": timed, "retouch": lambda: retouch([]),
             "retouch_store": lambda: retouch([AttentionStore()])}
    times: dict[str, list[float]] = {k: [] for k in modes}
    timed()  # warm-up
    for r in range(repeats):
        names = list(modes)
        for name in names[r % 3:] + names[: r % 3]:  # rotate the order: no fixed position bias
            times[name].append(modes[name]())
    med = {k: statistics.median(v) for k, v in times.items()}
    processors = sorted({type(p).__name__ for p in unet.attn_processors.values()})
    return {
        "diffusers_processor": ", ".join(processors),
        "batch_rows": layout.size,
        "repeats": repeats,
        "seconds": med,
        "ratio_no_controller": med["retouch"] / med["diffusers"],
        "ratio_store": med["retouch_store"] / med["diffusers"],
    }
