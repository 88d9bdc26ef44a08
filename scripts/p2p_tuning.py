"""Prompt-to-Prompt settings against regeneration, on ToyBench colour and shape edits.

Cases of another seed than the editing bench's (7, not 2024), so the settings chosen here are
not fitted to the bench's cases. Each variant is P2P with Direct Inversion (or --inversion)
at the bench's 25 steps and CFG 5; the bench's blend is the baseline (maps at the coarsest
cross-attention level, threshold 0.3, 3x3 max-pool, from 20 % of the steps). Prints success,
preserved and the PSNR outside the edit per variant and edit type, and the dB over ``none``
with the same inversion.

    .venv/bin/python scripts/p2p_tuning.py [CASES] [--model DIR] [--inversion METHOD]
    [--variant NAME ...]

60 cases took 13 minutes on one CPU thread beside a training run (20 on the coverage candidate).
"""

import argparse
import warnings

import numpy as np

from retouch.bench.editing import BLEND, Method, edit_case, score_case
from retouch.bench.selfguide import object_word
from retouch.models.pipeline import PipelineModel
from retouch.toyworld.editbench import make_cases

VARIANTS = {
    "bench": {},
    "maps 16": {"blend_resolutions": (16,)},
    "maps 8+16": {"blend_resolutions": (8, 16)},
    "maps 16, thr 0.2": {"blend_resolutions": (16,), "blend_threshold": 0.2},
    "maps 16, dilation 2": {"blend_resolutions": (16,), "blend_dilation": 2},
    "cross 0.6": {"cross_steps": 0.6},
    "blend from 0": {"blend_start": 0.0},
    "self 0.6": {"self_steps": 0.6},  # self-attention injected longer (default 0.4)
    "self 0.8": {"self_steps": 0.8},
    # blending on the edited object's noun (P2P's own examples blend on the object's word),
    # alone or with the changed word; resolved per case by _blend_words
    # the same blend in pixels: the rows sample unblended, the edit keeps the source's pixels
    # outside the mask (the ToyWorld VAE is not local: retouch.attention.blend)
    "pixels": {"blend_space": "pixels"},
    "pixels, dilation 2": {"blend_space": "pixels", "blend_dilation": 2},
    "object word": {"blend_words": "object"},
    "object + changed words": {"blend_words": "object+changed"},
}
# P2P without local blending, with the bench's windows or longer ones (the bench's P2P after
# edit-friendly DDPM inversion keeps +1.6 to +1.8 dB outside the edit over regeneration; issue
# 14 asks +2)
UNBLENDED = {
    "no blend": {},
    "no blend, self 0.6": {"self_steps": 0.6},
    "no blend, self 0.8": {"self_steps": 0.8},
    "no blend, self 1.0": {"self_steps": 1.0},
    "no blend, cross 1.0": {"cross_steps": 1.0},
}


VALID = [*VARIANTS, *UNBLENDED]


def _options(name: str) -> dict:
    """The editor options of a variant: the bench's blend and the variant's changes, or the
    changes alone for the :data:`UNBLENDED` variants."""
    return dict(UNBLENDED[name]) if name in UNBLENDED else {**BLEND, **VARIANTS[name]}


def _blend_words(case, options: dict) -> dict:
    """``options`` with a per-case ``blend_words`` resolved: the edited object's word (its
    shape, or its colour when another object shares the shape), with or without the changed
    word (source word in the source prompt, target word in the target)."""
    how = options.get("blend_words")
    if how not in ("object", "object+changed"):
        return options
    word = object_word(case)
    old, new = (str(w) for w in case.words)
    target = new if word == old else word  # the word that names it in the target prompt
    pairs = ([word], [target]) if how == "object" else (
        sorted({word, old}), sorted({target, new}))
    return {**options, "blend_words": tuple(pairs)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cases", type=int, nargs="?", default=60)
    parser.add_argument("--types", default="color,shape")
    parser.add_argument("--model", default=None)
    parser.add_argument("--inversion", default="direct")
    parser.add_argument("--variant", action="append", default=None,
                        help=f"one of: {'; '.join(VALID)} (repeat it; default: all)")
    args = parser.parse_args()
    names = args.variant or VALID
    unknown = sorted(set(names) - set(VALID))
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; valid: {', '.join(VALID)}")
    warnings.simplefilter("ignore")
    model = PipelineModel.load(args.model)
    types = tuple(args.types.split(","))
    cases = make_cases(args.cases, seed=7, edit_types=types)
    inv = args.inversion
    chosen = [Method("none", inv, "none")] + [
        Method(name, inv, "p2p", _options(name))
        for name in names]
    records: dict[tuple[str, str], list[dict]] = {}
    for case in cases:
        out = edit_case(model, case, [Method(m.name, m.inversion, m.editor,
                                             _blend_words(case, m.options)) for m in chosen],
                        steps=25)
        for m in chosen:
            records.setdefault((m.name, case.edit_type), []).append(
                score_case(out[m.label][0], case))
    for edit_type in types:
        none_db = np.mean([s["bg_psnr"] for s in records["none", edit_type]])
        for m in chosen:
            scores = records[m.name, edit_type]
            means = {k: float(np.mean([s[k] for s in scores]))
                     for k in ("success", "preserved", "bg_psnr")}
            print(f"{edit_type:5s} {m.name:22s} n {len(scores)}: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in means.items())
                  + f", gain {means['bg_psnr'] - none_db:+.2f} dB", flush=True)


if __name__ == "__main__":
    main()
