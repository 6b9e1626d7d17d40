"""`model.mllm`: the MLLM's preprocessing of the references, per family, in job ids, passed at load."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from squeeze_cli.loading import load_pipeline
from squeeze_cli.manifest.recipes import load_recipe, model_identity
from squeeze_cli.manifest.schema import ModelSpec


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"family": "qwen2_5_vl", "mllm": {"crop_to_patches": True}}, "option of the internvl family"),
        ({"family": "internvl", "mllm": {"max_pixels": 200704}}, "option of the qwen2_5_vl family"),
        ({"mllm": {"max_pixels": 200704}}, "`family` is not set"),
        ({"family": "qwen2_5_vl", "mllm": {"max_pixels": 0}}, "positive number of pixels"),
        ({"family": "internvl", "mllm": {"crop_to_patches": "no"}}, "bool"),
        ({"family": "internvl", "mllm": {"tiling": True}}, "Extra inputs"),
    ],
)
def test_an_option_of_another_family_or_a_bad_value_is_refused(model, message):
    with pytest.raises(ValidationError, match=message):
        ModelSpec(builtin="tiny", **model)


def test_the_options_enter_the_model_identity():
    plain = model_identity(ModelSpec(builtin="tiny", family="qwen2_5_vl"))
    assert plain == model_identity(ModelSpec(builtin="tiny", family="qwen2_5_vl", mllm={}))  # empty: same
    capped = model_identity(ModelSpec(builtin="tiny", family="qwen2_5_vl", mllm={"max_pixels": 200704}))
    other = model_identity(ModelSpec(builtin="tiny", family="qwen2_5_vl", mllm={"max_pixels": 100352}))
    assert len({plain, capped, other}) == 3


@pytest.mark.parametrize(
    ("name", "options"),
    [("paper-internvl3-flux", {"crop_to_patches": False}), ("qwen2.5vl-flux", {"max_pixels": 200704})],
)
def test_the_real_recipes_state_their_preprocessing(name, options):
    assert load_recipe(name).model.mllm.encoder_options() == options


# Through the processor's `size`: `min_pixels`/`max_pixels` are deprecated (removal announced for v5.23).
@pytest.mark.filterwarnings("error::FutureWarning")
def test_max_pixels_caps_qwen_image_tokens_at_load():
    exact = load_pipeline(ModelSpec(builtin="tiny", family="qwen2_5_vl", dtype="float32"))
    capped = load_pipeline(
        ModelSpec(builtin="tiny", family="qwen2_5_vl", dtype="float32", mllm={"max_pixels": 16 * 16})
    )
    # The tiny processor allows 24² pixels (36 tokens for a 24² image, 4×4 pixels a patch, 2×2 merged).
    assert exact.mllm_encoder.adapter.image_tokens(24, 24) == 9
    assert capped.mllm_encoder.adapter.image_tokens(24, 24) == 4
    import PIL.Image

    image = PIL.Image.new("RGB", (24, 24), (10, 200, 30))
    assert capped.mllm_encoder.adapter.preprocess([image]).tokens_per_image == [4]


def test_crop_to_patches_reaches_the_internvl_encoder_at_load():
    tiled = load_pipeline(
        ModelSpec(builtin="tiny", family="internvl", dtype="float32", mllm={"crop_to_patches": True})
    )
    single = load_pipeline(ModelSpec(builtin="tiny", family="internvl", dtype="float32"))
    tokens_tiled = tiled.mllm_encoder.adapter.image_tokens(112, 56)
    tokens_single = single.mllm_encoder.adapter.image_tokens(112, 56)
    assert tokens_tiled > tokens_single
