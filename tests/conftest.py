"""Shared fixtures: a tiny ToyWorld pipeline trained for two steps by retouch's own trainer."""

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_toy_pipeline(tmp_path_factory) -> Path:
    """A diffusers folder made by `train` + `export_pipeline` (barely trained: plumbing only)."""
    from retouch.toyworld.train import TrainConfig, export_pipeline, train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = tmp_path_factory.mktemp("toyrun")
        cfg = TrainConfig(out=str(run), dataset_size=48, vae_steps=2, unet_steps=2, batch=2,
                          unet_width=32, checkpoint_every=2, log_every=1)
        train(cfg, progress=False)
        return export_pipeline(run, tmp_path_factory.mktemp("toypipe") / "pipe")
    finally:
        torch.set_num_threads(threads)
