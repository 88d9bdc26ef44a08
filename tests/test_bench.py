"""Every benchmark JSON leads with a headline and records the versions it ran with."""

import json

import pytest

from retouch.bench.common import write_result
from retouch.bench.editing import headline


def test_samplers_bench_writes_headline_and_versions(tmp_path):
    from retouch.cli import main

    assert main(["bench", "samplers", "--quick", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "samplers.json").read_text())
    assert list(doc)[0] == "headline"
    assert set(doc["headline"]) == {"best_retouch_rmse_10_nfe", "best_diffusers_rmse_10_nfe",
                                    "retouch_beats_diffusers_10_nfe", "rf_solver_error_ratio",
                                    "fireflow_error_ratio"}
    # Each ratio is the solver's error over Euler's at the NFE it used, on the flow rows.
    for name in ("rf_solver", "fireflow"):
        row = next(r for r in doc["flow_rows"] if r["sampler"] == name and r["nfe_budget"] == 10)
        euler = next(r for r in doc["flow_rows"] if r["sampler"] == "euler"
                     and r["nfe"] == row["nfe"])
        assert doc["headline"][f"{name}_error_ratio"] == pytest.approx(row["rmse"] / euler["rmse"])
    assert doc["headline"]["best_retouch_rmse_10_nfe"] == min(
        r["rmse"] for r in doc["rows"] if r["impl"] == "retouch" and r["nfe_budget"] == 10)
    import torch

    assert doc["versions"]["torch"] == torch.__version__


def test_a_benchmark_records_the_commit_it_started_from(tmp_path, monkeypatch):
    """A long run writes its JSON at the end; the checkout may have moved on by then."""
    from retouch.bench import common, guidance

    commits = iter(["abc1234", "fff9999-dirty"])  # at the start, and any later read
    monkeypatch.setattr(common, "_git_commit", lambda: next(commits))
    doc = guidance.run(quick=True, out=tmp_path)
    written = json.loads((tmp_path / "guidance.json").read_text())
    assert doc["headline"] and written["versions"]["git_commit"] == "abc1234"


def test_a_result_without_headline_is_refused(tmp_path):
    with pytest.raises(ValueError, match="headline"):
        write_result(tmp_path / "x.json", {"rows": []})
    assert not (tmp_path / "x.json").exists()


def test_editing_headline_is_p2p_against_regeneration():
    rows = [
        {"method": "p2p", "inversion": "direct", "edit_type": "color", "success": 0.9,
         "bg_psnr": 37.0},
        {"method": "none", "inversion": "direct", "edit_type": "color", "success": 1.0,
         "bg_psnr": 34.5},
    ]
    h = headline(rows)
    assert h["p2p_direct_colour_success"] == 0.9
    assert h["p2p_direct_colour_gain_db"] == pytest.approx(2.5)
    assert h["p2p_direct_shape_success"] is None and h["p2p_direct_shape_gain_db"] is None
    assert h["p2p_ddpm_colour_success"] is None  # no edit-friendly rows
    assert h["p2p_colour_success"] is None  # the headline's P2P blends pixels after them


def test_editing_headline_p2p_blends_pixels_after_edit_friendly_inversion():
    rows = [{"method": m, "inversion": inv, "edit_type": "color", "success": sr,
             "bg_psnr": db}
            for m, inv, sr, db in (("p2p (pixel blend)", "ddpm_edit_friendly", 0.95, 38.0),
                                   ("none", "ddpm_edit_friendly", 1.0, 33.0),
                                   ("p2p (pixel blend)", "direct", 0.5, 40.0),
                                   ("none", "direct", 0.9, 30.0))]
    h = headline(rows)
    assert h["p2p_colour_success"] == 0.95
    assert h["p2p_colour_gain_db"] == pytest.approx(5.0)
    assert h["p2p_direct_colour_success"] is None  # the latent-blending row did not run


def test_editing_headline_reads_p2p_on_edit_friendly_inversion_against_its_regeneration():
    rows = [{"method": m, "inversion": "ddpm_edit_friendly", "edit_type": "shape",
             "success": sr, "bg_psnr": db}
            for m, sr, db in (("p2p (no blend)", 1.0, 33.0), ("none", 0.9, 31.0))]
    h = headline(rows)
    assert h["p2p_ddpm_shape_success"] == 1.0
    assert h["p2p_ddpm_shape_gain_db"] == pytest.approx(2.0)
    assert h["p2p_shape_success"] is None


def test_editing_headline_reads_the_flow_and_look_rows():
    def row(method, inversion, success, db):
        return {"method": method, "inversion": inversion, "edit_type": "color",
                "success": success, "bg_psnr": db}

    h = headline([row("none", "direct", 0.9, 30.0), row("none", "rf_inversion", 0.8, 33.0),
                  row("flowedit", "-", 0.95, 36.0),
                  row("none", "ddpm_edit_friendly", 1.0, 31.0),
                  row("selfguide (caption kept)", "ddpm_edit_friendly", 0.25, 35.0),
                  row("selfguide look", "ddpm_edit_friendly", 0.75, 30.5)])
    assert h["rf_inversion_colour_success"] == 0.8
    assert h["rf_inversion_colour_gain_db"] == pytest.approx(3.0)
    assert h["flowedit_colour_gain_db"] == pytest.approx(6.0)
    assert h["rf_solver_colour_success"] is None
    assert h["selfguide_kept_colour_success"] == 0.25
    assert h["selfguide_kept_colour_gain_db"] == pytest.approx(4.0)  # over none, same inversion
    assert h["selfguide_look_colour_success"] == 0.75
    assert h["selfguide_look_colour_gain_db"] == pytest.approx(-0.5)


def test_editing_headline_reads_the_caption_free_self_guidance_rows():
    rows = [{"method": "selfguide (caption free)", "inversion": "ddpm_edit_friendly",
             "edit_type": t, "success": s, "preserved": p, "bg_psnr": 30.0}
            for t, s, p in (("position", 0.8, 0.9), ("color", 0.5, 1.0))]
    rows.append({"method": "none", "inversion": "ddpm_edit_friendly", "edit_type": "position",
                 "success": 0.9, "preserved": 0.8, "bg_psnr": 28.5})
    h = headline(rows)
    assert h["selfguide_free_position_gain_db"] == pytest.approx(1.5)  # over regeneration
    assert h["selfguide_free_colour_gain_db"] is None  # no none row for colour
    assert (h["selfguide_free_position_success"], h["selfguide_free_position_preserved"]) == (
        0.8, 0.9)
    assert h["selfguide_free_colour_success"] == 0.5
    assert h["selfguide_free_size_success"] is None


def test_a_caption_free_of_the_edit_drops_only_the_edited_attribute():
    from retouch.bench.selfguide import free_caption
    from retouch.toyworld.editbench import make_cases
    from retouch.toyworld.scene import caption, parse_caption

    for case in make_cases(9, seed=3, edit_types=("position", "size", "color")):
        free = parse_caption(free_caption(case))
        full = parse_caption(caption(case.source).text)
        attr = case.edit_type
        assert all(attr not in o for o in free["objects"])
        assert free["objects"] == [{k: v for k, v in o.items() if k != attr}
                                   for o in full["objects"]]
        assert {k: v for k, v in free.items() if k != "objects"} == {
            k: v for k, v in full.items() if k != "objects"}
    shape = make_cases(1, seed=3, edit_types=("shape",))[0]
    with pytest.raises(ValueError, match="not 'shape'"):
        free_caption(shape)


def test_transfer_marks_split_the_look_into_colour_and_style():
    import random

    from retouch.bench.transfer import transfer_marks, transfer_pair
    from retouch.toyworld.render import render

    rng = random.Random(5)
    for _ in range(4):
        a, b = transfer_pair(rng)
        ideal = a.replace(0, color=b.objects[0].color).replace(style=b.style,
                                                                background=b.background)
        marks = transfer_marks(render(ideal).image, a, b)
        assert marks == {"success": True, "structure_kept": True, "appearance_taken": True,
                         "colour_taken": True, "style_taken": True, "background_taken": True}
        marks = transfer_marks(render(a).image, a, b)  # the structure image itself
        assert marks["structure_kept"] and not marks["colour_taken"]
        assert not marks["success"] and not marks["appearance_taken"]


def test_the_consistency_benchmark_runs_one_part_alone_and_refuses_unknown_parts(
        tiny_toy_pipeline, tmp_path, monkeypatch):
    import shutil

    import numpy as np

    from retouch.bench import consistency as bench
    from retouch.bench.transfer import ROWS

    folder = tmp_path / "extended"  # plumbing only: the tiny model learnt nothing either way
    shutil.copytree(tiny_toy_pipeline, folder)
    info = json.loads((folder / "toyworld.json").read_text())
    (folder / "toyworld.json").write_text(json.dumps({**info, "extended": True}))
    marks = dict.fromkeys(("success", "structure_kept", "appearance_taken", "colour_taken",
                           "style_taken", "background_taken", "seconds_per_transfer"), 0.5)
    tile = np.zeros((8, 8, 3), np.uint8)
    paired = {ROWS[0]: 1, ROWS[1]: 0, "both": 1, "neither": 0, "p": 1.0}
    monkeypatch.setattr(bench, "measure_transfer", lambda model, cases: (
        {row: marks for row in ROWS}, paired, [[tile] * (2 + len(ROWS))] * cases))
    out = tmp_path / "out"
    doc = bench.run(quick=True, out=out, model=str(folder), parts=("transfer",))
    assert set(doc["headline"]) == {"transfer_success", "transfer_success_cfg5",
                                    "transfer_success_ddim",
                                    "transfer_success_adain_only", "transfer_success_p2p_edit"}
    assert doc["settings"]["transfer_cases"] == 2 and "video" not in doc
    assert doc["transfer_paired"] == paired
    assert json.loads((out / "consistency.json").read_text())["parts"] == ["transfer"]
    assert "Parts run: transfer" in (out / "consistency.md").read_text()
    assert (out / "consistency_transfer.png").exists() and not (out / "consistency.png").exists()
    with pytest.raises(ValueError, match="unknown consistency benchmark part.*motion.*valid: st"):
        bench.run(quick=True, out=tmp_path / "x", model=str(folder), parts=("motion",))
    assert not (tmp_path / "x").exists()


def test_toyworld_and_editing_benches_sample_at_the_guidance_they_are_given(tmp_path,
                                                                             monkeypatch):
    from retouch.bench import editing, toyworld
    from retouch.models.pipeline import PipelineModel

    seen = []
    real_generate, real_edit_case = toyworld.generate, editing.edit_case

    def generate(*args, cfg, **kwargs):
        seen.append(("generate", cfg))
        return real_generate(*args, cfg=cfg, **kwargs)

    def edit_case(*args, cfg, **kwargs):
        seen.append(("edit", cfg))
        return real_edit_case(*args, cfg=cfg, **kwargs)

    monkeypatch.setattr(toyworld, "generate", generate)
    monkeypatch.setattr(editing, "edit_case", edit_case)
    accuracy = toyworld.prompt_adherence(PipelineModel.load(), prompts=["a red circle"],
                                         cfg=2.0)[0]
    assert accuracy["n"] == 1
    doc = editing.run(quick=True, out=tmp_path, cases=1, steps=2, cfg=2.0,
                      method_names=("none/direct",))
    assert seen == [("generate", 2.0), ("edit", 2.0)] and doc["settings"]["cfg"] == 2.0
    # the run names the weights it measured (not a row's label), and no case was left out
    assert doc["settings"]["model"].startswith("shipped toyworld (denoiser sha256 ")
    assert doc["settings"]["skipped"] == {}


def test_partial_prompts_are_read_over_several_seeds_the_first_the_single_seed_measure():
    import numpy as np

    from retouch.bench import toyworld
    from retouch.models.pipeline import PipelineModel

    model = PipelineModel.load()
    prompts = ["a red circle", "a striped square"]
    every, first, scores, images = toyworld.partial_adherence(model, prompts, cfg=3.0, seeds=2)
    single, single_scores, single_images, _ = toyworld.prompt_adherence(model, prompts=prompts,
                                                                        cfg=3.0)
    assert first == single and scores[:2] == single_scores
    assert np.array_equal(images[:2], single_images)
    assert len(scores) == 4 and every["n"] == 4 and images.shape[0] == 4
    assert not np.array_equal(images[2:], images[:2])  # the second seed draws other noise
    assert every["all"] == np.mean([s["all"] for s in scores])


def test_style_batches_are_marked_against_their_reference():
    import random

    import numpy as np

    from retouch.bench.consistency import batch_marks, style_batch
    from retouch.toyworld.render import render
    from retouch.toyworld.scene import parse_caption

    ref, prompts = style_batch(random.Random(0), "striped")
    assert ref.style == "striped" and len(prompts) == 4
    assert all("background" not in p and "striped" not in p for p in prompts[1:])
    # the reference's own render in every slot: its style and background, and other content
    images = np.stack([render(ref, 64).image] * 4)
    marks = batch_marks(images, prompts, ref)
    assert marks["style"] == marks["background"] == marks["agree"] == [True] * 3
    assert marks["solid"] == [False] * 3 and marks["adhere"] == [False] * 3
    assert marks["leak"] == [True] * 3  # the reference's shape and colour, not the prompt's
    own = [parse_caption(p)["objects"][0] for p in prompts[1:]]
    assert all(o["shape"] != ref.objects[0].shape for o in own)
