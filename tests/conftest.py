"""Shared fixtures: one CPU thread, and a tiny ToyWorld pipeline made by retouch's trainer."""

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tests use tiny tensors: more threads only add contention on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_toy_pipeline(tmp_path_factory) -> Path:
    """A diffusers folder made by `train` + `export_pipeline` (barely trained: plumbing only)."""
    from retouch.toyworld.train import TrainConfig, export_pipeline, train

    run = tmp_path_factory.mktemp("toyrun")
    cfg = TrainConfig(out=str(run), dataset_size=48, vae_steps=2, unet_steps=2, batch=2,
                      unet_width=32, checkpoint_every=2, log_every=1)
    train(cfg, progress=False)
    return export_pipeline(run, tmp_path_factory.mktemp("toypipe") / "pipe")
