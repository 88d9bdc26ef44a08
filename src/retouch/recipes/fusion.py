"""Panoramas, region layouts and view grids by fusing diffusion paths (one sampling loop).

* :func:`panorama`: MultiDiffusion windows of the model's native size over a wider (or taller)
  canvas, one prompt; with ``sync`` (:func:`sync_diffusion`) SyncDiffusion's gradient step.
* :func:`regions`: a :class:`~retouch.fusion.RegionLayout` generated either by MultiDiffusion's
  region masks (every window denoised under each region's prompt, weighted by the region's
  mask times a power of the share of the window the region fills, with bootstrapping) or by
  regional prompting in the cross-attention (every window under the base prompt, each region's
  queries reading its sub-prompt, :class:`~retouch.attention.RegionalPrompting`).
* :func:`grid_views`: several views of one prompt tiled into one canvas and denoised as one
  image, so the model's self-attention couples them (Zero123++'s grid, without its fine-tuning).

* :func:`panorama_edit`: a panorama and its Prompt-to-Prompt edit, window by window.

Every function runs any sampler (SyncDiffusion: ddim or ddpm) and takes attention
``controllers``, which see the windows as the rows of one model call (role ``"view"``).

References: Bar-Tal et al. 2023 (MultiDiffusion); Lee et al. 2023 (SyncDiffusion); Yang et al.
2024 (RPG); Shi et al. 2023 (Zero123++, the tiled multi-view canvas).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..attention import BatchLayout, SharedAttention, attention_control, guidance_halves
from ..attention.regional import RegionalPrompting
from ..checks import count, finite, prompt_list
from ..fusion import (
    Bootstrap,
    FusedDenoiser,
    RegionLayout,
    SyncDiffusion,
    VAEFeatureDistance,
    View,
    colour_statistics,
    lpips_distance,
    window_boxes,
)
from ..fusion.views import check_canvas
from ..samplers import get_step, sample, start_latents
from .editors import p2p_editor

__all__ = ["DISTANCES", "canvas_latent_hw", "default_stride", "fuse", "grid_views", "panorama",
           "panorama_edit", "regions", "sync_diffusion"]

#: SyncDiffusion's distances by name (``colour``, the default, and the VAE ones need no
#: download; on ToyWorld panoramas ``colour`` matches ``vae``'s coherence with one background
#: more often and better per-window adherence, :mod:`retouch.bench.fusion`) and the default
#: weight of each: the paper's 20 for LPIPS; 2 for the VAE distances and 1 for the colour
#: statistics, chosen on ToyWorld panoramas (20 wrecks them: see :mod:`retouch.bench.fusion`);
#: tune it for another model.
DISTANCES = {"vae": 2.0, "vae-stats": 2.0, "colour": 1.0, "lpips": 20.0}


def sync_diffusion(model, *, distance: str = "colour", **options) -> SyncDiffusion:
    """A :class:`SyncDiffusion` for ``model`` (its VAE decodes; ``distance`` by name, with its
    default weight from :data:`DISTANCES`); ``options``: ``weight``, ``decay``, ``steps``,
    ``anchor``."""
    if distance not in DISTANCES:
        raise ValueError(f"unknown SyncDiffusion distance {distance!r}; valid: "
                         f"{', '.join(DISTANCES)}")
    options.setdefault("weight", DISTANCES[distance])
    if distance == "lpips":
        d = lpips_distance(device=model.device)
    elif distance == "colour":
        d = colour_statistics
    else:
        d = VAEFeatureDistance(model.vae, statistics=distance == "vae-stats")
    return SyncDiffusion(model.decode_tensor, d, **options)


def canvas_latent_hw(model, width: int, height: int) -> tuple[int, int]:
    """The latent size of a ``width`` x ``height`` canvas (refused unless both are whole
    multiples of the VAE's factor and at least one window)."""
    f, size = model.vae_factor, model.image_size
    for name, v in (("width", width), ("height", height)):
        count(name, v)
        if v % f:
            raise ValueError(f"the canvas {name} {v} must be a multiple of {f} pixels (the VAE's "
                             f"downsampling): use {v - v % f or f}")
    check_canvas((height, width), (size, size), 1, unit="pixels")
    return height // f, width // f


def _window(model) -> tuple[int, int]:
    return tuple(model.latent_shape(1)[-2:])


def fuse(
    model,
    prompts: Sequence[str] | Sequence[Sequence[str]],
    views: Sequence[View],
    canvas_hw: tuple[int, int],
    *,
    steps: int = 25,
    cfg: float = 5.0,
    seed: int = 0,
    sampler: str = "ddim",
    negative: str = "",
    controllers: Sequence = (),
    bootstrap: float = 0.0,
    sync: SyncDiffusion | None = None,
    views_per_call: int | None = None,
    progress: bool = False,
    output: str = "image",
    roles: Sequence[str] | None = None,
) -> np.ndarray | torch.Tensor:
    """The canvas (H, W, 3) uint8 fused from ``views`` (each under ``prompts[view.prompt]``),
    or its latent (1, C, h, w) with ``output="latent"``. ``prompts`` may be one prompt list per
    canvas: then B canvases from the same start noise, (B, H, W, 3), the model rows view-major
    (row ``v * B + b``: view ``v`` of canvas ``b``). ``bootstrap`` is the share of the first
    steps bootstrapped (views marked so). ``roles`` names each model row's role in the
    controllers' batch layout (default ``"view"`` for all)."""
    sets = ([prompt_list(p) for p in prompts] if prompts and not isinstance(prompts, str)
            and not isinstance(prompts[0], str) else [prompt_list(prompts)])
    batch = len(sets)
    if any(len(p) != len(sets[0]) for p in sets):
        raise ValueError("every canvas needs as many prompts (one per view prompt index)")
    roles = ("view",) * (len(views) * batch) if roles is None else tuple(roles)
    if len(roles) != len(views) * batch:
        raise ValueError(f"{len(roles)} roles for {len(views) * batch} model rows; give one per "
                         "view and canvas")
    if output not in ("image", "latent"):
        raise ValueError(f"unknown output {output!r}; valid: image, latent")
    count("steps", steps)
    finite("cfg", cfg)
    count("seed", seed, minimum=0)
    finite("bootstrap", bootstrap, low=0, high=1)
    step = get_step(sampler)
    if sync is not None and sampler not in ("ddim", "ddpm"):
        raise ValueError(f"SyncDiffusion renoises with the synchronised views' noise, which the "
                         f"{sampler} sampler cannot take; use --sampler ddim or ddpm")
    if views_per_call is not None:
        count("views_per_call", views_per_call)
    if controllers and views_per_call is not None and views_per_call < len(views):
        raise ValueError("attention controllers need every view in one model call: leave "
                         "views_per_call unset")
    times = model.time_grid(steps)
    gen = torch.Generator().manual_seed(seed)
    shape = (1, model.latent_shape(1)[1], *canvas_hw)
    noise = torch.randn(shape, generator=gen).expand(batch, *shape[1:]).contiguous()
    x = start_latents(model.schedule, float(times[0]), noise).to(model.device)
    texts = [sets[b][v.prompt] for v in views for b in range(batch)]
    unique = list(dict.fromkeys(texts))
    cond = model.encode(unique)[[unique.index(p) for p in texts]]
    den = model.denoiser(cond, cfg=cfg, negative=[negative] * len(texts))
    inner = den
    if views_per_call is not None:
        rows = views_per_call * batch
        inner = [model.denoiser(cond[k:k + rows], cfg=cfg,
                                negative=[negative] * len(texts[k:k + rows]))
                 for k in range(0, len(texts), rows)]
    boot = None
    if bootstrap > 0 and any(v.bootstrap for v in views):
        boot = Bootstrap(round(bootstrap * steps), _colour_latents(model, gen), noise, seed)
    layout = BatchLayout(roles, guidance_halves(den))
    with torch.no_grad(), attention_control(model.network, controllers, layout=layout) as session:
        if controllers:  # they learn the step from the session's wrapper (one call a step)
            inner = session.denoiser(den, times)
        fused = FusedDenoiser(inner, views, canvas_hw=canvas_hw,
                              times=times, bootstrap=boot, sync=sync,
                              views_per_call=views_per_call)
        latents = sample(fused, x, times, step=step, progress=progress,
                         generator=torch.Generator().manual_seed(seed + 1))
    if output == "latent":
        return latents
    images = model.decode(latents)
    return images if batch > 1 else images[0]


def _colour_latents(model, gen: torch.Generator, n: int = 8) -> torch.Tensor:
    """Latents of ``n`` constant-colour images of the window's size (bootstrapping's
    backgrounds; MultiDiffusion draws uniform RGB colours)."""
    size = model.image_size
    colours = (torch.rand(n, 3, generator=gen) * 255).round().to(torch.uint8)
    images = colours[:, None, None, :].expand(n, size, size, 3).numpy()
    return model.encode_image(np.ascontiguousarray(images))


def default_stride(model) -> int:
    """The windows' default stride in latent pixels: a quarter window."""
    return max(1, _window(model)[0] // 4)


def _window_views(model, canvas_hw, stride: int | None, prompt: int = 0) -> list[View]:
    wh, ww = _window(model)
    stride = default_stride(model) if stride is None else stride
    return [View(top, left, wh, ww, prompt) for top, left in window_boxes(canvas_hw, (wh, ww),
                                                                          stride)]


def panorama(model, prompt: str, *, width: int, height: int | None = None,
             stride: int | None = None, sync: SyncDiffusion | None = None,
             share_anchor: bool = False, **options) -> np.ndarray:
    """A ``width`` x ``height`` (default: the model's size) image of ``prompt`` by
    MultiDiffusion: windows every ``stride`` latent pixels (default a quarter window).
    ``share_anchor``: every window also attends to the middle window's self-attention keys and
    values (StyleAligned's shared attention over the windows, the middle one the reference).
    ``options`` go to :func:`fuse`."""
    height = model.image_size if height is None else height
    canvas = canvas_latent_hw(model, width, height)
    views = _window_views(model, canvas, stride)
    if share_anchor:
        roles = ["view"] * len(views)
        roles[len(views) // 2] = "reference"
        options["roles"] = roles
        options["controllers"] = [*options.get("controllers", ()), SharedAttention()]
    return fuse(model, [prompt], views, canvas, sync=sync, **options)


def panorama_edit(model, source: str, target: str, *, width: int, height: int | None = None,
                  stride: int | None = None, p2p: dict | None = None,
                  **options) -> np.ndarray:
    """A panorama of ``source`` and its Prompt-to-Prompt edit to ``target`` (2, H, W, 3): both
    canvases from one noise, each target window's attention controlled by its source window
    (``p2p``: options of :func:`~retouch.recipes.editors.p2p_editor`; local blending, which
    works on whole latents, is not available on windows)."""
    p2p = dict(p2p or {})
    if "blend_words" in p2p or "blend_positions" in p2p:
        raise ValueError("local blending works on whole latents, not on a panorama's windows: "
                         "leave blend_words and blend_positions out")
    height = model.image_size if height is None else height
    canvas = canvas_latent_hw(model, width, height)
    views = _window_views(model, canvas, stride)
    controllers = [*options.pop("controllers", ()), *p2p_editor(model.text_tokens, source,
                                                                target, **p2p)]
    roles = [role for _ in views for role in ("source", "target")]
    return fuse(model, [[source], [target]], views, canvas, controllers=controllers,
                roles=roles, **options)


#: Region-generation methods.
REGION_METHODS = ("multidiffusion", "regional")


def regions(model, layout: RegionLayout, *, method: str = "multidiffusion",
            stride: int | None = None, bootstrap: float = 0.4, coverage_power: float = 2.0,
            **options) -> np.ndarray:
    """The layout's canvas (H, W, 3) by ``method`` (see the module doc). MultiDiffusion:
    ``bootstrap`` is the share of early steps bootstrapped (the paper's 20 of 50), windows
    every ``stride`` latent pixels (default a quarter window), each region's view weighted by
    its mask times ``c ** coverage_power``, ``c`` the share of the window the region fills
    (MultiDiffusion's per-view weights ``W_i``; the paper's plain masks are power 0): a window
    holding a sliver of a region draws a sliver of its object, so the windows that frame the
    region decide it (on ToyWorld layouts of native-size tiles, 66 regions of other layouts:
    right 0.97 at power 2 against 0.89 at 0, ``benchmarks/fusion-regions/tuning.md``).
    Regional prompting needs the
    layout's ``base`` prompt; its windows default to side by side (``stride`` = one window,
    the last flush with the canvas edge), as RPG composes regions within one native-size image:
    on ToyBench's layouts of native-size tiles that made regions right 0.875 against 0.739 with
    half-window overlaps (the same 32 layouts of an earlier run of :mod:`retouch.bench.fusion`,
    session 14)."""
    if method not in REGION_METHODS:
        raise ValueError(f"unknown region method {method!r}; valid: {', '.join(REGION_METHODS)}")
    finite("coverage_power", coverage_power, low=0)
    canvas = canvas_latent_hw(model, layout.width, layout.height)
    masks = layout.masks(canvas)  # (R, h, w)
    if method == "regional" and stride is None:
        stride = min(_window(model))
    windows = _window_views(model, canvas, stride)
    if method == "regional":
        if layout.base is None:
            raise ValueError("regional prompting needs the layout's 'base' prompt (the whole "
                             "canvas's prompt mixed in by base_ratio)")
        crops = torch.stack([masks[:, v.box[0], v.box[1]] for v in windows])
        embeds = model.encode(layout.prompts).embeds
        control = RegionalPrompting(embeds, crops, base_ratio=layout.base_ratio)
        controllers = [*options.pop("controllers", ()), control]
        return fuse(model, [layout.base], windows, canvas, controllers=controllers, **options)
    prompts = layout.prompts + ([layout.background] if layout.background else [])
    union = masks.amax(0)
    views = []
    for w in windows:
        for r in range(len(layout.regions)):
            crop = masks[r][w.box]
            if bool(crop.any()):
                weight = crop * float(crop.mean()) ** coverage_power
                views.append(View(w.top, w.left, w.height, w.width, r, weight, bootstrap=True))
        rest = 1 - union[w.box]
        if layout.background and bool(rest.any()):
            views.append(View(w.top, w.left, w.height, w.width, len(prompts) - 1, rest))
    return fuse(model, prompts, views, canvas, bootstrap=bootstrap, **options)


def grid_views(model, prompt: str, *, grid: tuple[int, int] = (2, 2),
               **options) -> np.ndarray:
    """``rows x cols`` views of ``prompt`` (N, H, W, 3), generated as one canvas of that many
    native-size tiles in one model call per step (no fusion: one view covering the canvas)."""
    rows, cols = (count("grid rows", grid[0]), count("grid columns", grid[1]))
    wh, ww = _window(model)
    canvas = (rows * wh, cols * ww)
    image = fuse(model, [prompt], [View(0, 0, *canvas)], canvas, **options)
    if options.get("output") == "latent":
        return image
    size = model.image_size
    return np.stack([image[r * size:(r + 1) * size, c * size:(c + 1) * size]
                     for r in range(rows) for c in range(cols)])
