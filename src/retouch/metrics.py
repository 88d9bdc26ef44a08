"""Image fidelity metrics shared by benchmarks, reports and the trainer.

Images are numpy arrays or tensors of any layout whose last axis (or first, for CHW tensors,
it does not matter for PSNR) holds channels; ``data_range`` is the span of pixel values (255
for uint8, 2 for tensors in [-1, 1]). ``keep`` restricts a metric to a (H, W) boolean mask.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

__all__ = ["psnr", "ssim", "MSE_FLOOR"]

MSE_FLOOR = 1e-10  # identical images score 100 dB instead of infinity (averages stay finite)


def _as_float(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def psnr(a, b, *, data_range: float = 255.0, keep: np.ndarray | None = None) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(range^2 / mse)``, over ``keep`` (H, W)
    pixels of (H, W, C) images, or over everything."""
    diff = (_as_float(a) - _as_float(b)) / data_range
    if keep is not None:
        if not keep.any():
            return float("nan")
        diff = diff[keep]
    return 10 * math.log10(1.0 / max(float(np.mean(diff**2)), MSE_FLOOR))


def ssim(a, b, *, data_range: float = 255.0, keep: np.ndarray | None = None,
         sigma: float = 1.5) -> float:
    """Mean structural similarity of (H, W, C) images, Gaussian window ``sigma`` (Wang et al.
    2004, constants K1 = 0.01, K2 = 0.03), over ``keep`` (H, W) pixels or everything."""
    if keep is not None and not keep.any():
        return float("nan")
    x, y = _as_float(a) / data_range, _as_float(b) / data_range
    c1, c2 = 0.01**2, 0.03**2

    def blur(z):
        return ndimage.gaussian_filter(z, sigma=(sigma, sigma, 0))

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    s = s.mean(-1)
    return float(s[keep].mean() if keep is not None else s.mean())
