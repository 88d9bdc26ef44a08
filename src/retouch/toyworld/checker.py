"""ToyWorld checker: read the background and every object's attribute words back from an image.

Analysis by synthesis. The background is the border colour; objects are the connected blobs of
pixels far from it. For a blob of colour ``c`` on background ``b`` every pixel is read as its
coverage along the colour line, ``alpha = <p - b, c - b> / |c - b|^2``, and the renderer's own
geometry (``signed_distance``) predicts ``alpha`` for every shape x style hypothesis; the geometry
(centre, radius) of the best hypotheses is refined by pattern search. Shape and style are the best
hypothesis by weighted Jaccard agreement ``J = sum(min) / sum(max)``; size and position follow from
the fitted radius and centre. A blob holding two palette colours is split where that explains it
better (touching objects). Every attribute whose evidence is weak is read as ``None``: the
checker judges benchmarks, so it abstains rather than guesses.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
from scipy import ndimage

from .render import OUTLINE_WIDTH, STRIPE_GAP_MIX, shape_polygon, signed_distance, stripe_bands
from .scene import BACKGROUNDS, COLORS, POSITIONS, RESERVED_SHAPES, SHAPES, SIZES, STYLES, Scene

__all__ = ["ObjectReading", "Reading", "read", "score", "match_objects"]

_ALL_SHAPES = SHAPES + RESERVED_SHAPES
_PALETTE = np.array(list(COLORS.values()), dtype=np.float64)  # (C, 3) sRGB
_BACKGROUND_RGB = np.array(list(BACKGROUNDS.values()), dtype=np.float64)  # (B, 3)

# Background and segmentation (8-bit RGB distances; the closest palette/background pair,
# purple on gray, is ~101 apart, and a striped gap is 40% of that away from the background).
BACKGROUND_TOL = 40.0  # the border median must be this close to a BACKGROUNDS colour to name it
BORDER_AGREEMENT = 0.8  # share of border pixels near the border median for a "clear" background
FOREGROUND_DIST = 28.0  # pixels farther than this from the background are foreground
MIN_AREA_FRACTION = 0.003  # smaller blobs are specks (a small star covers ~0.014 of the image)
# Colour: core pixels (the most saturated ones) vote for their nearest palette colour.
CORE_QUANTILE, CORE_FRACTION = 0.9, 0.85  # core = distance >= CORE_FRACTION * that quantile
LINE_TOL = 30.0  # a core pixel farther than this from every palette colour line votes for none
ALPHA_RANGE = (0.55, 1.35)  # ... or outside this stretch of the line (b at 0, c at 1)
COLOR_VOTE = 0.6  # the winning colour needs this share of the core pixels
# Shape / style: weighted Jaccard agreements J in [0, 1] of observed and predicted alpha.
OBJECT_MIN_FIT = 0.5  # a blob no hypothesis explains this well is not an object
SHAPE_MIN_FIT = 0.75  # the best shape needs this J ...
SHAPE_MARGIN = 0.04  # ... and this lead over the runner-up
STYLE_MARGIN = 0.02  # the best style's lead over the runner-up at the best shape
COMPARE_BLUR = 0.7  # pixels; observation and predictions are both blurred by this before J,
IMAGE_BLURS = (0.0, 0.5, 0.9)  # ... and predictions also by the best of these (the image's blur)
# Size / position, in image fractions.
SIZE_BAND = 0.06  # radius within this relative band of the small/big midpoint is unreadable
SIZE_RANGE = (0.5 * min(SIZES.values()), 1.5 * max(SIZES.values()))  # plausible radii
POSITION_TOL = 0.09  # centre farther than this from every POSITIONS centre: no position word
MATCH_DISTANCE = 0.12  # match_objects: an object farther than this from a target is unmatched
# Template cache: canonical signed distance on an N x N grid over [-L, L]^2 (unit radius).
_GRID_N, _GRID_L = 161, 1.6
_REFINE_ITERATIONS, _REFINE_MIN_STEP = 40, 0.02  # pattern search budget; final radius step
_INITIAL_SCALES = (0.84, 0.92, 1.0, 1.08)  # radius multipliers tried before refining
_CROP_MARGIN = 3  # pixels around a blob's bounding box kept for fitting
_COLUMNS = sorted({x for x, _ in POSITIONS.values()})  # caption order: columns, then top-down


@dataclass(frozen=True, eq=False)
class ObjectReading:
    """One object read from an image; attribute words are None when the evidence is weak."""

    shape: str | None
    color: str | None
    size: str | None
    position: str | None
    style: str | None
    center: tuple[float, float]  # fitted centre (x, y), fractions of the image side
    radius: float  # fitted radius, fraction of the image side (SIZES units)
    fit: float  # agreement J of the best shape x style hypothesis
    mask: np.ndarray  # (H, W) bool filled silhouette
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1) pixels, end-exclusive


@dataclass(frozen=True, eq=False)
class Reading:
    """Everything read from one image: background word and objects in caption order."""

    background: str | None
    objects: list[ObjectReading]

    @property
    def style(self) -> str | None:
        """The scene's global style: the strict plurality of the objects' readable styles."""
        votes = Counter(o.style for o in self.objects if o.style is not None).most_common(2)
        if not votes or (len(votes) == 2 and votes[0][1] == votes[1][1]):
            return None
        return votes[0][0]


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
def _stripe_factor(size: int) -> np.ndarray:
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


class _Fitter:
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
        for shape in _ALL_SHAPES:
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


def _background(img: np.ndarray) -> tuple[str | None, np.ndarray | None]:
    """Background word and measured colour from the border; (None, None) if it is not uniform."""
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    med = np.median(border, axis=0)
    if np.mean(np.linalg.norm(border - med, axis=1) < BACKGROUND_TOL) < BORDER_AGREEMENT:
        return None, None
    dist = np.linalg.norm(_BACKGROUND_RGB - med, axis=1)
    k = int(dist.argmin())
    return (list(BACKGROUNDS)[k] if dist[k] < BACKGROUND_TOL else None), med


def _palette_labels(img: np.ndarray, bg: np.ndarray, where: np.ndarray) -> np.ndarray:
    """(H, W) index of the palette colour whose line ``b + alpha (c - b)`` passes nearest each
    pixel of ``where`` (``alpha`` in ALPHA_RANGE: faded by blur or stripes is fine); -1 where no
    line is within LINE_TOL, and outside ``where``."""
    rel = img[where] - bg  # (P, 3)
    axis = _PALETTE - bg  # (C, 3)
    alpha = rel @ axis.T / np.maximum((axis * axis).sum(1), 1e-9)  # (P, C)
    resid = np.linalg.norm(rel[:, None, :] - alpha[..., None] * axis, axis=-1)
    resid[(alpha < ALPHA_RANGE[0]) | (alpha > ALPHA_RANGE[1])] = np.inf
    labels = np.full(where.shape, -1)
    labels[where] = np.where(resid.min(-1) < LINE_TOL, resid.argmin(-1), -1)
    return labels


def _split_by_colour(blob: np.ndarray, labels: np.ndarray, min_area: float) -> list[np.ndarray]:
    """Split a blob holding two or more well-supported palette colours (touching objects)."""
    counts = np.bincount(labels[blob & (labels >= 0)], minlength=len(_PALETTE))
    major = [k for k in np.flatnonzero(counts >= min_area / 2) if counts[k] >= 0.15 * counts.sum()]
    if len(major) < 2:
        return [blob]
    seeds = blob & np.isin(labels, major)
    _, (iy, ix) = ndimage.distance_transform_edt(~seeds, return_indices=True)
    nearest = labels[iy, ix]  # every blob pixel takes the colour of its nearest seed pixel
    return [blob & (nearest == k) for k in major]


def _colour(pixels: np.ndarray, bg: np.ndarray, labels: np.ndarray):
    """Colour word or None (majority vote of core pixels) and measured colour (3,) of a blob's
    pixels (P, 3) with palette labels (P,)."""
    dist = np.linalg.norm(pixels - bg, axis=1)
    core = dist >= CORE_FRACTION * np.quantile(dist, CORE_QUANTILE)
    measured = np.median(pixels[core], axis=0)
    votes = np.bincount(labels[core][labels[core] >= 0], minlength=len(_PALETTE))
    k = int(votes.argmax())
    name = list(COLORS)[k] if votes[k] >= COLOR_VOTE * core.sum() else None
    return name, measured


def _size(radius: float) -> str | None:
    """Size word of a fitted radius; None near the small/big (geometric) midpoint."""
    mid = math.sqrt(SIZES["small"] * SIZES["big"])
    if not SIZE_RANGE[0] <= radius <= SIZE_RANGE[1] or abs(math.log(radius / mid)) < SIZE_BAND:
        return None
    return "small" if radius < mid else "big"


def _position(center: tuple[float, float]) -> str | None:
    """Nearest POSITIONS word of a fitted centre; None if it is far from all of them."""
    dist = {k: math.dist(center, c) for k, c in POSITIONS.items()}
    k = min(dist, key=dist.get)
    return k if dist[k] <= POSITION_TOL else None


def _read_blob(img: np.ndarray, blob: np.ndarray, bg: np.ndarray, labels: np.ndarray,
               stripes: np.ndarray) -> ObjectReading | None:
    """Read one blob (H, W) bool of ``img`` (H, W, 3); None if no hypothesis explains it."""
    size = img.shape[0]
    color, measured = _colour(img[blob], bg, labels[blob])
    filled = ndimage.binary_fill_holes(blob)
    ys_idx, xs_idx = np.nonzero(filled)
    x0, x1, y0, y1 = xs_idx.min(), xs_idx.max() + 1, ys_idx.min(), ys_idx.max() + 1
    cy0, cx0 = max(y0 - _CROP_MARGIN, 0), max(x0 - _CROP_MARGIN, 0)
    crop = np.s_[cy0 : min(y1 + _CROP_MARGIN, size), cx0 : min(x1 + _CROP_MARGIN, size)]
    paint = measured if color is None else np.asarray(COLORS[color], dtype=np.float64)
    line = paint - bg  # alpha = <p - b, c - b> / |c - b|^2 along the blob's colour line
    alpha = np.clip((img[crop] - bg) @ line / max(line @ line, 1e-9), 0.0, 1.2)
    alpha *= ndimage.binary_dilation(blob, iterations=2)[crop]  # ignore neighbouring objects
    ys = (np.arange(crop[0].start, crop[0].stop) + 0.5) / size
    xs = (np.arange(crop[1].start, crop[1].stop) + 0.5) / size
    fitter = _Fitter(alpha, xs, ys, stripes[crop], size)
    box = ((x1 - x0) / size, (y1 - y0) / size)
    (first, geom, j_first), (_, geom2, j_second) = fitter.fit(
        ((x0 + x1) / 2 / size, (y0 + y1) / 2 / size), box)
    j1, j2 = j_first.max(), j_second.max()
    if j1 < OBJECT_MIN_FIT:
        return None
    explained = j1 >= SHAPE_MIN_FIT  # else the fitted geometry and style mean little
    shape = first if explained and j1 - j2 >= SHAPE_MARGIN else None
    lead = np.diff(np.sort(j_first)[-2:])[0]
    style = STYLES[int(j_first.argmax())] if lead >= STYLE_MARGIN else None
    size_word = _size(geom[2])
    if shape is None and _size(geom2[2]) != size_word:
        size_word = None
    position = _position((float(geom[0]), float(geom[1])))
    if not explained:
        style = size_word = position = None
    return ObjectReading(shape, color, size_word, position, style,
                         center=(float(geom[0]), float(geom[1])), radius=float(geom[2]),
                         fit=float(j1), mask=filled, bbox=(int(x0), int(y0), int(x1), int(y1)))


def _as_rgb(image) -> np.ndarray:
    """(S, S, 3) float64 in 0..255 from a uint8 image or a float image in [0, 1]."""
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] != arr.shape[1]:
        raise ValueError(f"expected a square (H, W, 3) RGB image, got shape {arr.shape}")
    img = arr.astype(np.float64)
    return img * 255.0 if np.issubdtype(arr.dtype, np.floating) else img


def read(image) -> Reading:
    """Read an (S, S, 3) RGB image (uint8, or float in [0, 1]) into background and objects."""
    img = _as_rgb(image)
    background, bg = _background(img)
    if bg is None:  # no clear background: nothing can be segmented against it
        return Reading(background=None, objects=[])
    size = img.shape[0]
    min_area = MIN_AREA_FRACTION * size * size
    foreground = np.linalg.norm(img - bg, axis=-1) > FOREGROUND_DIST
    blobs, n = ndimage.label(foreground)
    labels = _palette_labels(img, bg, foreground)
    objects = []
    stripes = _stripe_factor(size)
    for k, area in enumerate(np.bincount(blobs.ravel(), minlength=n + 1)[1:], start=1):
        if area < min_area:
            continue
        whole = _read_blob(img, blobs == k, bg, labels, stripes)
        parts = _split_by_colour(blobs == k, labels, min_area)
        if len(parts) > 1:  # touching objects, or one object whose colour is mixed up?
            split = [_read_blob(img, p, bg, labels, stripes) if p.sum() >= min_area else None
                     for p in parts]
            # keep the split only if every part is an object explained better than the whole
            if all(split) and min(o.fit for o in split) > (whole.fit if whole else 0.0):
                objects.extend(split)
                continue
        if whole is not None:
            objects.append(whole)
    objects.sort(key=lambda o: (np.abs(np.subtract(_COLUMNS, o.center[0])).argmin(), o.center[1]))
    return Reading(background=background, objects=objects)


def match_objects(
    objects: Sequence[ObjectReading],
    centers: Sequence[tuple[float, float] | None],
    *,
    max_distance: float = MATCH_DISTANCE,
) -> list[ObjectReading | None]:
    """Pair each target with a distinct read object: nearest centre (greedy) where the target's
    centre is given, else the remaining objects in caption order. Unmatched targets get None."""
    out: list[ObjectReading | None] = [None] * len(centers)
    free = list(range(len(objects)))
    pairs = sorted(
        (math.dist(c, o.center), i, j)
        for i, c in enumerate(centers)
        if c is not None
        for j, o in enumerate(objects)
    )
    for dist, i, j in pairs:
        if dist <= max_distance and out[i] is None and j in free:
            out[i] = objects[j]
            free.remove(j)
    for i, c in enumerate(centers):
        if c is None and free:
            out[i] = objects[free.pop(0)]
    return out


def score(image, expected: Scene | dict) -> dict[str, bool | None]:
    """Per-attribute correctness of ``image`` (or a ``Reading``) against a Scene or a
    ``parse_caption`` dict; attributes the expectation omits are None (not scored), and an
    attribute the checker cannot read scores False. Objects are matched by centre (a Scene's
    true centres, a caption's position words), else in caption order.

    Keys: color, shape, size, position, style, background, count, all.
    """
    reading = image if isinstance(image, Reading) else read(image)
    if isinstance(expected, Scene):
        attrs = ("shape", "color", "size", "position")
        objs = [{a: getattr(o, a) for a in attrs} for o in expected.objects]
        centers = [o.center for o in expected.objects]
        background, style = expected.background, expected.style
    else:
        objs = expected["objects"]
        centers = [POSITIONS[o["position"]] if "position" in o else None for o in objs]
        background, style = expected.get("background"), expected.get("style")
    matched = match_objects(reading.objects, centers)
    out: dict[str, bool | None] = {}
    for attr in ("color", "shape", "size", "position"):
        want = [(o[attr], m) for o, m in zip(objs, matched) if attr in o]
        out[attr] = all(m is not None and getattr(m, attr) == v for v, m in want) if want else None
    out["style"] = None if style is None else reading.style == style
    out["background"] = None if background is None else reading.background == background
    out["count"] = len(reading.objects) == len(objs)
    out["all"] = all(v for v in out.values() if v is not None)
    return out
