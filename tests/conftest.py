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
def tiny_toy_run(tmp_path_factory) -> Path:
    """A `retouch toyworld train` run directory (barely trained: plumbing only). Read-only:
    tests that change a run copy it first."""
    from retouch.training.toyworld import TrainConfig, train

    run = tmp_path_factory.mktemp("toyrun")
    cfg = TrainConfig(out=str(run), dataset_size=48, vae_steps=2, unet_steps=2, batch=2,
                      unet_width=32, checkpoint_every=2, log_every=1)
    train(cfg, progress=False)
    return run


@pytest.fixture(scope="session")
def tiny_toy_pipeline(tiny_toy_run, tmp_path_factory) -> Path:
    """A diffusers folder exported from :func:`tiny_toy_run`."""
    from retouch.training.export import export_pipeline

    return export_pipeline(tiny_toy_run, tmp_path_factory.mktemp("toypipe") / "pipe")
