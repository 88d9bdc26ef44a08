"""Resumable training state in safetensors: atomic writes, prefixed state dicts, optimizers.

Nothing here unpickles: tensors go to safetensors, everything else (steps, parameter groups,
RNG states of Python) to its JSON metadata.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "atomic_save",
    "load",
    "prefixed",
    "unprefixed",
    "optimizer_tensors",
    "restore_optimizer",
    "append_log",
    "trim_log",
    "save_state",
    "restore_state",
]


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, meta: dict) -> None:
    tmp = path.with_suffix(".tmp")
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
        str(tmp),
        metadata={"meta": json.dumps(meta)},
    )
    os.replace(tmp, path)


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    return load_file(str(path)), meta


def prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in state.items()}


def unprefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in state.items() if k.startswith(prefix + ".")}


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            tensors[f"{idx}.{name}"] = torch.as_tensor(value)
    return tensors, sd["param_groups"]


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict, groups: list) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": groups})


def append_log(run: Path, record: dict) -> None:
    """Append one JSON line to the run's ``log.jsonl``."""
    with open(Path(run) / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def trim_log(run: Path, stage: str, step: int) -> None:
    """On resume from ``step``: drop the ``stage`` records after it (a killed run logged steps
    its last checkpoint does not hold; they are run, and logged, again). Atomic."""
    path = Path(run) / "log.jsonl"
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if not _after(line, stage, step)]
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


def _after(line: str, stage: str, step: int) -> bool:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:  # a line cut short by the kill
        return True
    return record.get("stage") == stage and record.get("step", 0) > step


def save_state(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
               gen: torch.Generator, meta: dict) -> None:
    """Atomically write a one-model training state: weights, optimizer, RNG and ``meta``."""
    tensors, groups = optimizer_tensors(opt)
    state = {**prefixed("model", model.state_dict()), **prefixed("opt", tensors)}
    state["rng"] = gen.get_state()
    atomic_save(state, path, {**meta, "param_groups": groups})


def restore_state(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
                  gen: torch.Generator) -> dict:
    """Load what :func:`save_state` wrote into ``model``, ``opt`` and ``gen``; returns meta."""
    tensors, meta = load(path)
    model.load_state_dict(unprefixed("model", tensors))
    restore_optimizer(opt, unprefixed("opt", tensors), meta["param_groups"])
    gen.set_state(tensors["rng"])
    return meta
