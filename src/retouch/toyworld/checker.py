"""ToyWorld checker: read the background and every object's attribute words back from an image.

Analysis by synthesis. The background is the border colour; objects are the connected blobs of
pixels far from it. For a blob of colour ``c`` on background ``b`` every pixel is read as its
coverage along the colour line, ``alpha = <p - b, c - b> / |c - b|^2``, and the renderer's own
geometry (``signed_distance``) predicts ``alpha`` for every shape x style hypothesis; the geometry
(centre, radius) of the best hypotheses is refined by pattern search. Shape and style are the best
hypothesis by weighted Jaccard agreement ``J = sum(min) / sum(max)``; size and position follow from
the fitted radius and centre. Every attribute whose evidence is weak is read as ``None``: the
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

from .render import OUTLINE_WIDTH, STRIPE_GAP_MIX, STRIPE_PERIOD, shape_polygon, signed_distance
from .scene import BACKGROUNDS, COLORS, POSITIONS, RESERVED_SHAPES, SHAPES, SIZES, STYLES, Scene

__all__ = ["ObjectReading", "Reading", "read", "score", "match_objects"]

ALL_SHAPES = SHAPES + RESERVED_SHAPES
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
# so that the mild blur of a VAE reconstruction changes J little
# Size / position, in image fractions.
SIZE_BAND = 0.06  # radius within this relative band of the small/big midpoint is unreadable
SIZE_RANGE = (0.5 * min(SIZES.values()), 1.5 * max(SIZES.values()))  # plausible radii
POSITION_TOL = 0.09  # centre farther than this from every POSITIONS centre: no position word
MATCH_DISTANCE = 0.12  # match_objects: an object farther than this from a target is unmatched
# Template cache: canonical signed distance on an N x N grid over [-L, L]^2 (unit radius).
_GRID_N, _GRID_L = 161, 1.6
_REFINE_ITERATIONS, _REFINE_MIN_STEP = 40, 0.02  # pattern search budget; final radius step
_CROP_MARGIN = 3  # pixels around a blob's bounding box kept for fitting
_COLUMNS = (0.26, 0.5, 0.74)  # caption order: these x columns left to right, then top to bottom


@dataclass(frozen=True)
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


@dataclass(frozen=True)
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
    """(size, size) alpha of a striped object's paint (1 on colour bands, 1 - mix in the gaps),
    blurred by COMPARE_BLUR. The bands depend on pixel position only; same construction as
    ``render``.
    """
    c = (np.arange(size) + 0.5) / size
    px, py = np.meshgrid(c, c)
    phase = ((px + py) / STRIPE_PERIOD) % 1.0
    period = STRIPE_PERIOD * size / math.sqrt(2.0)
    band = np.clip(0.5 - (period / 4 - np.minimum(phase, 1 - phase) * period), 0.0, 1.0)
    return ndimage.gaussian_filter(band + (1.0 - band) * (1.0 - STRIPE_GAP_MIX), COMPARE_BLUR)


def _distance(shape: str, geoms: np.ndarray, xs, ys, size: int) -> np.ndarray:
    """(M, h, w) signed distance in pixels of ``shape`` at ``geoms`` (M, 3) = (cx, cy, r) rows,
    on pixel centres ``xs``, ``ys`` (h, w), all in image fractions."""
    cx, cy, r = (geoms[:, k, None, None] for k in range(3))
    scale = _GRID_N / (2.0 * _GRID_L)  # template pixels per unit radius
    rows = ((ys - cy) / r) * scale + _GRID_N / 2 - 0.5
    cols = ((xs - cx) / r) * scale + _GRID_N / 2 - 0.5
    d = ndimage.map_coordinates(_canonical_sdf(shape), [rows, cols], order=1, mode="nearest")
    return d * r * size


def _predictions(d: np.ndarray, stripes: np.ndarray, size: int) -> np.ndarray:
    """(len(STYLES), *d.shape) predicted alpha of every style, blurred by COMPARE_BLUR, from the
    signed distance ``d`` in pixels.

    render.py's edge ``clip(0.5 - d, 0, 1)`` is a uniform-CDF ramp (variance 1/12 px^2); blurred
    by a Gaussian it is close to ``Phi(-d / s)`` with ``s^2 = COMPARE_BLUR^2 + 1/12``, drawn here
    as the linear ramp of the same slope at the edge, ``clip(0.5 - d / (s sqrt(2 pi)), 0, 1)``.
    An outline of width ``w`` is the difference of the edges at ``d`` and ``d + w``; stripes
    multiply the silhouette by the (blurred) paint pattern.
    """
    ramp = math.hypot(COMPARE_BLUR, math.sqrt(1.0 / 12.0)) * math.sqrt(2.0 * math.pi)
    cover = np.clip(0.5 - d / ramp, 0.0, 1.0)
    w = OUTLINE_WIDTH * size
    by_style = {
        "solid": cover,
        "outlined": cover - np.clip(0.5 - (d + w) / ramp, 0.0, 1.0),
        "striped": cover * stripes,
    }
    return np.stack([by_style[k] for k in STYLES])


class _Fitter:
    """Fits shape x style hypotheses to one blob's observed alpha (h, w) on its crop."""

    def __init__(self, alpha: np.ndarray, xs, ys, stripes: np.ndarray, size: int):
        self.alpha = ndimage.gaussian_filter(alpha, COMPARE_BLUR)
        self.xs, self.ys, self.stripes, self.size = xs, ys, stripes, size

    def agreements(self, shape: str, geoms: np.ndarray) -> np.ndarray:
        """(len(STYLES), M) weighted Jaccard J = sum(min) / sum(max) of observed and predicted
        alpha for ``geoms`` (M, 3)."""
        pred = _predictions(_distance(shape, geoms, self.xs, self.ys, self.size), self.stripes,
                            self.size)
        inter = np.minimum(pred, self.alpha).sum((-1, -2))
        return inter / np.maximum(np.maximum(pred, self.alpha).sum((-1, -2)), 1e-9)

    def refine(self, shape: str, geom: np.ndarray) -> tuple[np.ndarray, float]:
        """Pattern search over (cx, cy, log r) from ``geom`` maximising the best style's J: take
        the best of the six moves if it improves, else halve the steps (from 0.5 px and 4%)."""
        params = np.array([geom[0], geom[1], math.log(geom[2])])
        best = float(self.agreements(shape, geom[None]).max())
        step = np.array([0.5 / self.size, 0.5 / self.size, 0.04])
        moves = np.concatenate([np.eye(3), -np.eye(3)])
        for _ in range(_REFINE_ITERATIONS):
            trials = params + moves * step
            geoms = np.column_stack([trials[:, :2], np.exp(trials[:, 2])])
            j = self.agreements(shape, geoms).max(0)
            k = int(j.argmax())
            if j[k] > best:
                params, best = trials[k], float(j[k])
            elif step[2] > _REFINE_MIN_STEP:
                step = step / 2
            else:
                break
        return np.array([params[0], params[1], math.exp(params[2])]), best


def _background(img: np.ndarray) -> tuple[str | None, np.ndarray | None]:
    """Background word and measured colour from the border; (None, None) if it is not uniform."""
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    med = np.median(border, axis=0)
    if np.mean(np.linalg.norm(border - med, axis=1) < BACKGROUND_TOL) < BORDER_AGREEMENT:
        return None, None
    dist = np.linalg.norm(_BACKGROUND_RGB - med, axis=1)
    k = int(dist.argmin())
    return (list(BACKGROUNDS)[k] if dist[k] < BACKGROUND_TOL else None), med


def _palette_labels(img: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """(H, W) index of the palette colour whose line ``b + alpha (c - b)`` passes nearest each
    pixel (``alpha`` in ALPHA_RANGE: faded by blur or stripes is fine), -1 where none is within
    LINE_TOL."""
    rel = img - bg  # (H, W, 3)
    axis = _PALETTE - bg  # (C, 3)
    alpha = rel @ axis.T / np.maximum((axis * axis).sum(1), 1e-9)  # (H, W, C)
    resid = np.linalg.norm(rel[..., None, :] - alpha[..., None] * axis, axis=-1)
    resid[(alpha < ALPHA_RANGE[0]) | (alpha > ALPHA_RANGE[1])] = np.inf
    return np.where(resid.min(-1) < LINE_TOL, resid.argmin(-1), -1)


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


def _colour(pixels: np.ndarray, bg: np.ndarray, labels: np.ndarray) -> tuple[str | None, np.ndarray]:
    """Colour word (majority vote of core pixels) and the measured colour of a blob."""
    dist = np.linalg.norm(pixels - bg, axis=1)
    core = dist >= CORE_FRACTION * np.quantile(dist, CORE_QUANTILE)
    measured = np.median(pixels[core], axis=0)
    votes = np.bincount(labels[core][labels[core] >= 0], minlength=len(_PALETTE))
    k = int(votes.argmax())
    name = list(COLORS)[k] if votes[k] >= COLOR_VOTE * core.sum() else None
    return name, measured


def _size(radius: float) -> str | None:
    mid = math.sqrt(SIZES["small"] * SIZES["big"])
    if not SIZE_RANGE[0] <= radius <= SIZE_RANGE[1] or abs(math.log(radius / mid)) < SIZE_BAND:
        return None
    return "small" if radius < mid else "big"


def _position(center: tuple[float, float]) -> str | None:
    dist = {k: math.dist(center, c) for k, c in POSITIONS.items()}
    k = min(dist, key=dist.get)
    return k if dist[k] <= POSITION_TOL else None


def _read_blob(img, blob, bg, labels, stripes) -> ObjectReading | None:
    """Read one blob (H, W) bool; None if no hypothesis explains it as an object."""
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
    ys, xs = np.mgrid[crop]
    fitter = _Fitter(alpha, (xs + 0.5) / size, (ys + 0.5) / size, stripes[crop], size)
    box_w, box_h = (x1 - x0) / size, (y1 - y0) / size
    centre = ((x0 + x1) / 2 / size, (y0 + y1) / 2 / size)
    initial = {}
    for shape in ALL_SHAPES:
        hw, hh = _half_extent(shape)
        geom = np.array([*centre, (box_w / hw + box_h / hh) / 4])  # bbox-fitted radius
        initial[shape] = (geom, float(fitter.agreements(shape, geom[None]).max()))
    top = sorted(initial, key=lambda s: initial[s][1], reverse=True)[:2]
    fits = {s: fitter.refine(s, initial[s][0]) for s in top}
    first, second = sorted(fits, key=lambda s: fits[s][1], reverse=True)
    (geom, j1), (geom2, j2) = fits[first], fits[second]
    if j1 < OBJECT_MIN_FIT:
        return None
    shape = first if j1 >= SHAPE_MIN_FIT and j1 - j2 >= SHAPE_MARGIN else None
    j_style = fitter.agreements(first, geom[None])[:, 0]
    order = np.argsort(-j_style)
    style = STYLES[order[0]] if j_style[order[0]] - j_style[order[1]] >= STYLE_MARGIN else None
    size_word = _size(geom[2])
    if shape is None and _size(geom2[2]) != size_word:
        size_word = None
    return ObjectReading(
        shape=shape,
        color=color,
        size=size_word,
        position=_position((float(geom[0]), float(geom[1]))),
        style=style,
        center=(float(geom[0]), float(geom[1])),
        radius=float(geom[2]),
        fit=float(j1),
        mask=filled,
        bbox=(int(x0), int(y0), int(x1), int(y1)),
    )


def _as_rgb(image) -> np.ndarray:
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
    labels = _palette_labels(img, bg)
    objects = []
    for k, area in enumerate(np.bincount(blobs.ravel(), minlength=n + 1)[1:], start=1):
        if area < min_area:
            continue
        for part in _split_by_colour(blobs == k, labels, min_area):
            if part.sum() >= min_area:
                obj = _read_blob(img, part, bg, labels, _stripe_factor(size))
                if obj is not None:
                    objects.append(obj)
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
    ``parse_caption`` dict; attributes the expectation omits are None (not scored).

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
