"""SyncDiffusion: a gradient step that pulls every view toward the anchor view's look.

Before each of the first ``steps`` MultiDiffusion steps, every view's latent ``x_v`` moves by
``-w_i grad_{x_v} d(D(x0_hat(x_v)), D(x0_hat(x_a)))``: ``D`` decodes the predicted clean latent,
``a`` is the anchor view (the middle one), ``d`` a perceptual distance and ``w_i = w decay^i``
(the paper's ``w = 20`` for LPIPS, decay 0.95, and the reference script's 10 synchronised
steps). The views' gradients come from one batched forward and backward pass per model call of
the fusion (the rows of a call are independent). The shifted windows are then denoised and
fused (:class:`FusedDenoiser`). The decoded images are not clamped to [-1, 1] (the reference
clamps before LPIPS), so the gradient also flows through pixels out of range.

The paper's distance is LPIPS, whose backbone needs pretrained weights that retouch cannot
download: :func:`lpips_distance` uses them when they are on disk. Two distances need nothing:
:class:`VAEFeatureDistance` compares the model's own VAE-encoder features the LPIPS way
(unit-normalised channels, squared differences, spatial mean, summed over blocks), or their
per-channel statistics (``statistics=True``, a layout-free style distance);
:func:`colour_statistics` compares the decoded images' own colours (each RGB channel's mean
and standard deviation over the image): layout-free, it pulls each view toward the anchor's
background and palette and leaves its content alone. The recipe's default
(:func:`retouch.recipes.fusion.sync_diffusion`) is the colour distance: on ToyWorld panoramas
it matched the VAE distance's coherence with one background more often and better per-window
adherence (:mod:`retouch.bench.fusion`).

References: Lee et al. 2023 (SyncDiffusion, NeurIPS; eq. 7-8, Sec. 5 settings); Zhang et al.
2018 (LPIPS).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..checks import count, finite
from ..denoiser import x0_of

__all__ = ["SyncDiffusion", "VAEFeatureDistance", "colour_statistics", "lpips_distance",
           "LPIPS_FILES"]

Distance = Callable[[Tensor, Tensor], Tensor]  # images (N, 3, H, W) in [-1, 1] x2 -> (N,)


class VAEFeatureDistance:
    """A perceptual distance on the features of ``vae``'s encoder blocks (see the module doc)."""

    def __init__(self, vae, *, statistics: bool = False):
        self.encoder, self.statistics = vae.encoder, statistics

    def features(self, images: Tensor) -> list[Tensor]:
        h = self.encoder.conv_in(images.to(self.encoder.conv_in.weight.dtype))
        feats = []
        for block in self.encoder.down_blocks:
            h = block(h)
            feats.append(h.float())
        return feats

    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        total = a.new_zeros(a.shape[0], dtype=torch.float32)
        for f in self.features(torch.cat([a, b])):
            fa, fb = f.chunk(2)
            if self.statistics:
                d = (fa.mean((2, 3)) - fb.mean((2, 3))) ** 2 + (
                    fa.std((2, 3)) - fb.std((2, 3))) ** 2
                total = total + d.mean(1)
            else:
                fa = fa / (fa.norm(dim=1, keepdim=True) + 1e-10)
                fb = fb / (fb.norm(dim=1, keepdim=True) + 1e-10)
                total = total + ((fa - fb) ** 2).sum(1).mean((1, 2))
        return total


def colour_statistics(a: Tensor, b: Tensor) -> Tensor:
    """Squared differences of each RGB channel's mean and standard deviation over the image,
    summed over channels: (N,) for images (N, 3, H, W) (see the module doc)."""
    a, b = a.float(), b.float()
    return ((a.mean((2, 3)) - b.mean((2, 3))) ** 2 + (a.std((2, 3)) - b.std((2, 3))) ** 2).sum(1)


#: The torchvision weights LPIPS's backbones load, by ``net`` (in ``torch.hub.get_dir()``'s
#: ``checkpoints`` folder); LPIPS's own linear layers ship inside the ``lpips`` package.
LPIPS_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth",
               "squeeze": "squeezenet1_1-b8a52dc0.pth"}


def lpips_distance(net: str = "vgg", device=None) -> Distance:
    """LPIPS (the paper's distance) when its weights are on disk; never downloads."""
    if net not in LPIPS_FILES:
        raise ValueError(f"unknown LPIPS net {net!r}; valid: {', '.join(LPIPS_FILES)}")
    path = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_FILES[net]
    try:
        import lpips
    except ImportError as exc:
        raise ValueError("the LPIPS distance needs the lpips package (pip install lpips, which "
                         f"needs torchvision) and {path}; or use the default colour "
                         "distance") from exc
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS-{net} needs torchvision's pretrained weights at {path} "
                                "(retouch never downloads): copy the file there, or use the "
                                "default colour distance")
    model = lpips.LPIPS(net=net, verbose=False).to(device).eval().requires_grad_(False)
    return lambda a, b: model(a, b).flatten()


@dataclass
class SyncDiffusion:
    """The SyncDiffusion gradient step (see the module doc). ``decode`` maps latents to images
    in [-1, 1] with gradients (``model.decode_tensor``); ``distance`` maps two image batches
    to one distance per row (:func:`colour_statistics`, a :class:`VAEFeatureDistance`, LPIPS);
    ``anchor`` is a view index (default: the middle view)."""

    decode: Callable[[Tensor], Tensor]
    distance: Distance
    weight: float = 20.0
    decay: float = 0.95
    steps: int = 10  # synchronise the first ``steps`` steps only
    anchor: int | None = None
    losses: list[float] = field(default_factory=list)  # mean distance to the anchor, per step

    def __post_init__(self):
        finite("the SyncDiffusion weight", self.weight, low=0)
        finite("the SyncDiffusion decay", self.decay, low=0, high=1)
        count("the SyncDiffusion steps", self.steps, minimum=0)

    def active(self, step: int) -> bool:
        return step < self.steps

    def shift(self, fused, crops: Tensor, t: float, step: int, batch: int) -> Tensor:
        """The views' windows (V * B, C, h, w) after one gradient step toward the anchor; one
        forward and backward pass per model call of the fusion (see ``views_per_call``)."""
        views = len(fused.views)
        anchor = views // 2 if self.anchor is None else self.anchor
        if not 0 <= anchor < views:
            raise ValueError(f"anchor view {anchor} is not one of the {views} views; give an "
                             f"index in [0, {views - 1}]")
        rows = slice(anchor * batch, (anchor + 1) * batch)
        chunks = fused.chunks(crops, batch)
        reference = None
        if len(chunks) > 1:  # the anchor's image first, from its own call
            per = fused.views_per_call * batch
            k = rows.start // per
            den, c = chunks[k]
            with torch.no_grad():
                images = self.decode(x0_of(den(c, t)))
            reference = images[rows.start - k * per : rows.stop - k * per]
        grads, losses = [], []
        for den, c in chunks:
            z = c.detach().requires_grad_(True)
            with torch.enable_grad():
                images = self.decode(x0_of(den(z, t)))
                if reference is None:
                    reference = images[rows].detach()
                loss = self.distance(images, reference.repeat(len(z) // batch, 1, 1, 1))
                (g,) = torch.autograd.grad(loss.sum(), z)
            grads.append(g)
            losses.append(loss.detach())
        grad, loss = torch.cat(grads), torch.cat(losses)
        grad[rows] = 0  # the anchor stays
        others = torch.ones(len(loss), dtype=torch.bool)
        others[rows] = False
        self.losses.append(float(loss[others].mean()) if others.any() else 0.0)
        return (crops - self.weight * self.decay ** step * grad.to(crops)).detach()
