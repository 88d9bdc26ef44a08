"""P2P colour edits with EDICT against Direct Inversion at 50 steps, CFG 3 and 5.

8 ToyBench colour cases on the shipped ToyWorld model; prints success, preserved and PSNR
outside the edit per method. About 8 minutes on one CPU thread.

    .venv/bin/python scripts/edict_edits.py
"""

import warnings

import numpy as np

from retouch.bench.editing import Method, edit_case, score_case
from retouch.models.pipeline import PipelineModel
from retouch.toyworld.editbench import make_cases


def main() -> None:
    warnings.simplefilter("ignore")  # the EDICT step-count warning is not news here
    model = PipelineModel.load(None)
    cases = make_cases(8, edit_types=("color",))
    chosen = [Method("p2p", "edict", "p2p"), Method("p2p", "direct", "p2p")]
    for cfg in (3.0, 5.0):
        records: dict[str, list[dict]] = {m.label: [] for m in chosen}
        for case in cases:
            out = edit_case(model, case, chosen, steps=50, cfg=cfg)
            for m in chosen:
                records[m.label].append(score_case(out[m.label][0], case))
        for label, scores in records.items():
            means = {k: float(np.mean([s[k] for s in scores]))
                     for k in ("success", "preserved", "bg_psnr")}
            print(f"cfg {cfg:.0f} {label}: " + ", ".join(f"{k} {v:.3f}" for k, v in means.items()))


if __name__ == "__main__":
    main()
