"""Ground truth for ``bench fusion``'s coherence measure (issue 17).

    python scripts/coherence_truth.py [N]

For each fill style, N panoramas of four rendered 64-pixel scenes that share one background
and one style (one object each, of one colour and shape): coherent by construction. Each is
scored by ``bench.fusion.panorama_scores`` as rendered, then rolled sideways by a quarter to
three quarters of a tile, so that the tiles the measure reads cut objects in two. Prints the
means: a sound measure reads them coherent. Session 18, N = 20: as rendered 1.0 for every
style; shifted 0.90 (solid), 1.00 (outlined), 0.85 (striped), about 10 seconds.
"""

import random
import sys

import numpy as np

from retouch.bench.fusion import panorama_scores
from retouch.toyworld.render import render
from retouch.toyworld.scene import BACKGROUNDS, COLORS, SHAPES, STYLES, random_scene

SIZE = 64


def main(n: int) -> None:
    rng = random.Random(0)
    for style in STYLES:
        aligned, shifted = [], []
        for _ in range(n):
            bg, color, shape = (rng.choice(tuple(BACKGROUNDS)), rng.choice(tuple(COLORS)),
                                rng.choice(SHAPES))
            tiles = [render(random_scene(rng, shapes=(shape,), colors=(color,), backgrounds=(bg,),
                                         styles=(style,), two_object_fraction=0.0), SIZE).image
                     for _ in range(4)]
            canvas = np.concatenate(tiles, axis=1)
            aligned.append(panorama_scores(canvas, color, shape, SIZE))
            roll = rng.randrange(SIZE // 4, 3 * SIZE // 4)
            shifted.append(panorama_scores(np.roll(canvas, roll, axis=1), color, shape, SIZE))
        print(style, *(f"{name}: " + ", ".join(f"{k} {np.mean([s[k] for s in scores]):.2f}"
                                               for k in scores[0])
                       for name, scores in (("as rendered", aligned), ("shifted", shifted))),
              sep="\n  ")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
