"""ToyWorld renderer: anti-aliased RGB images, per-object masks and edge maps from a Scene.

Shapes are drawn from signed distance functions (negative inside, in pixels); the coverage of a
pixel is ``clip(0.5 - d, 0, 1)``, a one-pixel anti-aliasing ramp at any image size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np

from .scene import BACKGROUNDS, COLORS, Scene

__all__ = ["Rendering", "render", "shape_polygon", "signed_distance", "stripe_bands"]

OUTLINE_WIDTH = 0.05  # outline thickness, fraction of the image side
STRIPE_PERIOD = 0.09  # diagonal stripe period, fraction of the image side
STRIPE_GAP_MIX = 0.6  # stripe gaps: this much of the background mixed into the object colour


@dataclass(frozen=True)
class Rendering:
    """A rendered scene. ``image`` (H, W, 3) uint8; ``masks`` (K, H, W) float32 silhouettes in
    [0, 1] for the K objects; ``edges`` (H, W) float32 silhouette outlines."""

    image: np.ndarray
    masks: np.ndarray
    edges: np.ndarray

    @property
    def background_mask(self) -> np.ndarray:
        return np.clip(1.0 - self.masks.sum(0), 0.0, 1.0)


@cache
def shape_polygon(shape: str) -> np.ndarray:
    """Vertices (N, 2) of a shape with bounding box [-1, 1]^2 (y down), centred; circle: None."""
    if shape == "square":
        s = 0.86  # squares look bigger than circles of the same extent; shrink a little
        pts = [(-s, -s), (s, -s), (s, s), (-s, s)]
    elif shape == "triangle":
        # Equilateral, apex up, scaled so its bounding box is [-1, 1] wide and centred.
        h = math.sqrt(3.0)
        pts = [(0.0, -h / 2), (1.0, h / 2), (-1.0, h / 2)]
        pts = [(x, y * 2 / h) for x, y in pts]
    elif shape == "star":
        pts = []
        for i in range(10):
            a = -math.pi / 2 + i * math.pi / 5
            r = 1.0 if i % 2 == 0 else 0.42
            pts.append((r * math.cos(a), r * math.sin(a)))
    elif shape == "heart":
        t = np.linspace(0, 2 * math.pi, 72, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = list(zip(x, y, strict=True))
    elif shape == "circle":
        return None
    else:
        raise ValueError(f"unknown shape {shape!r}")
    p = np.asarray(pts, dtype=np.float64)
    lo, hi = p.min(0), p.max(0)
    return (p - (lo + hi) / 2) / ((hi - lo).max() / 2)


def _polygon_sdf(px: np.ndarray, py: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Exact signed distance to a simple polygon (negative inside), even-odd rule."""
    a = poly
    b = np.roll(poly, -1, axis=0)
    d2 = np.full(px.shape, np.inf)
    inside = np.zeros(px.shape, dtype=bool)
    for (ax, ay), (bx, by) in zip(a, b, strict=True):
        ex, ey = bx - ax, by - ay
        wx, wy = px - ax, py - ay
        h = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        d2 = np.minimum(d2, (wx - ex * h) ** 2 + (wy - ey * h) ** 2)
        crosses = (ay > py) != (by > py)
        x_at = ax + (py - ay) * ex / np.where(ey == 0, 1e-12, ey)
        inside ^= crosses & (px < x_at)
    d = np.sqrt(d2)
    return np.where(inside, -d, d)


def signed_distance(shape: str, center, radius: float, size: int) -> np.ndarray:
    """Signed distance in pixels (H, W) of one shape; ``center``/``radius`` in image fractions."""
    c = (np.arange(size) + 0.5) / size
    px, py = np.meshgrid(c, c)
    ux, uy = (px - center[0]) / radius, (py - center[1]) / radius
    poly = shape_polygon(shape)
    if poly is None:
        d_unit = np.sqrt(ux**2 + uy**2) - 1.0
    else:
        d_unit = _polygon_sdf(ux, uy, poly)
    return d_unit * radius * size


def _coverage(d: np.ndarray) -> np.ndarray:
    return np.clip(0.5 - d, 0.0, 1.0)


@lru_cache(maxsize=8)
def stripe_bands(size: int) -> np.ndarray:
    """(size, size) coverage of the colour bands of the striped style (the rest is gap)."""
    c = (np.arange(size) + 0.5) / size
    px, py = np.meshgrid(c, c)
    phase = ((px + py) / STRIPE_PERIOD) % 1.0
    period = STRIPE_PERIOD * size / math.sqrt(2.0)  # across the diagonal bands, pixels
    dist = np.minimum(phase, 1 - phase) * period  # to the nearest band centre line
    return _coverage(period / 4 - dist)  # half of each period is a colour band


def render(scene: Scene, size: int = 64) -> Rendering:
    """Draw ``scene`` at ``size``×``size`` pixels."""
    bg = np.asarray(BACKGROUNDS[scene.background], dtype=np.float64) / 255.0
    img = np.broadcast_to(bg, (size, size, 3)).copy()
    masks, edges = [], np.zeros((size, size))
    for obj in scene.objects:
        d = signed_distance(obj.shape, obj.center, obj.radius, size)
        silhouette = _coverage(d)
        colour = np.asarray(COLORS[obj.color], dtype=np.float64) / 255.0
        if scene.style == "solid":
            paint = silhouette[..., None] * colour
            alpha = silhouette
        elif scene.style == "outlined":
            w = OUTLINE_WIDTH * size
            alpha = _coverage(np.abs(d + w / 2) - w / 2)
            paint = alpha[..., None] * colour
        else:  # striped: diagonal bands of colour and a background-tinted colour
            band = stripe_bands(size)
            gap = STRIPE_GAP_MIX * bg + (1 - STRIPE_GAP_MIX) * colour
            mix = band[..., None] * colour + (1 - band[..., None]) * gap
            paint = silhouette[..., None] * mix
            alpha = silhouette
        img = img * (1 - alpha[..., None]) + paint
        masks.append(silhouette)
        edges = np.maximum(edges, np.clip(1.0 - np.abs(d), 0.0, 1.0))
    image = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
    return Rendering(
        image=image, masks=np.stack(masks).astype(np.float32), edges=edges.astype(np.float32)
    )
