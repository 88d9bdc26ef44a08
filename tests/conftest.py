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


@pytest.fixture(scope="session")
def tiny_flow_pipeline(tiny_toy_pipeline, tmp_path_factory) -> Path:
    """A ToyWorld flow model (``--arch sd3``, 2 steps from :func:`tiny_toy_pipeline`'s VAE and
    text encoder) exported as a StableDiffusion3Pipeline folder: plumbing only."""
    from retouch.training.export import export_pipeline
    from retouch.training.toyworld import TrainConfig, train

    run = tmp_path_factory.mktemp("flowrun")
    train(TrainConfig(out=str(run), dataset_size=48, vae_steps=2, unet_steps=2, batch=2,
                      checkpoint_every=2, log_every=1, arch="sd3",
                      init_from=str(tiny_toy_pipeline)), progress=False)
    return export_pipeline(run, tmp_path_factory.mktemp("flowpipe") / "pipe")
