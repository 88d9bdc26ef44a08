"""ToyWorld: scenes, captions, renderer, tokenizer, and a resumable, reproducible trainer."""

import random

import numpy as np
import pytest
import torch
from transformers import CLIPTokenizer

from retouch.toyworld.render import render
from retouch.toyworld.scene import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    RESERVED_SHAPES,
    SHAPES,
    STYLES,
    VOCABULARY,
    ObjectSpec,
    Scene,
    caption,
    parse_caption,
    random_scene,
)
from retouch.toyworld.tokenizer import build_vocab, save_tokenizer


def _scene():
    return Scene(
        objects=(
            ObjectSpec("circle", "red", "small", "left"),
            ObjectSpec("square", "blue", "big", "right"),
        ),
        background="gray",
    )


def test_canonical_caption_says_solid_when_asked():
    assert caption(_scene()).text == (
        "a small red circle on the left and a big blue square on the right on a gray background"
    )
    assert "style" not in parse_caption(caption(_scene()).text)  # any style: solid is right
    assert caption(_scene(), say_solid=True).text == ("a small red solid circle on the left and a "
                                                      "big blue solid square on the right on a "
                                                      "gray background")


@pytest.mark.parametrize(
    "index,change",
    [(0, {"color": "green"}), (1, {"shape": "triangle"}), (0, {"size": "big"}),
     (None, {"background": "black"}), (None, {"style": "striped"})],
)
def test_single_attribute_edit_changes_words_of_that_attribute_only(index, change):
    src = caption(_scene(), say_solid=True).words
    dst = caption(_scene().replace(index, **change), say_solid=True).words
    assert len(src) == len(dst)
    changed = [i for i, (a, b) in enumerate(zip(src, dst)) if a != b]
    # a global style word appears once per object; every other edit changes one word
    assert len(changed) == (2 if "style" in change else 1)


def test_caption_roles_and_parse_roundtrip():
    rng = random.Random(3)
    for _ in range(50):
        scene = random_scene(rng, styles=STYLES, positions=tuple(POSITIONS))
        cap = caption(scene)
        parsed = parse_caption(cap.text)
        assert [o["shape"] for o in parsed["objects"]] == [o.shape for o in scene.objects]
        assert [o["color"] for o in parsed["objects"]] == [o.color for o in scene.objects]
        assert parsed["background"] == scene.background
        for word, role in zip(cap.words, cap.roles):
            if role is not None and role[1] == "color":
                assert word == scene.objects[role[0]].color


def test_older_grammar_training_captions_keep_the_style_word_and_sometimes_say_solid():
    """Without ``free_style`` training keeps the older grammar (no style word means solid): it
    never drops an outlined or striped scene's style word, and ``solid_word`` makes some solid
    captions say "solid"."""
    from retouch.toyworld.dataset import caption_batch

    rng = random.Random(0)
    scenes = [random_scene(rng, styles=STYLES, positions=tuple(POSITIONS)) for _ in range(400)]
    for solid_word in (0.0, 0.5):
        batch = caption_batch(scenes, rng=rng, max_tokens=40, cond_dropout=0.0,
                              solid_word=solid_word)
        for scene, text in zip(scenes, batch.texts):
            if scene.style != "solid":
                assert scene.style in text.split()
        said = [("solid" in t.split()) for s, t in zip(scenes, batch.texts) if s.style == "solid"]
        assert (sum(said) > 0) == (solid_word > 0)
        assert all(parse_caption(t).get("style", "solid") == s.style
                   for s, t in zip(scenes, batch.texts))


def test_free_style_captions_say_every_style_or_none():
    """With ``free_style`` a caption without a style word means any fill style, so it is left
    out of outlined and striped scenes' captions too, and written otherwise (solid too)."""
    from retouch.toyworld.dataset import caption_batch

    rng = random.Random(0)
    scenes = [random_scene(rng, styles=STYLES, positions=tuple(POSITIONS)) for _ in range(600)]
    for partial, share in ((0.0, 0.25), (1.0, 0.5)):
        batch = caption_batch(scenes, rng=rng, max_tokens=40, cond_dropout=0.0, solid_word=0.3,
                              partial=partial, free_style=0.25)
        named = [next((w for w in t.split() if w in STYLES), None) for t in batch.texts]
        assert all(w in (None, s.style) for s, w in zip(scenes, named))
        for style in STYLES:
            said = [w is not None for s, w in zip(scenes, named) if s.style == style]
            assert abs(1 - sum(said) / len(said) - share) < 0.1, (style, partial)


def test_dropped_words_are_omitted_not_guessed():
    rng = random.Random(0)
    texts = {caption(_scene(), drop={"color": 1.0, "background": 1.0}, rng=rng).text}
    assert texts == {"a small circle on the left and a big square on the right"}


def test_bad_attribute_names_list_valid_values():
    with pytest.raises(ValueError, match="valid: circle, square"):
        ObjectSpec("hexagon", "red", "small", "left")
    with pytest.raises(ValueError, match="outside the ToyWorld vocabulary: dog"):
        parse_caption("a red dog")


@pytest.mark.parametrize("size", [32, 64, 97])
def test_render_any_size_masks_and_determinism(size):
    scene = _scene()
    a, b = render(scene, size), render(scene, size)
    assert a.image.shape == (size, size, 3) and a.image.dtype == np.uint8
    assert np.array_equal(a.image, b.image)
    assert a.masks.shape == (2, size, size)
    assert 0.0 <= a.masks.min() and a.masks.max() <= 1.0
    # a circle of radius r covers pi r^2 pixels (anti-aliasing conserves area to ~1%)
    r = scene.objects[0].radius * size
    assert a.masks[0].sum() == pytest.approx(np.pi * r * r, rel=0.03)
    # pixels well inside the circle carry its colour; far away, the background
    cx, cy = (int(c * size) for c in scene.objects[0].center)
    assert tuple(a.image[cy, cx]) == COLORS["red"]
    assert tuple(a.image[1, size // 2]) == BACKGROUNDS["gray"]


def test_every_shape_and_style_renders_inside_its_box():
    for shape in SHAPES + RESERVED_SHAPES:
        for style in STYLES:
            obj = ObjectSpec(shape, "orange", "big", "center")
            r = render(Scene(objects=(obj,), style=style))
            ys, xs = np.nonzero(r.masks[0] > 0.5)
            extent = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
            assert extent == pytest.approx(2 * obj.radius * 64, abs=2.0), (shape, style)


def test_tokenizer_one_token_per_word_and_deterministic(tmp_path):
    assert build_vocab(VOCABULARY) == build_vocab(VOCABULARY)
    save_tokenizer(VOCABULARY, tmp_path, max_length=32)
    tok = CLIPTokenizer.from_pretrained(str(tmp_path))
    for word in VOCABULARY:
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    ids = tok(caption(_scene()).text).input_ids
    assert len(ids) == len(caption(_scene()).words) + 2


def test_training_resumes_to_the_same_weights(tmp_path):
    """A run stopped and resumed ends bit-identical to an uninterrupted one."""
    import json

    from safetensors.torch import load_file

    from retouch.training.checkpoint import load
    from retouch.training.toyworld import TrainConfig, train

    common = dict(dataset_size=48, vae_steps=2, batch=2, unet_width=32,
                  checkpoint_every=2, log_every=1)
    train(TrainConfig(out=str(tmp_path / "a"), unet_steps=4, **common), progress=False)
    train(TrainConfig(out=str(tmp_path / "b"), unet_steps=2, **common), progress=False)
    train(TrainConfig(out=str(tmp_path / "b"), unet_steps=4, **common), resume=True,
          progress=False)
    a = load_file(str(tmp_path / "a" / "unet.safetensors"))
    b = load_file(str(tmp_path / "b" / "unet.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with pytest.raises(ValueError, match="unet_width"):
        train(TrainConfig(out=str(tmp_path / "b"), **{**common, "unet_width": 64}),
              resume=True, progress=False)
    with pytest.raises(ValueError, match="pass --resume"):  # never continued or reset silently
        train(TrainConfig(out=str(tmp_path / "b"), **common), progress=False)
    # A cooldown added on resume ends the run at its END step.
    train(TrainConfig(out=str(tmp_path / "b"), cooldown=(4, 6), **common), resume=True,
          progress=False)
    assert load(tmp_path / "b" / "unet.safetensors")[1]["step"] == 6
    # each resume that changed an option left a note in the run's log, and only those
    records = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()
               if '"note"' in line]
    assert [r["changed"] for r in records] == [
        {"unet_steps": [2, 4]}, {"unet_steps": [4, 100000], "cooldown": [None, [4, 6]]}]
    assert records[1]["last_logged_step"] == 4 and "cooldown None -> [4, 6]" in records[1]["text"]


def test_learning_rate_warms_up_holds_and_cools_down():
    from retouch.training.toyworld import TrainConfig, learning_rate, train

    cfg = TrainConfig(out="unused", lr=1.0, warmup=10, cooldown=(100, 200))
    rates = [learning_rate(cfg, s) for s in (0, 9, 50, 100, 150, 200, 300)]
    assert rates == pytest.approx([0.1, 1.0, 1.0, 1.0, 0.5, 0.0, 0.0])
    assert learning_rate(TrainConfig(out="unused", lr=1.0, warmup=10), 10**6) == 1.0
    with pytest.raises(ValueError, match="cooldown needs"):
        train(TrainConfig(out="unused", cooldown=(5, 5)), progress=False)


def test_style_weights_and_cli_defaults():
    from retouch.cli import build_parser
    from retouch.toyworld.dataset import SceneSet
    from retouch.training.toyworld import TrainConfig, scene_weights, train

    scenes = [random_scene(random.Random(i), styles=STYLES) for i in range(30)]
    data = SceneSet(scenes=scenes, images=torch.zeros(30), masks=torch.zeros(30))
    assert scene_weights(data, None) is None
    weights = scene_weights(data, {"striped": 2.0})
    assert weights.tolist() == [2.0 if s.style == "striped" else 1.0 for s in scenes]
    for bad in ({"striped": 0.0}, {"dotted": 2.0}):
        with pytest.raises(ValueError, match="style weights need"):
            scene_weights(data, bad)
    parser = build_parser()
    args = parser.parse_args(["toyworld", "train", "--style-weight", "striped=1.5"])
    assert args.style_weight == [("striped", 1.5)]
    for name in ("seed", "vae_steps", "unet_steps", "batch", "lr", "grounding_weight",
                 "coverage_loss", "coverage_weight", "partial_captions", "unet_depth",
                 "free_style"):
        assert getattr(args, name) == getattr(TrainConfig, name), name
    with pytest.raises(SystemExit):
        parser.parse_args(["toyworld", "train", "--style-weight", "striped"])
    with pytest.raises(ValueError, match="style weights need"):  # refused before any work
        train(TrainConfig(out="unused", style_weights={"dotted": 2.0}), progress=False)


def test_training_continues_from_an_exported_pipeline(tiny_toy_pipeline, tmp_path):
    """--init-from starts the UNet stage from a pipeline folder's weights (lr 0: unchanged)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from retouch.training.toyworld import TrainConfig, train

    cfg = TrainConfig(out=str(tmp_path / "c"), init_from=str(tiny_toy_pipeline), dataset_size=48,
                      unet_steps=1, batch=2, unet_width=32, lr=0.0, checkpoint_every=1)
    train(cfg, progress=False)
    saved = load_file(str(tmp_path / "c" / "unet.safetensors"))
    shipped = UNet2DConditionModel.from_pretrained(str(tiny_toy_pipeline), subfolder="unet")
    for k, v in shipped.float().state_dict().items():
        assert torch.equal(saved[f"unet.{k}"], v), k


def test_a_deeper_unet_grown_from_a_trained_one_computes_the_same_function(tiny_toy_pipeline):
    """--unet-depth 2 with --init-from a depth-1 model: the new transformer layers start as
    identities, so the grown UNet's output equals the source's exactly; other mismatches are
    refused."""
    from diffusers import UNet2DConditionModel

    from retouch.toyworld.configs import unet_config
    from retouch.training.growth import load_grown

    source = UNet2DConditionModel.from_pretrained(str(tiny_toy_pipeline), subfolder="unet").float()
    grown = UNet2DConditionModel(**unet_config(32, depth=2))
    new = load_grown(grown, source.state_dict())
    assert len(new) == 7  # the attention blocks: two down, one mid, two in each of two up
    assert all(b.endswith("transformer_blocks.1") for b in new)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 700])
    text = torch.randn(2, 7, 128)
    with torch.no_grad():
        assert torch.equal(grown(x, t, text).sample, source(x, t, text).sample)
    with pytest.raises(ValueError, match="only more transformer layers"):
        load_grown(UNet2DConditionModel(**unet_config(32)), grown.state_dict())
    with pytest.raises(ValueError, match="differ in more than depth"):
        load_grown(UNet2DConditionModel(**unet_config(64)), source.state_dict())


def test_decoder_tuning_keeps_the_encoder_and_resumes(tiny_toy_run, tmp_path):
    """tune-decoder trains the decoder only (the latent space a UNet learnt stays), keeps the
    starting VAE, and a resumed run ends bit-identical to an uninterrupted one."""
    import shutil

    from safetensors.torch import load_file

    from retouch.training.decoder import DecoderConfig, tune_decoder

    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        shutil.copytree(tiny_toy_run, run)
    start = load_file(str(tiny_toy_run / "vae_best.safetensors"))
    common = dict(dataset_size=8, held_out=4, batch=2, checkpoint_every=1, lr=1e-3)
    tune_decoder(DecoderConfig(run=str(runs[0]), steps=2, **common), progress=False)
    tune_decoder(DecoderConfig(run=str(runs[1]), steps=1, **common), progress=False)
    tune_decoder(DecoderConfig(run=str(runs[1]), steps=2, **common), resume=True, progress=False)

    a = load_file(str(runs[0] / "decoder.safetensors"))
    b = load_file(str(runs[1] / "decoder.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    kept = load_file(str(runs[0] / "vae_base.safetensors"))
    for k, v in start.items():
        assert torch.equal(kept[k], v), k
        tuned = a[f"model.{k}"]
        if k.startswith(("encoder.", "quant_conv.")):
            assert torch.equal(tuned, v), k
    assert any(not torch.equal(a[f"model.{k}"], v) for k, v in start.items()
               if k.startswith("decoder."))
    with pytest.raises(FileNotFoundError, match="vae_best"):
        tune_decoder(DecoderConfig(run=str(tmp_path)), progress=False)


def test_composites_put_each_source_in_its_cells_at_any_resolution():
    """Decoder locality's composites: the same mask picks the same render in a latent cell and
    in the pixels it decodes to; boxes are non-empty; object regions grow by the dilation."""
    from retouch.training.decoder import composite, object_regions, random_boxes

    mask = torch.zeros(1, 1, 4, 4)
    mask[0, 0, 1:3, 2] = 1
    a, b = torch.full((1, 3, 16, 16), 1.0), torch.full((1, 3, 16, 16), -1.0)
    out = composite(a, b, mask)
    assert torch.equal(out[0, 0] > 0, torch.kron(mask[0, 0], torch.ones(4, 4)) > 0)
    za, zb = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    z = composite(za, zb, mask)
    assert torch.equal(z[..., 1, 2], za[..., 1, 2]) and torch.equal(z[..., 0, 0], zb[..., 0, 0])
    boxes = random_boxes(64, 4, torch.Generator().manual_seed(0))
    assert set(boxes.unique().tolist()) <= {0.0, 1.0} and (boxes.flatten(1).sum(1) >= 1).all()
    masks = torch.zeros(1, 3, 8, 8)
    masks[0, 0, 3, 3] = 1.0  # one object cell; the background channel is ignored
    masks[0, 2] = 1.0
    assert object_regions(masks, dilation=1).sum() == 9
    assert object_regions(masks, dilation=0).sum() == 1


def test_decoder_tune_with_composites_measures_locality(tiny_toy_run, tmp_path):
    import json
    import shutil

    from retouch.training.decoder import DecoderConfig, tune_decoder

    run = tmp_path / "local"
    shutil.copytree(tiny_toy_run, run)
    common = dict(dataset_size=8, held_out=4, batch=4, checkpoint_every=1)
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(ValueError, match="composites .* between 0 and 1; got 1.5"):
        tune_decoder(DecoderConfig(run=str(run), steps=1, composites=1.5, **common),
                     progress=False)
    with pytest.raises(ValueError, match="lr must be a positive finite learning rate"):
        tune_decoder(DecoderConfig(run=str(run), steps=1, lr=float("nan"), **common),
                     progress=False)
    assert sorted(p.name for p in run.iterdir()) == before  # refused before any work
    (run / "log.jsonl").unlink(missing_ok=True)
    best = tune_decoder(DecoderConfig(run=str(run), steps=2, composites=0.5, **common),
                        progress=False)
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [0, 1, 2]
    assert all(0 < r["composite_psnr"] < 100 for r in logged) and "composite_psnr" in best


def test_extending_the_vocabulary_tunes_the_vae_then_the_unet(tiny_toy_pipeline, tmp_path):
    """--init-from with --extended: the VAE learns outlined/striped renders first (encoder
    included, solid latents anchored), then the UNet trains on extended captions."""
    import json

    from retouch.toyworld.dataset import make_scenes, vocabulary
    from retouch.training.toyworld import TrainConfig, train

    scenes = make_scenes(64, seed=0, size=16, mask_size=4, progress=False,
                         **vocabulary(True)).scenes
    assert {s.style for s in scenes} == {"solid", "outlined", "striped"}
    assert {o.position for s in scenes for o in s.objects} >= {"top", "bottom"}
    run = tmp_path / "ext"
    cfg = TrainConfig(out=str(run), init_from=str(tiny_toy_pipeline), extended=True,
                      dataset_size=48, vae_steps=2, unet_steps=1, batch=2, unet_width=32,
                      checkpoint_every=1, log_every=1)
    train(cfg, progress=False)
    stages = {json.loads(line)["stage"] for line in (run / "log.jsonl").read_text().splitlines()}
    assert stages == {"decoder", "unet"}
    assert (run / "vae_stage_base.safetensors").exists() and (run / "unet.safetensors").exists()
    # A decoder-only tune afterwards starts from the VAE stage's result: the encoder the UNet
    # was trained on stays.
    from safetensors.torch import load_file

    from retouch.training.decoder import DecoderConfig, tune_decoder

    stage_vae = load_file(str(run / "vae_best.safetensors"))
    tune_decoder(DecoderConfig(run=str(run), steps=1, dataset_size=8, held_out=4, batch=2,
                               extended=True), progress=False)
    tuned = load_file(str(run / "decoder.safetensors"))
    assert all(torch.equal(tuned[f"model.{k}"], v) for k, v in stage_vae.items()
               if k.startswith(("encoder.", "quant_conv.")))
    with pytest.raises(ValueError, match="extended"):
        train(TrainConfig(**{**cfg.__dict__, "extended": False}), resume=True, progress=False)


def test_bench_breaks_adherence_down_by_requested_style():
    from retouch.bench.toyworld import _by_style
    from retouch.toyworld.scene import parse_caption

    # the styles the prompts ask for, as the bench reads them from partially specified prompts
    prompts = ["a blue solid circle", "a striped square", "a big striped circle on the left",
               "a outlined triangle", "a red square"]
    styles = [parse_caption(p).get("style", "any") for p in prompts]
    scores = [{"style": True, "all": True}, {"style": True, "all": False},
              {"style": False, "all": False}, {"style": True, "all": True},
              {"style": None, "all": True}]
    assert _by_style(scores, styles) == {
        "solid": {"style": 1.0, "all": 1.0, "n": 1},
        "outlined": {"style": 1.0, "all": 1.0, "n": 1},
        "striped": {"style": 0.5, "all": 0.0, "n": 2},
        "any": {"style": None, "all": 1.0, "n": 1},
    }


def test_a_killed_training_run_resumes_with_no_lost_or_repeated_step(tmp_path):
    """kill -9 mid-run (between checkpoints), then --resume: every step is logged once and the
    weights equal an uninterrupted run's bit for bit."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    from retouch.training.toyworld import TrainConfig, train

    common = dict(dataset_size=48, vae_steps=2, unet_steps=30, batch=2, unet_width=32,
                  checkpoint_every=4, log_every=1)
    killed = tmp_path / "killed"
    script = ("import sys; from retouch.training.toyworld import TrainConfig, train; "
              f"train(TrainConfig(out=sys.argv[1], **{common!r}), progress=False)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script, str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = killed / "log.jsonl"

    def unet_steps() -> list[int]:
        lines = log.read_text().splitlines() if log.is_file() else []
        return [json.loads(line)["step"] for line in lines[:-1]  # the last may be half written
                if '"unet"' in line]

    deadline = time.time() + 300
    while not any(s >= 10 and s % 4 for s in unet_steps()) and proc.poll() is None:
        assert time.time() < deadline, "the training subprocess made no progress"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    logged = unet_steps()
    assert max(logged) < 30

    train(TrainConfig(out=str(killed), **common), resume=True, progress=False)
    lines = log.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines if '"unet"' in line] == list(range(1, 31))
    train(TrainConfig(out=str(tmp_path / "whole"), **common), progress=False)
    a = load_file(str(killed / "unet.safetensors"))
    b = load_file(str(tmp_path / "whole" / "unet.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bench_headline_names_the_issue_figures():
    from retouch.bench.toyworld import headline, partial_prompts
    from retouch.toyworld.scene import parse_caption

    cov = {"attention_maps": {"soft_iou": 0.5, "big_threshold_iou": 0.4,
                              "background_soft_iou": 0.9}}
    result = {"coverage": cov, "adherence": {"all": 0.9}, "core_adherence": {"all": 0.95},
              "partial_adherence": {"all": 0.8}, "partial_adherence_first_seed": {"all": 0.85}}
    assert headline(result, extended=True) == {
        "soft_iou": 0.5, "big_threshold_iou": 0.4, "background_soft_iou": 0.9,
        "partial_prompts_right": 0.8, "partial_prompts_right_first_seed": 0.85,
        "all_right_extended": 0.9, "all_right_core": 0.95}
    assert headline(result, extended=False)["all_right_core"] == 0.9
    prompts = partial_prompts(200)
    assert prompts == partial_prompts(200)  # fixed prompts
    parsed = [parse_caption(p) for p in prompts]
    assert any("background" not in p for p in parsed)
    assert any(all(set(o) == {"shape"} for o in p["objects"]) for p in parsed)  # "a circle"


def test_the_flow_model_trains_and_resumes_bit_identically(tiny_toy_pipeline, tmp_path):
    from safetensors.torch import load_file

    from retouch.training.toyworld import TrainConfig, train

    common = dict(dataset_size=48, vae_steps=2, batch=2, checkpoint_every=2, log_every=1,
                  arch="sd3", init_from=str(tiny_toy_pipeline))
    train(TrainConfig(out=str(tmp_path / "a"), unet_steps=4, **common), progress=False)
    train(TrainConfig(out=str(tmp_path / "b"), unet_steps=2, **common), progress=False)
    train(TrainConfig(out=str(tmp_path / "b"), unet_steps=4, **common), resume=True,
          progress=False)
    a = load_file(str(tmp_path / "a" / "transformer.safetensors"))
    b = load_file(str(tmp_path / "b" / "transformer.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="arch"):
        train(TrainConfig(out=str(tmp_path / "b"), **{**common, "arch": "unet"}), resume=True,
              progress=False)


def test_the_flow_model_exports_as_an_sd3_pipeline_the_benches_take(tiny_flow_pipeline,
                                                                     tmp_path, monkeypatch):
    from retouch.models.pipeline import PipelineModel
    from retouch.models.sd3 import SD3Model
    from retouch.recipes.generate import generate

    model = PipelineModel.load(tiny_flow_pipeline)
    assert isinstance(model, SD3Model) and model.max_sequence_length == 8
    assert model.image_size == 64 and model.latent_shape(1) == (1, 4, 16, 16)
    image = generate(model, ["a big red circle"], steps=2, cfg=3.0)[0]
    assert image.shape == (64, 64, 3)
    # The benchmarks' attention measures read its joint attention's cross view.
    from retouch.bench.coverage import measure_coverage
    from retouch.bench.toyworld import attention_mass, benchmark_scenes

    scenes = benchmark_scenes(2)
    assert 0 <= attention_mass(model, scenes, timesteps=(0.5,)) <= 1
    assert set(measure_coverage(model, scenes, timesteps=(0.5,), recipe_steps=2)) == {
        "res8", "attention_maps"}
    # The inversion bench takes it: every method a row, EDICT's refusal with its reason.
    from retouch.bench import inversion

    monkeypatch.setattr(inversion, "IMAGES", {True: 2})
    monkeypatch.setattr(inversion, "STEPS", {True: 3})
    doc = inversion.run(quick=True, out=tmp_path / "bench", model=str(tiny_flow_pipeline))
    refused = {r["method"] for r in doc["rows"] if "refused" in r}
    assert refused == {"edict"} and "edict" not in doc["headline"]["worst_psnr"]
    assert {"rf_solver", "fireflow"} <= set(doc["headline"]["worst_psnr"])
    # ... and so does the editing bench's case runner, every method of a quick run.
    from retouch.bench.editing import edit_case, methods
    from retouch.toyworld.editbench import make_cases

    case = make_cases(1, seed=5, edit_types=("position",))[0]
    edits = edit_case(model, case, methods(True), steps=5)  # bdia replays from step 1
    assert {"flowedit", "masactrl/direct", "rf_solver/rf_solver", "p2p/direct"} <= set(edits)


def test_bench_reads_the_styles_a_model_picks_when_the_prompt_names_none():
    from retouch.bench.toyworld import unnamed_style_shares

    def scene(style):
        return Scene((ObjectSpec("square", "red", "big", "left"),), "white", style)

    images = [render(scene(s)).image for s in ("striped", "solid", "striped", "outlined")]
    prompts = ["a red square", "a red square", "a red striped square", "a big square"]
    assert unnamed_style_shares(images, prompts) == {
        "solid": 1 / 3, "outlined": 1 / 3, "striped": 1 / 3, "unreadable": 0.0, "n": 3}
