"""Is a ToyWorld VAE local? Latent blending assumes a latent cell decodes to its own pixels.

On held-out extended renders (seed 123), each render ``A`` inside its objects' region (dilated
one latent cell) and its partner ``B`` outside: the next render, or the next with the same
background. Prints
* the decoder: PSNR of decoding the latent composite against the pixel composite;
* the encoder: how far the latents of the pixel composite are from ``A``'s inside the region
  (eroded one cell) and from ``B``'s away from it, against the distance between ``A`` and
  ``B`` (a local encoder reads 0 and 0).

    .venv/bin/python scripts/vae_locality.py [--model DIR] [--renders N]

A few seconds on one CPU thread.
"""

import argparse

import torch
import torch.nn.functional as F

from retouch.toyworld.dataset import make_scenes, vocabulary
from retouch.training.decoder import composite, object_regions, same_background


def psnr_rows(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 10 * torch.log10(4 / ((x - y) ** 2).flatten(1).mean(1))  # images in [-1, 1]


def main() -> None:
    from diffusers import AutoencoderKL

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="src/retouch/toyworld/weights")
    parser.add_argument("--renders", type=int, default=128)
    args = parser.parse_args()
    vae = AutoencoderKL.from_pretrained(args.model, subfolder="vae").float().eval()
    data = make_scenes(args.renders, seed=123, size=64, mask_size=16, progress=False,
                       **vocabulary(True))
    x, region = data.images, object_regions(data.masks)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        for name, other in (("any background", torch.arange(len(x)).roll(-1)),
                            ("same background", same_background(data.scenes,
                                                                torch.arange(len(x))))):
            mixed = other != torch.arange(len(x))
            xc = composite(x, x[other], region)
            decoded = vae.decode(composite(z, z[other], region)).sample.clamp(-1, 1)
            zc = vae.encode(xc).latent_dist.mode()
            inner = (1 - F.max_pool2d(1 - region, 3, stride=1, padding=1)).bool()
            outer = (1 - F.max_pool2d(region, 3, stride=1, padding=1)).bool()
            inner, outer = inner[mixed].expand(-1, 4, -1, -1), outer[mixed].expand(-1, 4, -1, -1)
            za, zb, zm = z[mixed], z[other][mixed], zc[mixed]
            print(f"{name} ({int(mixed.sum())} pairs): decoded latent composite "
                  f"{psnr_rows(decoded[mixed], xc[mixed]).mean():.1f} dB against the pixel "
                  f"composite (round trips of the renders "
                  f"{psnr_rows(vae.decode(z).sample.clamp(-1, 1), x).mean():.1f} dB); encoder "
                  f"|z(composite) - z(A)| inside {(zm - za)[inner].abs().mean():.2f}, "
                  f"|z(composite) - z(B)| outside {(zm - zb)[outer].abs().mean():.2f}, "
                  f"|z(A) - z(B)| {(za - zb)[inner].abs().mean():.2f}")


if __name__ == "__main__":
    main()
