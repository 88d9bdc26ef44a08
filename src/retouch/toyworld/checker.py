"""ToyWorld checker: read the background and every object's attribute words back from an image.

Analysis by synthesis. The background is the border colour; objects are the connected blobs of
pixels far from it. For a blob of colour ``c`` on background ``b`` every pixel is read as its
coverage along the colour line, ``alpha = <p - b, c - b> / |c - b|^2``, and the renderer's own
geometry predicts ``alpha`` for every shape x style hypothesis (``fitting.py``: the geometry of the
best hypotheses is refined by pattern search). Shape and style are the best hypothesis by
weighted Jaccard agreement ``J = sum(min) / sum(max)``; size and position follow from
the fitted radius and centre. A blob holding two palette colours is split where that explains it
better (touching objects). Every attribute whose evidence is weak is read as ``None``: the
checker judges benchmarks, so it abstains rather than guesses.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .fitting import Fitter, stripe_factor
from .scene import BACKGROUNDS, COLORS, POSITIONS, SIZES, STYLES, Scene

__all__ = ["ObjectReading", "Reading", "read", "score", "match_objects"]

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
# Size / position, in image fractions.
SIZE_BAND = 0.06  # radius within this relative band of the small/big midpoint is unreadable
SIZE_RANGE = (0.5 * min(SIZES.values()), 1.5 * max(SIZES.values()))  # plausible radii
POSITION_TOL = 0.09  # centre farther than this from every POSITIONS centre: no position word
MATCH_DISTANCE = 0.12  # match_objects: an object farther than this from a target is unmatched
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
    fitter = Fitter(alpha, xs, ys, stripes[crop], size)
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
    stripes = stripe_factor(size)
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
