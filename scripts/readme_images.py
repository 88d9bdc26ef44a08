"""Regenerate the README's tour pictures on the shipped ToyWorld model.

docs/images/generate, invert, edit and attention.png, with the settings the README's commands
name. Run it after the shipped weights change:
.venv/bin/python scripts/readme_images.py [--out docs/images]

docs/images/ui.png is a browser screenshot of `retouch ui`: scripts/ui_screenshot.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from retouch.attention.maps import save_heatmaps
from retouch.files import save_image
from retouch.inversion import invert, reconstruct
from retouch.metrics import psnr
from retouch.models.pipeline import PipelineModel
from retouch.recipes.attention_maps import attention_maps
from retouch.recipes.edit import edit
from retouch.recipes.generate import generate, recommended_cfg
from retouch.toyworld.render import render
from retouch.toyworld.scene import ObjectSpec, Scene

SOURCE = ("a big red circle on the left and a small blue square on the right on a white "
          "background")
TARGET = SOURCE.replace("red", "green")
SCENE = Scene((ObjectSpec("circle", "red", "big", "left"),
               ObjectSpec("square", "blue", "small", "right")), background="white")
ZOOM = 3  # the 64x64 images, enlarged for the page


def _row(images) -> np.ndarray:
    row = np.concatenate([np.asarray(im) for im in images], axis=1)
    big = Image.fromarray(row).resize((row.shape[1] * ZOOM, row.shape[0] * ZOOM),
                                      Image.NEAREST)
    return np.asarray(big)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/images")
    out = Path(parser.parse_args().out)
    model = PipelineModel.load()
    photo = render(SCENE, model.image_size).image

    cfg = recommended_cfg(model)
    images = generate(model, [SOURCE] * 4, steps=25, cfg=cfg, seed=0)
    save_image(_row(images), out / "generate.png")  # the row `--n 4` saves, enlarged

    inv = invert(model, photo, SOURCE, method="bdia", steps=25, cfg=5.0)
    rec = model.decode(reconstruct(inv, model))[0]
    save_image(_row([photo, rec]), out / "invert.png")
    print(f"invert.png: BDIA at CFG 5 reconstructs to {psnr(photo, rec):.1f} dB")

    edited = edit(model, photo, SOURCE, TARGET, inversion="direct", editor="p2p", steps=25,
                  cfg=5.0).edited
    save_image(_row([photo, edited]), out / "edit.png")

    maps = attention_maps(model, SOURCE, image=photo, steps=25, cfg=5.0, seed=0)
    save_heatmaps(out / "attention.png", maps.heatmaps, image=maps.image)
    print(f"wrote {', '.join(n + '.png' for n in ('generate', 'invert', 'edit', 'attention'))} "
          f"in {out}")


if __name__ == "__main__":
    main()
