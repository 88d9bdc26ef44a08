"""Noise models for sets of images and frames: independent, shared, mixed and warped noise.

Each returns standard Gaussian noise of shape (F, C, h, w), one row per frame, drawn on the CPU
from a seeded generator (so the same seed gives the same noise on every device):

* :func:`independent_noise` — a fresh draw per frame;
* :func:`shared_noise` — the first frame's draw for every frame;
* :func:`mixed_noise` — Ge et al.'s mixed model (ICCV 2023, "Preserve Your Own Correlation",
  eq. 4): ``eps_i = sqrt(a^2 / (1 + a^2)) eps_shared + sqrt(1 / (1 + a^2)) eps_ind,i``: every
  frame is still N(0, 1), and two frames correlate by ``a^2 / (1 + a^2)``;
* :func:`warped_noise` — noise carried along a known motion (Chang et al., ICLR 2024, "How I
  Warped Your Noise"). Each latent pixel is the normalised sum of ``k x k`` i.i.d. N(0, 1)
  sub-pixels (drawn conditionally on the pixel, so the first frame is exactly the given noise);
  the sub-pixels move with the flow, and each later pixel is again the sum of the ``k^2``
  sub-pixels that land in it divided by ``k``. Where two sub-pixels land on one place, the one
  that moves most stays (the moving object covers what it passes over) and the other is dropped;
  a place nothing lands on (disoccluded) takes a fresh draw. Every frame is therefore exactly
  i.i.d. N(0, 1) per pixel, for any flow, while a pixel moving along the flow keeps its noise.
  (The paper warps each pixel's polygon; the nearest-sub-pixel transport here is its discrete
  form at resolution ``1/k``, exact for translations by multiples of ``1/k`` pixel.)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["NOISE_MODELS", "independent_noise", "shared_noise", "mixed_noise", "warped_noise",
           "frame_noise"]

NOISE_MODELS = ("independent", "shared", "mixed", "warped")


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def independent_noise(shape: tuple[int, ...], seed: int = 0) -> Tensor:
    """A fresh N(0, 1) draw per frame; ``shape`` (F, C, h, w)."""
    return torch.randn(shape, generator=_generator(seed))


def shared_noise(shape: tuple[int, ...], seed: int = 0) -> Tensor:
    """One N(0, 1) draw (the first frame's of :func:`independent_noise`) for every frame."""
    return independent_noise(shape, seed)[:1].expand(shape).clone()


def mixed_noise(shape: tuple[int, ...], seed: int = 0, mix: float = 1.0) -> Tensor:
    """Ge et al.'s mixed noise with weight ``mix`` (``a`` in the module doc; 0: independent,
    large: nearly shared). Frames correlate by ``mix^2 / (1 + mix^2)``."""
    if not math.isfinite(mix) or mix < 0:
        raise ValueError(f"mix must be a finite number >= 0, got {mix}; 1 correlates frames by 0.5")
    gen = _generator(seed)
    shared = torch.randn((1, *shape[1:]), generator=gen)
    own = torch.randn(shape, generator=gen)
    a2 = mix * mix
    return (a2 / (1 + a2)) ** 0.5 * shared + (1 / (1 + a2)) ** 0.5 * own


def _subpixels(noise: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """(C, h k, w k) i.i.d. N(0, 1) sub-pixels whose ``k x k`` block sums, divided by ``k``, are
    ``noise`` (C, h, w): ``s = x / k + (z - mean(z))`` per block, ``z`` i.i.d. N(0, 1)."""
    c, h, w = noise.shape
    z = torch.randn((c, h, k, w, k), generator=gen, dtype=noise.dtype)
    z = z - z.mean(dim=(2, 4), keepdim=True)
    s = noise[:, :, None, :, None] / k + z
    return s.reshape(c, h * k, w * k)


def _pool(sub: Tensor, k: int) -> Tensor:
    c, hk, wk = sub.shape
    return sub.reshape(c, hk // k, k, wk // k, k).sum(dim=(2, 4)) / k


def _transport(sub: Tensor, flow: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """Move sub-pixels (C, H, W) by ``flow`` (2, h, w), in latent pixels (dx, dy), taken at each
    sub-pixel's own latent pixel; collisions and holes get fresh draws (module doc)."""
    c, hh, ww = sub.shape
    f = flow.to(sub.dtype).repeat_interleave(k, 1).repeat_interleave(k, 2) * k  # sub-pixels
    ys, xs = torch.meshgrid(torch.arange(hh), torch.arange(ww), indexing="ij")
    tx = torch.floor(xs + f[0] + 0.5).long()  # round half up: a uniform motion stays uniform
    ty = torch.floor(ys + f[1] + 0.5).long()
    inside = (tx >= 0) & (tx < ww) & (ty >= 0) & (ty < hh)
    src = torch.nonzero(inside.flatten()).squeeze(1)
    dst = (ty * ww + tx).flatten()[src]
    # the source that moves most wins its destination: sort by speed, keep the first per target
    speed = (f[0] ** 2 + f[1] ** 2).flatten()[src]
    order = torch.argsort(speed, descending=True, stable=True)
    src, dst = src[order], dst[order]
    first = torch.ones_like(dst, dtype=torch.bool)
    sorted_dst, perm = torch.sort(dst, stable=True)
    first_sorted = torch.ones_like(sorted_dst, dtype=torch.bool)
    first_sorted[1:] = sorted_dst[1:] != sorted_dst[:-1]
    first[perm] = first_sorted
    out = torch.randn((c, hh * ww), generator=gen, dtype=sub.dtype)  # holes: fresh draws
    out[:, dst[first]] = sub.reshape(c, -1)[:, src[first]]
    return out.reshape(c, hh, ww)


def warped_noise(noise: Tensor, flows: Tensor, seed: int = 0, k: int = 8) -> Tensor:
    """Frames (F, C, h, w) of noise carried along ``flows`` (F - 1, 2, h, w): ``flows[i]`` moves
    frame ``i``'s pixels to frame ``i + 1`` (forward flow in latent pixels, x then y). The first
    frame is ``noise`` (C, h, w) itself; ``k`` sub-pixels per side (module doc)."""
    if noise.dim() != 3 or flows.dim() != 4 or flows.shape[1] != 2 or \
            flows.shape[2:] != noise.shape[1:]:
        raise ValueError(f"warped_noise needs noise (C, h, w) and flows (F-1, 2, h, w) of the "
                         f"same size; got {tuple(noise.shape)} and {tuple(flows.shape)}")
    if not torch.isfinite(flows).all():
        raise ValueError("the flows have non-finite values; give displacements in latent pixels")
    if k < 1:
        raise ValueError(f"k (sub-pixels per side) must be >= 1, got {k}")
    gen = _generator(seed)
    sub = _subpixels(noise.cpu().double(), k, gen)
    frames = [noise.cpu().double()]
    for flow in flows.cpu():
        sub = _transport(sub, flow, k, gen)
        frames.append(_pool(sub, k))
    return torch.stack(frames).to(noise.dtype)


def frame_noise(kind: str, shape: tuple[int, ...], seed: int = 0, *, mix: float = 1.0,
                flows: Tensor | None = None) -> Tensor:
    """Noise (F, C, h, w) of the model ``kind`` (:data:`NOISE_MODELS`); ``warped`` needs
    ``flows`` (F - 1, 2, h, w) and starts from :func:`independent_noise`'s first frame."""
    if kind not in NOISE_MODELS:
        raise ValueError(f"unknown noise model {kind!r}; choose one of {', '.join(NOISE_MODELS)}")
    if kind == "independent":
        return independent_noise(shape, seed)
    if kind == "shared":
        return shared_noise(shape, seed)
    if kind == "mixed":
        return mixed_noise(shape, seed, mix)
    if flows is None or flows.shape[0] != shape[0] - 1:
        got = "none" if flows is None else f"{flows.shape[0]}"
        raise ValueError(f"warped noise needs one flow per frame after the first ({shape[0] - 1}),"
                         f" got {got}; pass the clip's motion")
    return warped_noise(independent_noise((1, *shape[1:]), seed)[0], flows, seed + 1)
