"""Coverage of cross-attention maps (issue 14): the measure, the training term, its options."""

import math
import random
import shutil

import pytest
import torch

from retouch.bench.coverage import soft_iou, threshold_iou
from retouch.training.grounding import coverage_loss, grounding_loss


def _square_mask(side=8, lo=2, hi=5):
    m = torch.zeros(side, side)
    m[lo:hi, lo:hi] = 1.0  # a 3 x 3 "big object": 9 cells
    return m


def test_soft_iou_of_hand_made_maps():
    m = _square_mask()
    assert soft_iou(m, m) == pytest.approx(1.0)
    assert soft_iou(5.0 * m, m) == pytest.approx(1.0)  # maps are scaled to max 1 first
    point = torch.zeros(8, 8)
    point[3, 3] = 0.7  # all the mass on one cell of the object: the shipped model's failure
    assert soft_iou(point, m) == pytest.approx(1 / 9)
    assert threshold_iou(point, m) == pytest.approx(1 / 9)
    half = m.clone()
    half[2, 2:5] = 0.5  # one row of the object at half strength
    assert soft_iou(half, m) == pytest.approx((6 + 1.5) / 9)
    assert threshold_iou(half, m) == pytest.approx(1.0)  # 0.5 >= 0.3 x max: all cells on
    outside = torch.zeros(8, 8)
    outside[7, 7] = 1.0
    assert soft_iou(outside, m) == 0.0 and threshold_iou(outside, m) == 0.0
    # a batch of maps gives one value each
    both = soft_iou(torch.stack([m, point]), torch.stack([m, m]))
    assert both.shape == (2,) and both.tolist() == pytest.approx([1.0, 1 / 9])


def _store(maps: torch.Tensor) -> list:
    """One stored layer (B, N, T) whose token 1 attends with ``maps`` (B, S, S)."""
    b, s, _ = maps.shape
    probs = torch.full((b, s * s, 4), 1e-9)
    probs[:, :, 1] = maps.flatten(1)
    return [probs / probs.sum(-1, keepdim=True)]


@pytest.mark.parametrize("kind", ["bce", "kl"])
def test_coverage_loss_is_least_for_the_mask_uniform_map(kind):
    m = _square_mask(16, 4, 10)  # 36 cells at 16 x 16
    masks = torch.stack([m, torch.zeros_like(m), 1 - m])[None]  # (1, 3, 16, 16)
    region = torch.tensor([[-1, 0, -1, -1]])  # token 1 names object 0
    uniform = m / m.sum()
    point = torch.zeros(16, 16)
    point[7, 7] = 1.0
    spread = torch.ones(16, 16) / 256  # covers the object, and everything else too
    losses = {name: coverage_loss(_store(a[None]), masks, region, kind)
              for name, a in (("uniform", uniform), ("point", point), ("spread", spread))}
    if kind == "kl":
        assert losses["uniform"][0] == pytest.approx(0.0, abs=1e-5)
    else:
        assert losses["uniform"][0] < 1e-3
    assert losses["point"][0] > 1.0 > losses["uniform"][0] + 0.5
    assert losses["spread"][0] > losses["uniform"][0]
    assert losses["uniform"][1] == pytest.approx(1.0, abs=1e-4)  # soft IoU, logged
    assert losses["point"][1] == pytest.approx(1 / 36, abs=1e-4)
    # the token loss cannot tell the point from the uniform map: both put all mass inside
    assert grounding_loss(_store(point[None]), masks, region)[1] == pytest.approx(1.0, abs=1e-4)
    # and the coverage term has a gradient that spreads a point
    p = point.clone().requires_grad_(True)
    coverage_loss(_store(p[None]), masks, region, kind)[0].backward()
    assert p.grad[m.bool()].abs().sum() > 0
    with pytest.raises(ValueError, match="coverage loss must be one of bce, kl"):
        coverage_loss(_store(point[None]), masks, region, "l2")


@pytest.mark.parametrize("changes, flag", [
    ({"grounding_weight": -0.1}, "--grounding-weight -0.1"),
    ({"grounding_weight": math.nan}, "--grounding-weight nan"),
    ({"coverage_loss": "kl", "coverage_weight": math.inf}, "--coverage-weight inf"),
    ({"coverage_loss": "kl", "coverage_weight": -1.0}, "--coverage-weight -1.0"),
    ({"teacher_weight": math.nan}, "--teacher-weight nan"),
    ({"teacher_weight": -1.0}, "--teacher-weight -1.0"),
])
def test_bad_loss_weights_are_refused_before_any_work(tmp_path, changes, flag):
    from retouch.training.toyworld import TrainConfig, train

    out = tmp_path / "never"
    with pytest.raises(ValueError, match="a loss weight must be a finite number >= 0") as err:
        train(TrainConfig(out=str(out), **changes), progress=False)
    assert str(err.value).startswith(flag) and "\n" not in str(err.value)
    assert not out.exists()


def test_coverage_weight_and_loss_go_together(tmp_path):
    from retouch.training.toyworld import TrainConfig, train

    for changes in ({"coverage_weight": 0.1}, {"coverage_loss": "kl"}):
        with pytest.raises(ValueError, match="needs both a loss and a weight"):
            train(TrainConfig(out=str(tmp_path / "x"), **changes), progress=False)
    with pytest.raises(ValueError, match="unknown loss; pass one of bce, kl"):
        train(TrainConfig(out=str(tmp_path / "x"), coverage_loss="l1", coverage_weight=0.1),
              progress=False)
    with pytest.raises(ValueError, match=r"--partial-captions 1.5: a share must be in \[0, 1\]"):
        train(TrainConfig(out=str(tmp_path / "x"), partial_captions=1.5), progress=False)
    with pytest.raises(ValueError, match=r"--free-style -0.1: a share must be in \[0, 1\]"):
        train(TrainConfig(out=str(tmp_path / "x"), extended=True, free_style=-0.1),
              progress=False)
    with pytest.raises(ValueError, match="--free-style 0.2: only the extended vocabulary has "
                                         "fill styles; add --extended"):
        train(TrainConfig(out=str(tmp_path / "x"), free_style=0.2), progress=False)
    assert not (tmp_path / "x").exists()


def test_a_resumed_run_keeps_its_coverage_options(tiny_toy_run, tmp_path):
    """The tiny run trained without the coverage term: resuming it with one is refused by name;
    with the coverage term a run trains, logs the term and its soft IoU, and resumes."""
    from retouch.training.checkpoint import load
    from retouch.training.toyworld import TrainConfig, train

    run = tmp_path / "run"
    shutil.copytree(tiny_toy_run, run)
    common = dict(out=str(run), dataset_size=48, vae_steps=2, unet_steps=4, batch=2,
                  unet_width=32, checkpoint_every=2, log_every=1)
    for changes, name in (({"coverage_loss": "kl", "coverage_weight": 0.05}, "coverage_loss"),
                          ({"partial_captions": 0.5}, "partial_captions")):
        with pytest.raises(ValueError, match=f"--resume with {name}=") as err:
            train(TrainConfig(**common, **changes), resume=True, progress=False)
        assert "start a new --out" in str(err.value)
    fresh = dict(common, out=str(tmp_path / "cov"), unet_steps=2, coverage_loss="bce",
                 coverage_weight=0.05, partial_captions=0.5)
    train(TrainConfig(**fresh), progress=False)
    log = (tmp_path / "cov" / "log.jsonl").read_text().splitlines()
    assert '"cover"' in log[-1] and '"soft_iou"' in log[-1]
    with pytest.raises(ValueError, match="--resume with coverage_weight=0.1"):
        train(TrainConfig(**{**fresh, "coverage_weight": 0.1}), resume=True, progress=False)
    train(TrainConfig(**{**fresh, "unet_steps": 4}), resume=True, progress=False)
    assert load(tmp_path / "cov" / "unet.safetensors")[1]["step"] == 4


def test_partial_captions_leave_attributes_out():
    from retouch.toyworld.dataset import caption_batch
    from retouch.toyworld.scene import random_scene

    scenes = [random_scene(random.Random(i)) for i in range(400)]

    def texts(**kw):
        return caption_batch(scenes, rng=random.Random(0), max_tokens=32, cond_dropout=0.0,
                             **kw).texts

    sizes = ("small", "big")
    full = texts()
    assert texts(partial=0.0) == full  # the option off changes nothing, not even the stream
    no_size = [not any(w in t.split() for w in sizes) for t in texts(partial=1.0)]
    # two-object captions drop each object's size apart: 1/2 (one object) or 1/4 (two)
    assert 0.3 < sum(no_size) / len(no_size) < 0.5
    assert sum(not any(w in t.split() for w in sizes) for t in full) / len(full) < 0.1


def test_the_teacher_term_starts_at_zero_and_needs_a_model_to_start_from(tiny_toy_pipeline,
                                                                          tmp_path):
    """--teacher-weight holds the UNet's prediction to the --init-from model's: the student
    starts as the teacher, so the term is zero at the first step and grows once it moves; without
    --init-from there is no teacher, which is refused before any work."""
    import json

    from retouch.training.toyworld import TrainConfig, train

    cfg = TrainConfig(out=str(tmp_path / "t"), init_from=str(tiny_toy_pipeline), dataset_size=48,
                      unet_steps=3, batch=2, unet_width=32, lr=1e-2, warmup=1, log_every=1,
                      checkpoint_every=3, teacher_weight=1.0)
    train(cfg, progress=False)
    records = [json.loads(line) for line in (tmp_path / "t" / "log.jsonl").read_text().splitlines()
               if '"teacher"' in line]
    assert len(records) == 3
    assert records[0]["teacher"] < 1e-10 < records[-1]["teacher"]
    with pytest.raises(ValueError, match="--resume with teacher_weight=2.0 but the run"):
        train(TrainConfig(**{**cfg.__dict__, "teacher_weight": 2.0}), resume=True,
              progress=False)
    with pytest.raises(ValueError, match="--teacher-weight 1.0: the teacher is the --init-from"):
        train(TrainConfig(out=str(tmp_path / "never"), teacher_weight=1.0), progress=False)
    assert not (tmp_path / "never").exists()
