"""Shape x style hypotheses fitted to one blob's coverage, for the checker (see checker.py).

The renderer's own geometry (``signed_distance``) predicts the coverage ``alpha`` of every shape
x style hypothesis at a geometry (centre, radius); the geometry of the best hypotheses is refined
by pattern search, and hypotheses are compared by weighted Jaccard agreement
``J = sum(min) / sum(max)`` of observed and predicted alpha.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
from scipy import ndimage

from .render import OUTLINE_WIDTH, STRIPE_GAP_MIX, shape_polygon, signed_distance, stripe_bands
from .scene import RESERVED_SHAPES, SHAPES, STYLES

__all__ = ["Fitter", "stripe_factor", "ALL_SHAPES"]

ALL_SHAPES = SHAPES + RESERVED_SHAPES
COMPARE_BLUR = 0.7  # pixels; observation and predictions are both blurred by this before J,
IMAGE_BLURS = (0.0, 0.5, 0.9)  # ... and predictions also by the best of these (the image's blur)
# Template cache: canonical signed distance on an N x N grid over [-L, L]^2 (unit radius).
_GRID_N, _GRID_L = 161, 1.6
_REFINE_ITERATIONS, _REFINE_MIN_STEP = 40, 0.02  # pattern search budget; final radius step
_INITIAL_SCALES = (0.84, 0.92, 1.0, 1.08)  # radius multipliers tried before refining


@cache
def _canonical_sdf(shape: str) -> np.ndarray:
    """Unit-radius signed distance (in radii) of ``shape`` on the cached N x N template grid."""
    radius = 1.0 / (2.0 * _GRID_L)
    return signed_distance(shape, (0.5, 0.5), radius, _GRID_N) / (radius * _GRID_N)


@cache
def _half_extent(shape: str) -> tuple[float, float]:
    """Half width and half height of the shape's bounding box at unit radius."""
    poly = shape_polygon(shape)
    if poly is None:
        return 1.0, 1.0
    return tuple(float(v) for v in (poly.max(0) - poly.min(0)) / 2)


@cache
def stripe_factor(size: int) -> np.ndarray:
    """(size, size) alpha of a striped object's paint: 1 on colour bands, 1 - mix in the gaps.
    The bands depend on pixel position only; same construction as ``render``.
    """
    band = stripe_bands(size)
    return band + (1.0 - band) * (1.0 - STRIPE_GAP_MIX)


def _distance(shape: str, geoms: np.ndarray, xs: np.ndarray, ys: np.ndarray, size: int):
    """(M, h, w) signed distance in pixels of ``shape`` at ``geoms`` (M, 3) = (cx, cy, r) rows,
    on the pixel-centre grid ``xs`` (w,) x ``ys`` (h,), all in image fractions.

    Bilinear in the cached template; the grid is separable (no rotation), so the four template
    taps are gathered with outer (row, column) indices.
    """
    sdf = _canonical_sdf(shape)
    scale = _GRID_N / (2.0 * _GRID_L)  # template pixels per unit radius
    cx, cy, r = geoms[:, :1], geoms[:, 1:2], geoms[:, 2:]
    rows = np.clip((ys - cy) / r * scale + _GRID_N / 2 - 0.5, 0.0, _GRID_N - 1.001)  # (M, h)
    cols = np.clip((xs - cx) / r * scale + _GRID_N / 2 - 0.5, 0.0, _GRID_N - 1.001)  # (M, w)
    r0, c0 = rows.astype(np.intp)[:, :, None], cols.astype(np.intp)[:, None, :]
    fy, fx = rows[:, :, None] - r0, cols[:, None, :] - c0
    top = sdf[r0, c0] + fx * (sdf[r0, c0 + 1] - sdf[r0, c0])
    bottom = sdf[r0 + 1, c0] + fx * (sdf[r0 + 1, c0 + 1] - sdf[r0 + 1, c0])
    return (top + fy * (bottom - top)) * r[:, :, None] * size


def _predictions(d: np.ndarray, stripes: np.ndarray, size: int) -> np.ndarray:
    """(len(STYLES), *d.shape) alpha of every style from the signed distance ``d`` in pixels,
    exactly as render.py paints it: edge coverage ``clip(0.5 - d, 0, 1)``, an outline of width
    ``w`` inside the edge, stripes multiplying the silhouette by the paint pattern."""
    cover = np.clip(0.5 - d, 0.0, 1.0)
    w = OUTLINE_WIDTH * size
    by_style = {
        "solid": cover,
        "outlined": np.clip(0.5 - (np.abs(d + w / 2) - w / 2), 0.0, 1.0),
        "striped": cover * stripes,
    }
    return np.stack([by_style[k] for k in STYLES])


def _agreement(obs: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Weighted Jaccard J = sum(min) / sum(max) over the last two axes."""
    inter = np.minimum(pred, obs).sum((-1, -2))
    return inter / np.maximum(np.maximum(pred, obs).sum((-1, -2)), 1e-9)


class Fitter:
    """Fits shape x style hypotheses to one blob's observed alpha (h, w) on its crop.

    The geometry is searched against the sharp prediction (cheap); the final agreements that
    decide shape and style blur observation and prediction alike by COMPARE_BLUR, and the
    prediction also by the image's own blur (the best of IMAGE_BLURS), so that the mild blur of a
    VAE reconstruction changes them little.
    """

    def __init__(self, alpha: np.ndarray, xs, ys, stripes: np.ndarray, size: int):
        self.alpha, self.blurred = alpha, ndimage.gaussian_filter(alpha, COMPARE_BLUR)
        self.xs, self.ys, self.stripes, self.size = xs, ys, stripes, size

    def agreements(self, shape: str, geoms: np.ndarray, *, blur: bool = False) -> np.ndarray:
        """(len(STYLES), M) agreements J of observed and predicted alpha for ``geoms`` (M, 3)."""
        d = _distance(shape, geoms, self.xs, self.ys, self.size)
        pred = _predictions(d, self.stripes, self.size)
        if not blur:
            return _agreement(self.alpha, pred)
        # The image's own blur is unknown: take each hypothesis at its best extra blur.
        return np.max([
            _agreement(self.blurred, ndimage.gaussian_filter(pred, (0, 0, s, s)))
            for s in np.hypot(COMPARE_BLUR, IMAGE_BLURS)
        ], axis=0)

    def refine(self, shape: str, geom: np.ndarray) -> np.ndarray:
        """Pattern search over (cx, cy, log r) from ``geom`` maximising the best style's J: take
        the best of the six moves if it improves, else halve the steps (from 0.5 px and 4%)."""
        params = np.array([geom[0], geom[1], math.log(geom[2])])
        best = float(self.agreements(shape, geom[None]).max())
        step = np.array([0.5 / self.size, 0.5 / self.size, 0.04])
        moves = np.concatenate([np.eye(3), -np.eye(3)])
        for _ in range(_REFINE_ITERATIONS):
            trials = params + moves * step
            j = self.agreements(shape, np.column_stack([trials[:, :2], np.exp(trials[:, 2])]))
            k = int(j.max(0).argmax())
            if j[:, k].max() > best:
                params, best = trials[k], float(j[:, k].max())
            elif step[2] > _REFINE_MIN_STEP:
                step = step / 2
            else:
                break
        return np.array([params[0], params[1], math.exp(params[2])])

    def fit(self, centre, box) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """The two best shapes, best first, as (shape, geom (3,), final J per style), from the
        blob's bounding box: centre (x, y) and extent (w, h), image fractions."""
        initial = {}
        for shape in ALL_SHAPES:
            hw, hh = _half_extent(shape)
            radius = (box[0] / hw + box[1] / hh) / 4  # bbox-fitted; blur and thresholds bias it
            geoms = np.array([[*centre, radius * k] for k in _INITIAL_SCALES])
            j = self.agreements(shape, geoms).max(0)
            initial[shape] = (float(j.max()), geoms[int(j.argmax())])
        fits = []
        for shape in sorted(initial, key=lambda s: initial[s][0], reverse=True)[:2]:
            geom = self.refine(shape, initial[shape][1])
            fits.append((shape, geom, self.agreements(shape, geom[None], blur=True)[:, 0]))
        return sorted(fits, key=lambda f: f[2].max(), reverse=True)
