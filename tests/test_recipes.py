"""Recipes on a (barely trained) ToyWorld pipeline: attention maps, end to end."""

import numpy as np
import pytest

from retouch.models.pipeline import PipelineModel
from retouch.recipes.attention_maps import attention_maps, save_attention_maps
from retouch.toyworld.render import render
from retouch.toyworld.scene import ObjectSpec, Scene


@pytest.mark.parametrize("given_image", [False, True])
def test_attention_maps_for_prompt_and_image(tiny_toy_pipeline, tmp_path, given_image):
    model = PipelineModel.load(tiny_toy_pipeline)
    prompt = "a big red circle on the left"
    image = render(Scene(objects=(ObjectSpec("circle", "red", "big", "left"),))).image
    maps = attention_maps(model, prompt, image=image if given_image else None, steps=3,
                          clusters=3)
    assert list(maps.heatmaps) == ["big", "red", "circle", "left"]
    for m in maps.heatmaps.values():
        assert m.shape == (8, 8) and m.max() == pytest.approx(1.0) and m.min() >= 0.0
    assert maps.image.shape == (64, 64, 3)
    assert maps.segments.shape == (8, 8) and set(np.unique(maps.segments)) <= {0, 1, 2}
    assert set(maps.segment_words) == set(np.unique(maps.segments).tolist())
    paths = save_attention_maps(maps, tmp_path)
    assert all(p.stat().st_size > 0 for p in paths)


def test_attention_maps_refuse_words_not_in_prompt(tiny_toy_pipeline):
    model = PipelineModel.load(tiny_toy_pipeline)
    with pytest.raises(ValueError, match="square"):
        attention_maps(model, "a red circle", words=["square"], steps=2)
