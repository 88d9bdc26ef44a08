"""Frames: noise models, ToyWorld clips, keyframe attention and the clip recipes."""

import json

import numpy as np
import pytest
import torch

from retouch.attention import BatchLayout, FrameAttention, attention_control
from retouch.attention.frames import keyframe_rows
from retouch.noise import frame_noise, mixed_noise, shared_noise, warped_noise
from retouch.recipes.video import edit_clip, generate_clip, renoise, warp_latents
from retouch.toyworld.clips import moving_clip
from retouch.toyworld.scene import ObjectSpec, Scene
from tiny_models import tiny_model

SCENE = Scene((ObjectSpec("circle", "red", "small", "left"),), background="white")


# --- noise models ----------------------------------------------------------------------------


def test_mixed_noise_interpolates_between_independent_and_shared():
    shape = (2, 4, 64, 64)
    for mix, corr in ((0.0, 0.0), (1.0, 0.5), (3.0, 0.9)):
        e = mixed_noise(shape, 1, mix=mix)
        r = torch.corrcoef(e.flatten(1))[0, 1].item()
        assert abs(r - corr) < 0.03, (mix, r)
        assert abs(e.std().item() - 1.0) < 0.02
    s = shared_noise(shape, 2)
    assert torch.equal(s[0], s[1])


def test_warped_noise_keeps_the_first_frame_and_is_unchanged_by_zero_flow():
    eps = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = warped_noise(eps, torch.zeros(3, 2, 8, 8), k=4)
    for f in out:
        torch.testing.assert_close(f, eps, rtol=0, atol=1e-6)


def test_warped_noise_carries_a_translation_whole_pixels_and_stays_standard_gaussian():
    eps = torch.randn(4, 32, 32, generator=torch.Generator().manual_seed(1))
    flow = torch.zeros(1, 2, 32, 32)
    flow[0, 0] = 3.0  # everything moves 3 pixels right
    out = warped_noise(eps, flow, k=4)
    torch.testing.assert_close(out[1, :, :, 3:], eps[:, :, :-3], rtol=0, atol=1e-6)
    # a sub-pixel motion of an object: still N(0, 1) everywhere
    flow = torch.zeros(4, 2, 32, 32)
    flow[:, 0, 8:24, 8:24] = 0.5
    frames = warped_noise(eps, flow, k=4)
    for f in frames[1:]:
        assert abs(f.mean().item()) < 0.05 and abs(f.std().item() - 1.0) < 0.04
    # the moving block kept its noise, half a pixel a frame: two frames on it is one pixel
    torch.testing.assert_close(frames[2, :, 10:20, 11:21], eps[:, 10:20, 10:20], rtol=0,
                               atol=1e-6)


def test_warped_noise_collisions_keep_the_moving_source_and_holes_get_fresh_draws():
    eps = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])  # (C, h, w) = (1, 1, 4)
    flow = torch.zeros(1, 2, 1, 4)
    flow[0, 0, 0, 1] = 1.0  # the pixel holding 2 moves onto the one holding 3
    out = warped_noise(eps, flow, k=1)[1, 0, 0]
    assert out[0] == 1.0 and out[2] == 2.0 and out[3] == 4.0  # 3 is covered
    assert out[1] not in (1.0, 2.0, 3.0, 4.0)  # the hole: a fresh draw
    half = torch.full((1, 2, 1, 4), 0.5)
    half[0, 1] = 0.0
    moved = warped_noise(eps, half, k=1)[1, 0, 0]  # half a pixel rounds up, everywhere alike
    assert torch.equal(moved[1:], eps[0, 0, :-1])


def test_warped_noise_needs_a_flow_per_later_frame():
    with pytest.raises(ValueError, match="one flow per frame after the first"):
        frame_noise("warped", (3, 4, 8, 8), 0)
    with pytest.raises(ValueError, match="unknown noise model 'pink'"):
        frame_noise("pink", (3, 4, 8, 8), 0)


# --- ToyWorld clips --------------------------------------------------------------------------


def test_a_clip_moves_its_object_and_captions_follow_the_grammar():
    clip = moving_clip(SCENE, (0.24, 0.0), frames=5)
    centers = [s.objects[0].center for s in clip.scenes]
    np.testing.assert_allclose([c[0] for c in centers], [0.26, 0.32, 0.38, 0.44, 0.50])
    words = [c.text for c in clip.captions()]
    assert words[0].endswith("on the left on a white background")
    assert words[-1].endswith("on the center on a white background")
    flows = clip.flows(16)
    assert flows.shape == (4, 2, 16, 16)
    masks = clip.moving_masks(16) >= 0.5
    assert np.allclose(flows[0, 0].numpy()[masks[0]], 0.06 * 16)
    assert np.all(flows[0].numpy()[:, ~masks[0]] == 0)


def test_clips_refuse_bad_motion():
    with pytest.raises(ValueError, match="outside the image"):
        moving_clip(SCENE, (-0.5, 0.0))
    two = Scene((ObjectSpec("circle", "red", "small", "left"),
                 ObjectSpec("square", "blue", "small", "right")))
    with pytest.raises(ValueError, match="another object's region"):
        moving_clip(two, (0.48, 0.0), frames=3)
    with pytest.raises(ValueError, match="object index 2"):
        moving_clip(two, (0.1, 0.0), index=2)


# --- keyframe attention ----------------------------------------------------------------------


def test_keyframe_rows_of_each_scheme():
    assert keyframe_rows("first", [4, 5, 6]) == [[4], [4], [4]]
    assert keyframe_rows("first+previous", [4, 5, 6]) == [[4, 4], [4, 4], [4, 5]]
    with pytest.raises(ValueError, match="unknown keyframe scheme 'last'"):
        FrameAttention("last")


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
@pytest.mark.parametrize("scheme", ["first", "first+previous"])
def test_the_first_frame_is_generated_as_it_would_be_alone(kind, scheme):
    model = tiny_model(kind)
    prompts = ["a red square", "a blue circle", "a green square"]
    alone = generate_clip(model, prompts, keyframes="none", steps=3, cfg=3.0, seed=1)
    keyed = generate_clip(model, prompts, keyframes=scheme, steps=3, cfg=3.0, seed=1)
    assert np.abs(keyed[0].astype(int) - alone[0].astype(int)).max() <= 1
    assert np.abs(keyed[1:].astype(int) - alone[1:].astype(int)).max() > 1


def test_latent_warp_moves_whole_pixels_and_zero_flow_is_the_identity():
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(warp_latents(x, torch.zeros(1, 2, 8, 8)), x)
    flow = torch.zeros(1, 2, 8, 8)
    flow[:, 0] = 2.0  # two pixels to the right
    moved = warp_latents(x, flow)
    assert torch.equal(moved[..., 2:], x[..., :-2])
    assert torch.equal(moved[..., :2], x[..., :2].flip(-1))  # reflected at the border
    flow[:, 0] = 0.3  # sub-pixel: the flow rounds to whole pixels, halves up
    assert torch.equal(warp_latents(x, flow), x)
    for shift in (0.5, 0.6, 1.4):
        flow[:, 0] = shift
        assert torch.equal(warp_latents(x, flow)[..., 1:], x[..., :-1])


def test_motion_dynamics_start_later_frames_from_the_first_frames_moved_latent():
    from retouch.recipes.video import _motion_start
    from retouch.samplers import ddim_step, sample

    model = tiny_model("sd1")
    times = model.time_grid(10)
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noises = [torch.zeros_like(x)] * 10
    flows = torch.zeros(3, 2, 8, 8)
    flows[:, 0] = 0.4  # frame i moves round(0.4 i) = 0, 1, 1 pixels
    start, k1 = _motion_start(model, "a red square", x, times, flows, (0.1, 0.3), ddim_step, 3.0,
                              5, noises)
    assert k1 == 1
    den = model.denoiser(["a red square"], cfg=3.0)
    with torch.no_grad():
        first_t1 = sample(den, x[:1], times[:2], step=ddim_step, progress=False)
        first_t0 = sample(den, first_t1, times[1:4], step=ddim_step, progress=False)
    torch.testing.assert_close(start[:1], first_t1)
    eps = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    want = renoise(model.schedule, warp_latents(first_t0.expand(3, 4, 8, 8), flows.cumsum(0)),
                   float(times[3]), float(times[1]), eps)
    torch.testing.assert_close(start[1:], want)
    assert torch.equal(warp_latents(first_t0, flows[:1] * 2)[..., 1:], first_t0[..., :-1])


@pytest.mark.parametrize("kind", ["sd1", "sd3"])
def test_renoising_gives_the_noisier_times_coefficients(kind):
    from retouch.schedules import FlowSchedule

    schedule = FlowSchedule() if kind == "sd3" else tiny_model().schedule
    t, t_up = (0.6, 0.9) if kind == "sd3" else (600.0, 900.0)
    (alpha, sigma), (alpha_up, sigma_up) = schedule.coeffs(t), schedule.coeffs(t_up)
    ones, zeros = torch.ones(4), torch.zeros(4)
    torch.testing.assert_close(renoise(schedule, alpha * ones, t, t_up, zeros),
                               alpha_up * ones)  # x0's coefficient
    c = renoise(schedule, zeros, t, t_up, ones)[0]  # the fresh noise's std
    assert abs(float(c) ** 2 + (alpha_up / alpha * sigma) ** 2 - sigma_up**2) < 1e-6


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_motion_dynamics_keep_the_first_frame_and_start_the_rest_from_it(kind):
    model = tiny_model(kind)
    prompts = ["a red square", "a blue circle", "a green square"]
    flows = torch.zeros(2, 2, 8, 8)
    flows[:, 0] = 1.0
    common = dict(keyframes="first", steps=10, cfg=3.0, seed=1, flows=flows)
    plain = generate_clip(model, prompts, **common)
    moved = generate_clip(model, prompts, dynamics=(0.1, 0.3), **common)
    assert np.abs(moved[0].astype(int) - plain[0].astype(int)).max() <= 1
    assert np.abs(moved[1:].astype(int) - plain[1:].astype(int)).max() > 1


def test_the_default_dynamics_window_is_the_references_at_50_steps():
    from retouch.recipes.video import T2V_ZERO_DYNAMICS, dynamics_window

    assert dynamics_window(T2V_ZERO_DYNAMICS, 50) == (2, 5)  # timesteps[-48], timesteps[-45]
    assert dynamics_window(T2V_ZERO_DYNAMICS, 25) == (1, 3)


def test_motion_dynamics_refuse_bad_settings():
    model = tiny_model("sd1")
    flows = torch.zeros(2, 2, 8, 8)
    with pytest.raises(ValueError, match=r"need 0 < T1 < T' < 1"):
        generate_clip(model, "a red square", frames=3, flows=flows, dynamics=(0.3, 0.1))
    with pytest.raises(ValueError, match="no step after T'"):
        generate_clip(model, "a red square", frames=3, flows=flows, dynamics=(0.2, 0.9),
                      steps=3)
    with pytest.raises(ValueError, match="noise model 'shared' has nothing to act on"):
        generate_clip(model, "a red square", frames=3, flows=flows, noise="shared",
                      dynamics=(0.1, 0.3))
    with pytest.raises(ValueError, match=r"flows of shape \(2, 2, 8, 8\).*got none"):
        generate_clip(model, "a red square", frames=3, dynamics=(0.1, 0.3))
    with pytest.raises(ValueError, match=r"Clip.flows\(8\); got \(2, 2, 16, 16\)"):
        generate_clip(model, "a red square", frames=3, dynamics=(0.1, 0.3),
                      flows=torch.zeros(2, 2, 16, 16))


def test_pull_guidance_outside_its_window_changes_nothing_and_inside_draws_frames_together():
    model = tiny_model("sd1")
    prompts = ["a red square", "a blue circle", "a green square"]
    common = dict(keyframes="none", steps=4, cfg=3.0, seed=2)
    plain = generate_clip(model, prompts, **common)
    idle = generate_clip(model, prompts, pull=1.0, pull_steps=(1.0, 1.0), **common)
    assert np.array_equal(idle, plain)
    pulled = generate_clip(model, prompts, pull=1.0, pull_steps=(0.0, 1.0), **common)
    assert np.abs(pulled[0].astype(int) - plain[0].astype(int)).max() <= 1  # frame 1 is free

    def gap(frames):
        return np.abs(np.diff(frames.astype(float), axis=0)).mean()

    assert gap(pulled) < gap(plain)
    with pytest.raises(ValueError, match="pull must be"):
        generate_clip(model, prompts, pull=-1.0, **common)
    with pytest.raises(ValueError, match="a chunk of 2 frames"):
        generate_clip(model, prompts, pull=1.0, chunk=2, keyframes="first", steps=4)


def test_identical_frames_from_shared_noise_stay_identical():
    model = tiny_model("sd1")
    plain = generate_clip(model, "a red square", frames=3, keyframes="none", noise="shared",
                          steps=3, cfg=3.0)
    keyed = generate_clip(model, "a red square", frames=3, keyframes="first+previous",
                          noise="shared", steps=3, cfg=3.0)
    assert np.abs(keyed.astype(int) - plain.astype(int)).max() <= 1
    assert np.abs(keyed[1:].astype(int) - keyed[0].astype(int)).max() <= 1


def test_chunks_with_the_first_keyframe_equal_one_call():
    model = tiny_model("sd1")
    prompts = ["a red square", "a blue circle", "a green square", "a red circle", "a square"]
    whole = generate_clip(model, prompts, keyframes="first", steps=3, cfg=3.0, seed=4)
    chunked = generate_clip(model, prompts, keyframes="first", steps=3, cfg=3.0, seed=4, chunk=3)
    assert np.abs(whole.astype(int) - chunked.astype(int)).max() <= 1
    ddpm = dict(keyframes="first", steps=3, cfg=3.0, seed=4, sampler="ddpm")
    assert np.abs(generate_clip(model, prompts, **ddpm).astype(int)
                  - generate_clip(model, prompts, chunk=3, **ddpm).astype(int)).max() <= 1
    with pytest.raises(ValueError, match="cannot run in chunks of 3"):
        generate_clip(model, prompts, keyframes="first+previous", steps=3, chunk=3)


def test_frame_attention_touches_only_its_role():
    from tiny_models import tiny_unet

    unet = tiny_unet("sd1")
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(4, 5, 32, generator=torch.Generator().manual_seed(1))
    layout = BatchLayout(("source", "target"), ("cond",))
    x[1] = x[0] + 1.0

    def run(controllers):
        with attention_control(unet, controllers, layout=layout) as s, torch.no_grad():
            with s.at_step(0, 500.0, num_steps=1, latent_hw=(8, 8)):
                return unet(x[:2], 500, encoder_hidden_states=ctx[:2]).sample

    base, keyed = run([]), run([FrameAttention("first", role="target")])
    torch.testing.assert_close(keyed, base, rtol=1e-5, atol=1e-5)  # one target frame: itself
    with pytest.raises(ValueError, match="has none: pass role="):
        run([FrameAttention("first", role="frame")])


# --- clip editing ----------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:EDICT edits with 4")
@pytest.mark.parametrize("inversion", ["ddim", "edict"])
def test_an_identical_prompt_clip_edit_reproduces_the_source(inversion):
    model = tiny_model("sd1")
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    out = edit_clip(model, frames, "a red square", "a red square", inversion=inversion,
                    editor="p2p", keyframes="none", steps=4, cfg=3.0)
    assert np.abs(out.edited.astype(int) - out.source.astype(int)).max() <= 1
    keyed = edit_clip(model, frames, "a red square", "a blue square", inversion=inversion,
                      editor="p2p", keyframes="first", steps=4, cfg=3.0)
    assert np.abs(keyed.source.astype(int) - out.source.astype(int)).max() <= 1  # source kept
    plain = edit_clip(model, frames, "a red square", "a blue square", inversion=inversion,
                      editor="p2p", keyframes="none", steps=4, cfg=3.0)
    assert keyed.edited.shape == frames.shape
    assert np.abs(keyed.edited[0].astype(int) - plain.edited[0].astype(int)).max() <= 1
    assert np.abs(keyed.edited[1:].astype(int) - plain.edited[1:].astype(int)).max() > 1


def test_clip_edits_refuse_frames_of_different_sizes_before_inverting():
    model = tiny_model("sd1")
    frames = [np.zeros((16, 16, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)]
    with pytest.raises(ValueError, match="differ in size"):
        edit_clip(model, frames, "a red square", "a blue square")


def test_each_edited_frame_pairs_with_its_own_source_frame():
    layout = BatchLayout(("source",) * 3 + ("target",) * 3, ("uncond", "cond"))
    assert layout.pairs("source", "target", ("cond",)) == ([6, 7, 8], [9, 10, 11])
    one = BatchLayout(("source", "target", "target"), ("cond",))
    assert one.pairs("source", "target", ("cond",)) == ([0, 0], [1, 2])


def test_local_blending_keeps_each_frame_outside_the_edited_words():
    model = tiny_model("sd1")
    frames = np.random.default_rng(1).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    out = edit_clip(model, frames, "a red square", "a blue square", inversion="ddim",
                    editor="p2p", keyframes="first", steps=4, cfg=3.0,
                    blend_words=("red", "blue"), blend_threshold=2.0)  # mask: nowhere
    torch.testing.assert_close(out.latents[2:], out.latents[:2], rtol=0, atol=1e-5)


def test_video_cli_writes_frames_and_a_gif(tiny_toy_pipeline, tmp_path, capsys):
    from PIL import Image

    from retouch.cli import main
    from retouch.toyworld.render import render

    model = ["--model", str(tiny_toy_pipeline), "--steps", "3"]
    out = tmp_path / "t2v"
    assert main(["video", "a red circle", "--frames", "3", "--noise", "warped", "--motion",
                 "1,0", *model, "--out", str(out)]) == 0
    gif = Image.open(out / "clip.gif")
    assert gif.n_frames == 3 and (out / "frame_002.png").exists()
    moved = tmp_path / "t2v-zero"
    assert main(["video", "a red circle", "--frames", "3", "--dynamics", "--motion", "1,0",
                 *model, "--out", str(moved)]) == 0
    assert json.loads((moved / "video.json").read_text())["dynamics"] == [0.04, 0.1]
    late = tmp_path / "late"
    assert main(["video", "a red circle", "--frames", "3", "--dynamics", "--motion", "1,0",
                 "--dynamics-window", "0.3,0.5", "--model", str(tiny_toy_pipeline),
                 "--steps", "6", "--out", str(late)]) == 0
    assert json.loads((late / "video.json").read_text())["dynamics"] == [0.3, 0.5]
    pulled = tmp_path / "pix2video"
    assert main(["video", "a red circle", "--frames", "3", "--keyframes", "first+previous",
                 "--pull", "1", *model, "--out", str(pulled)]) == 0
    assert json.loads((pulled / "video.json").read_text())["pull"] == 1.0
    paths = []
    for i, scene in enumerate(moving_clip(SCENE, (0.1, 0.0), frames=2).scenes):
        paths.append(tmp_path / f"in{i}.png")
        Image.fromarray(render(scene, 64).image).save(paths[-1])
    edited = tmp_path / "edit"
    assert main(["video", "a small red circle", "--input", *map(str, paths), "--target",
                 "a small blue circle", *model, "--out", str(edited)]) == 0
    assert (edited / "source_001.png").exists() and (edited / "frame_001.png").exists()
    assert main(["video", "a red circle", "--noise", "warped", *model,
                 "--out", str(tmp_path / "no")]) == 2
    assert "carries the noise along --motion" in capsys.readouterr().err
    assert main(["video", "a red circle", "--dynamics", *model,
                 "--out", str(tmp_path / "no")]) == 2
    assert "--dynamics moves the first frame's latent along --motion" in capsys.readouterr().err
    for window, says in (("0.5,0.3", "need 0 < T1 < T' < 1"), ("0.3", "wants T1,T'"),
                         ("a,b", "wants T1,T'")):
        assert main(["video", "a red circle", "--dynamics", "--motion", "1,0",
                     "--dynamics-window", window, *model, "--out", str(tmp_path / "no")]) == 2
        assert says in capsys.readouterr().err
    assert main(["video", "a red circle", "--dynamics-window", "0.3,0.5", *model,
                 "--out", str(tmp_path / "no")]) == 2
    assert "add --dynamics or drop it" in capsys.readouterr().err
    assert main(["video", "a red circle", "--pull", "-1", *model,
                 "--out", str(tmp_path / "no")]) == 2
    assert "--pull must be a finite number >= 0" in capsys.readouterr().err
    assert main(["video", "a red circle", "--keyframes", "last", *model,
                 "--out", str(tmp_path / "no")]) == 2
    assert not (tmp_path / "no").exists()


def test_video_scores_of_the_true_renders():
    import random

    from retouch.bench.video import bench_clip, clip_scores

    clip, prompt = bench_clip(random.Random(3), 5)
    frames = np.stack([r.image for r in clip.render(64)])
    s = clip_scores(frames, clip, prompt)
    assert s["adherence"] == 1.0 and s["inconsistency"] == 0.0 and s["flicker"] == 0.0
    assert s["warp_error"] < 0.01  # the step is 1.1 pixels, warped by 1
    assert s["motion"] == pytest.approx(1.0, abs=0.15)  # the checker's fitted centres
    still = clip_scores(np.stack([frames[0]] * 5), clip, prompt)
    assert still["flicker"] == 0.0 and still["warp_error"] > s["warp_error"]
    assert still["motion"] == 0.0


def test_each_bench_row_runs_its_own_dynamics_window_and_counts_its_evaluations(monkeypatch):
    import random

    from retouch.bench import video as bench

    clip, prompt = bench.bench_clip(random.Random(3), 4)
    seen = {}
    monkeypatch.setattr(bench, "generate_clip", lambda model, prompt, **kw: seen.update(kw))

    class Model:
        @staticmethod
        def latent_shape(n):
            return (n, 4, 16, 16)

    assert bench.DYNAMICS["dynamics"] == (0.04, 0.1)  # the paper's window
    for name, (keyframes, noise, pull) in bench.METHODS.items():
        bench.method_clip(Model(), name, clip, prompt, seed=0)
        assert seen["keyframes"] == keyframes and seen["pull"] == pull
        assert seen["dynamics"] == bench.DYNAMICS.get(noise)
        if noise in bench.DYNAMICS:  # the object's step as one translation of the whole latent
            assert seen["noise"] == "independent"
            step = torch.tensor(clip.step, dtype=seen["flows"].dtype) * 16
            assert torch.equal(seen["flows"], step.view(1, 2, 1, 1).expand_as(seen["flows"]))
        else:
            assert seen["noise"] == noise and torch.equal(seen["flows"], clip.flows(16))
    # 25 steps; the late window restarts every frame at step 8 after frame 1 ran 13 alone
    assert bench._nfe_per_frame((0.3, 0.5), 8) == 2 * (13 + 8 * (25 - 8)) / 8
    assert bench._nfe_per_frame(None, 8) == 50.0


def test_the_headline_takes_the_least_inconsistent_keyframe_row_that_adheres():
    from retouch.bench import video as bench

    means = {m: {"inconsistency": 0.9, "adherence": 0.95, "flicker": 0.1} for m in bench.METHODS}
    means["first + late motion dynamics"].update(inconsistency=0.2, adherence=0.80)
    means["first + warped noise"].update(inconsistency=0.45)
    head = bench.headline(means)
    assert head["video_best_keyframe_scheme"] == "first + warped noise"
    assert head["video_inconsistency_ratio"] == pytest.approx(0.5)
