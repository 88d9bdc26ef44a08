"""Object properties read from the model's own attention, differentiable in the latents.

For a word ``k`` and its cross-attention map ``A`` (the probability each query cell gives the
word's tokens, averaged over heads; shape ``(..., h, w)``), Epstein et al. define

* ``centroid(k) = sum_{h,w} (x, y) A_{h,w} / sum_{h,w} A_{h,w}``, here with cell centres in
  image fractions ``x = (j + 1/2) / w``, ``y = (i + 1/2) / h`` so that sites of every
  resolution agree;
* ``size(k) = 1/(HW) sum_{h,w} A_{h,w}`` (the mean of the map over the image);
* ``shape(k) = sigmoid(s (norm(A) - tau))``: the map scaled to [0, 1] by its minimum and
  maximum, then a soft threshold at ``tau`` with sharpness ``s``;
* ``appearance(k) = sum shape(k) psi / sum shape(k)``: the shape-weighted mean of a layer's
  activations ``psi`` (C, H, W), the shape resized to their grid.

:class:`PropertyRecorder` is the map store: a reading controller that keeps, for the current
model call only and with gradients, the conditional half's cross-attention maps at its sites and
one module's activations.

References: Epstein et al. 2023 (Diffusion Self-Guidance, the properties of its Sec. 3).
"""

from __future__ import annotations

from collections.abc import Collection

import torch
import torch.nn.functional as F
from torch import Tensor

from retouch.attention.control import AttnCall, Controller, StepInfo
from retouch.attention.sites import Site

__all__ = ["centroid", "size", "shape", "appearance", "transform", "translate", "scale_about",
           "PropertyRecorder", "SHAPE_THRESHOLD", "SHAPE_SHARPNESS"]

SHAPE_THRESHOLD = 0.5  # tau: where the soft threshold of a [0, 1]-normalised map sits
SHAPE_SHARPNESS = 10.0  # s: slope of the sigmoid (the unofficial reference code's value)
TINY = 1e-12  # floor of denominators (a map with no mass, a flat map)


def _grid(a: Tensor) -> tuple[Tensor, Tensor]:
    """Cell-centre coordinates (x, y) of ``a``'s last two axes, in image fractions."""
    h, w = a.shape[-2:]
    ys = (torch.arange(h, device=a.device, dtype=a.dtype) + 0.5) / h
    xs = (torch.arange(w, device=a.device, dtype=a.dtype) + 0.5) / w
    return xs, ys


def centroid(a: Tensor) -> Tensor:
    """Attention-weighted mean position (x, y) in image fractions: (..., h, w) -> (..., 2)."""
    xs, ys = _grid(a)
    mass = a.sum((-2, -1)).clamp_min(TINY)
    x = (a.sum(-2) * xs).sum(-1) / mass
    y = (a.sum(-1) * ys).sum(-1) / mass
    return torch.stack([x, y], -1)


def size(a: Tensor) -> Tensor:
    """Mean of the map over the image: (..., h, w) -> (...)."""
    return a.mean((-2, -1))


def shape(a: Tensor, *, threshold: float = SHAPE_THRESHOLD,
          sharpness: float = SHAPE_SHARPNESS) -> Tensor:
    """Soft-thresholded map ``sigmoid(s (norm(a) - tau))``, ``norm`` scaling each map to
    [0, 1] by its min and max: (..., h, w) -> (..., h, w)."""
    lo = a.amin((-2, -1), keepdim=True)
    hi = a.amax((-2, -1), keepdim=True)
    norm = (a - lo) / (hi - lo).clamp_min(TINY)
    return torch.sigmoid(sharpness * (norm - threshold))


def appearance(weights: Tensor, features: Tensor) -> Tensor:
    """Weighted mean of activations: weights (B, h, w), features (B, C, H, W) -> (B, C).

    The weights (e.g. a shape) are resized bilinearly to the features' grid first.
    """
    if weights.shape[-2:] != features.shape[-2:]:
        weights = F.interpolate(weights[:, None], size=features.shape[-2:], mode="bilinear",
                                align_corners=False)[:, 0]
    w = weights.to(features.dtype)[:, None]  # (B, 1, H, W)
    return (w * features).sum((-2, -1)) / w.sum((-2, -1)).clamp_min(TINY)


def _warp(a: Tensor, theta: Tensor) -> Tensor:
    """Sample maps (..., h, w) at ``theta @ [x, y, 1]`` (normalised coordinates), zeros
    outside."""
    lead, (h, w) = a.shape[:-2], a.shape[-2:]
    img = a.reshape(-1, 1, h, w)
    grid = F.affine_grid(theta.to(a).expand(img.shape[0], 2, 3), list(img.shape),
                         align_corners=False)
    out = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.reshape(*lead, h, w)


def transform(a: Tensor, *, offset: tuple[float, float] = (0.0, 0.0), factor: float = 1.0,
              center: tuple[float, float] = (0.5, 0.5)) -> Tensor:
    """Maps (..., h, w) scaled by ``factor`` about ``center``, then moved by ``offset`` (image
    fractions; bilinear, zeros where nothing maps): the edit ``T`` of a self-guidance shape."""
    if factor != 1.0:
        a = scale_about(a, factor, center)
    if offset != (0.0, 0.0):
        a = translate(a, offset)
    return a


def translate(a: Tensor, offset: tuple[float, float]) -> Tensor:
    """Maps (..., h, w) moved by ``offset`` = (dx, dy) in image fractions (bilinear; what
    leaves the grid is lost, what enters is zero)."""
    dx, dy = offset
    # output(p) = input(p - d); normalised coordinates span 2 per image side
    theta = torch.tensor([[1.0, 0.0, -2.0 * dx], [0.0, 1.0, -2.0 * dy]])
    return _warp(a, theta)


def scale_about(a: Tensor, factor: float, center: tuple[float, float]) -> Tensor:
    """Maps (..., h, w) scaled by ``factor`` about ``center`` (x, y) in image fractions."""
    cx, cy = (2.0 * center[0] - 1.0, 2.0 * center[1] - 1.0)
    inv = 1.0 / factor  # output(p) = input(c + (p - c) / factor)
    theta = torch.tensor([[inv, 0.0, cx * (1 - inv)], [0.0, inv, cy * (1 - inv)]])
    return _warp(a, theta)


class PropertyRecorder(Controller):
    """Cross-attention maps and one module's activations of the current call, with gradients.

    Acts only on calls made with gradients enabled (a loss-guided call), so a sampling step
    outside the guidance window costs nothing; ``always`` records every call (a reader that
    guides nothing, e.g. of a donor image's looks). :meth:`take` returns and forgets them:
    ``maps`` is a list of (R, h, w, T) per site (R latent rows of the ``half``), ``features``
    (R, C, H, W) or None.
    """

    uses_probs = True
    rewrites = False  # reads only

    def __init__(self, *, resolutions: Collection[int] | None = None,
                 places: Collection[str] = ("down", "mid", "up"),
                 feature_module: str | None = None, half: str = "cond", always: bool = False):
        self.resolutions = None if resolutions is None else set(resolutions)  # site sides
        self.places = tuple(places)  # UNet parts whose cross-attention is read
        self.feature_module = feature_module  # module path whose output is psi
        self.half = half  # guidance half whose rows are read
        self.always = always  # record without gradients too
        self.maps: list[Tensor] = []
        self.features: Tensor | None = None

    def select(self, site: Site) -> bool:
        return (site.kind == "cross" and site.place in self.places
                and (self.resolutions is None or site.resolution in self.resolutions))

    def missing_sites_message(self) -> str:
        res = "any resolution" if self.resolutions is None else (
            "resolution " + ", ".join(map(str, sorted(self.resolutions))))
        return (f"PropertyRecorder wants cross-attention at {res} in "
                f"{'/'.join(self.places)} blocks, which this model lacks")

    def active(self, call: AttnCall | StepInfo) -> bool:
        return self.always or torch.is_grad_enabled()

    def probs(self, call: AttnCall, p: Tensor) -> Tensor:
        m = p[call.layout.half_rows(self.half)].mean(1)  # (R, N, T), mean over heads
        self.maps.append(m.reshape(m.shape[0], *call.hw, m.shape[-1]))
        return p

    def hooks(self, unet: torch.nn.Module):
        if self.feature_module is None:
            return {}

        def keep(info: StepInfo, output: Tensor, inputs) -> Tensor:
            self.features = output[info.layout.half_rows(self.half)]
            return output

        return {self.feature_module: keep}

    def take(self) -> tuple[list[Tensor], Tensor | None]:
        """The maps and features recorded since the last call, forgotten here."""
        maps, feats = self.maps, self.features
        self.maps, self.features = [], None
        return maps, feats
