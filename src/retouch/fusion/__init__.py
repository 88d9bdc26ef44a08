"""Fusing diffusion paths: windows of a canvas denoised together and averaged (MultiDiffusion),
synchronised toward an anchor view (SyncDiffusion), region layouts.

* :mod:`~retouch.fusion.views` — :class:`View` (a window, its prompt and weights),
  :func:`window_boxes`;
* :mod:`~retouch.fusion.denoiser` — :class:`FusedDenoiser` (the canvas's fused ``x0_hat``) and
  :class:`Bootstrap`;
* :mod:`~retouch.fusion.sync` — :class:`SyncDiffusion` and its perceptual distances;
* :mod:`~retouch.fusion.layout` — :class:`RegionLayout` (boxes or an RPG split, with prompts).

The recipes over these are in :mod:`retouch.recipes.fusion`.
"""

from retouch.fusion.denoiser import Bootstrap, FusedDenoiser
from retouch.fusion.layout import LAYOUT_KEYS, Region, RegionLayout, split_boxes
from retouch.fusion.sync import (
    LPIPS_FILES,
    SyncDiffusion,
    VAEFeatureDistance,
    colour_statistics,
    lpips_distance,
)
from retouch.fusion.views import View, coverage, window_boxes

__all__ = ["Bootstrap", "FusedDenoiser", "LAYOUT_KEYS", "LPIPS_FILES", "Region", "RegionLayout",
           "SyncDiffusion", "VAEFeatureDistance", "View", "colour_statistics", "coverage",
           "lpips_distance", "split_boxes", "window_boxes"]
