"""ToyBench cases: the rendered ground truth scores as a perfect edit, the source as none."""

import numpy as np

from retouch.metrics import psnr, ssim
from retouch.toyworld.editbench import EDIT_TYPES, make_cases, score_edit


def test_ground_truth_is_a_perfect_edit_and_the_source_is_not():
    cases = make_cases(40)
    assert {c.edit_type for c in cases} == set(EDIT_TYPES)
    for case in cases:
        assert case.source_prompt != case.target_prompt
        moved = case.edit_type in ("position", "size")
        perfect = {"success": True, "preserved": True, **({"identity": True} if moved else {})}
        assert score_edit(case.target_image, case) == perfect
        assert score_edit(case.source_image, case)["success"] is False
        if case.edit_type == "position":  # the object left where the target wants it
            assert score_edit(case.source_image, case)["identity"] is False
        # outside the edit mask the source and the target are identical
        keep = ~case.edit_mask
        assert np.array_equal(case.source_image[keep], case.target_image[keep])


def test_single_word_edits():
    for case in make_cases(20):
        src, dst = case.source_prompt.split(), case.target_prompt.split()
        assert len(src) == len(dst)
        assert [(a, b) for a, b in zip(src, dst) if a != b] == [case.words]


def test_masked_metrics():
    """PSNR / SSIM over the pixels outside an edit mask."""
    case = make_cases(1)[0]
    img = case.source_image
    keep = ~case.edit_mask
    assert psnr(img, img, keep=keep) == 100.0
    assert ssim(img, img, keep=keep) == 1.0
    noisy = np.clip(img.astype(int) + 8, 0, 255).astype(np.uint8)
    assert 20 < psnr(img, noisy, keep=keep) < 40
    assert ssim(img, noisy, keep=keep) < 1.0
