"""QwenImageEditPlusPipeline on its tiny random checkpoint, loaded as `squeeze gen` loads it (CPU): what is
Qwen-Image-Edit's own. The contract every pipeline meets (batches, seeds, callbacks, ...) is in
tests/test_pipeline_contract.py."""

from __future__ import annotations

import json
import shutil

import numpy as np
import PIL.Image
import pytest
import torch

from squeeze_cli.loading import ensure_tiny_checkpoint, load_pipeline
from squeeze_cli.manifest.schema import ModelSpec
from squeeze_cli.pipelines.qwen_image_edit import (
    QwenEditSubject,
    QwenImageEditPlusPipeline,
    vae_reference_size,
)

SIZE = 32
STEPS = 3


def generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def reference(seed: int, size: tuple[int, int]) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pipe() -> QwenImageEditPlusPipeline:
    spec = ModelSpec(builtin="tiny", pipeline_class="qwen-image-edit-plus", dtype="float32")
    return load_pipeline(spec, device="cpu")


@pytest.fixture
def subject(pipe) -> QwenEditSubject:
    return pipe.encode_subject([reference(0, (48, 40)), reference(1, (32, 64))], reference_size=SIZE)


def run(pipe, prompts, seeds, subject, **kwargs) -> np.ndarray:
    args = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="np", negative_prompt=" ")
    return pipe(prompts, subject_condition=subject, generator=generators(*seeds), **{**args, **kwargs}).images


def test_tiny_checkpoint_has_the_hub_layout() -> None:
    path = ensure_tiny_checkpoint("", "qwen-image-edit-plus")
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImageEditPlusPipeline"
    assert index["text_encoder"] == ["transformers", "Qwen2_5_VLForConditionalGeneration"]
    assert index["transformer"] == ["diffusers", "QwenImageTransformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLQwenImage"]
    assert (path / "processor" / "preprocessor_config.json").is_file()
    assert (path / "tokenizer" / "tokenizer.json").is_file()


def test_vl_inputs_match_what_the_processor_would_make(pipe, subject) -> None:
    # Qwen2VLProcessor puts (t·h·w)/merge² <|image_pad|> tokens per image between its vision markers.
    grid = subject.vl_inputs["image_grid_thw"]
    expected = [int(g.prod()) // 4 for g in grid]
    ids = pipe._input_ids("a dog", expected)
    pad = pipe.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    start = pipe.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    runs, count = [], 0
    for token in ids:
        if token == pad:
            count += 1
        elif count:
            runs.append(count)
            count = 0
    assert runs == expected and ids.count(start) == 2
    # The instruction's special-token spellings stay text.
    assert pipe._input_ids("<|image_pad|>", expected).count(pad) == sum(expected)


def test_vl_encoding_is_computed_once_per_prompt(pipe, subject, monkeypatch) -> None:
    calls = []
    original = pipe.text_encoder.forward

    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(pipe.text_encoder, "forward", counting)
    run(pipe, ["a dog", "a cat"], (0, 1), subject)
    run(pipe, ["a dog", "a dog"], (2, 3), subject)
    assert len(calls) == 3  # "a dog", "a cat" and the negative " "
    assert set(subject.prompt_encodings) == {"a dog", "a cat", " "}


@pytest.mark.parametrize("pipeline_class", ["qwen-image-edit-plus", "qwen-image-edit-2511"])
def test_every_reference_changes_the_image(pipeline_class) -> None:
    spec = ModelSpec(builtin="tiny", pipeline_class=pipeline_class, dtype="float32")
    pipe = load_pipeline(spec, device="cpu")
    subject = pipe.encode_subject([reference(0, (48, 40)), reference(1, (32, 64))], reference_size=SIZE)
    base = run(pipe, ["a dog"], (0,), subject)
    swapped = pipe.encode_subject([reference(0, (48, 40)), reference(9, (32, 64))], reference_size=SIZE)
    # The tiny random VAE decoder damps differences; the run-to-run spread is zero (test_pipeline_contract).
    assert np.abs(run(pipe, ["a dog"], (0,), swapped) - base).max() > 1e-4


def test_a_prompt_too_long_for_the_vl_encoder_is_refused(pipe) -> None:
    pipe.check_prompt_fits([(48, 40), (32, 64)], ["a dog on the beach"])
    with pytest.raises(ValueError, match=r"2 reference image\(s\).* more than the 512 Qwen-Image-Edit reads"):
        pipe.check_prompt_fits([(48, 40), (32, 64)], ["a dog on the beach " * 60])


def test_a_checkpoint_naming_qwen2vlprocessor_as_the_hub_does_loads(tmp_path) -> None:
    # Qwen/Qwen-Image-Edit-2509's model_index names `Qwen2VLProcessor`, which needs torchvision to build:
    # the loader skips it and uses the image processor from `processor/`.
    checkpoint = tmp_path / "hub"
    shutil.copytree(ensure_tiny_checkpoint("", "qwen-image-edit-plus"), checkpoint)
    index = json.loads((checkpoint / "model_index.json").read_text())
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    (checkpoint / "model_index.json").write_text(json.dumps(index))
    spec = ModelSpec(pipeline=str(checkpoint), pipeline_class="qwen-image-edit-plus", dtype="float32")
    pipe = load_pipeline(spec, device="cpu")
    assert type(pipe.processor).__name__ == "Qwen2VLImageProcessorPil"
    subject = pipe.encode_subject([reference(0, (48, 40))], reference_size=SIZE)
    assert run(pipe, ["a dog"], (0,), subject).shape == (1, SIZE, SIZE, 3)


@pytest.mark.parametrize("size", [(48, 40), (32, 64), (200, 30), (17, 301)])
def test_the_length_check_counts_the_image_tokens_the_encoder_gets(pipe, size) -> None:
    subject = pipe.encode_subject([reference(0, size)], reference_size=SIZE)
    actual = len(pipe._input_ids("a dog", pipe._image_tokens(subject.vl_inputs["image_grid_thw"])))
    limit = pipe.tokenizer_max_length
    pipe.tokenizer_max_length = actual  # exactly full: fits; one token less: refused
    try:
        pipe.check_prompt_fits([size], ["a dog"])
        pipe.tokenizer_max_length = actual - 1
        with pytest.raises(ValueError, match=f"makes a {actual}-token sequence"):
            pipe.check_prompt_fits([size], ["a dog"])
    finally:
        pipe.tokenizer_max_length = limit


def test_the_cached_prefix_gives_the_full_pass_encoding(pipe, subject) -> None:
    prefix_length = subject.prefix_ids.shape[0]
    for prompt in ("a dog on the beach", "a cat", " ", "a dog on the beach"):
        cached = pipe.encode_instruction(subject, prompt)
        torch.testing.assert_close(
            cached, pipe.encode_instruction_uncached(subject, prompt), atol=1e-5, rtol=0
        )
        assert subject.prefix_cache.get_seq_length() == prefix_length  # cropped back for the next prompt
    # The system part of the template is dropped, as diffusers drops it; the images stay.
    pad = pipe.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((subject.prefix_ids[pipe._drop_length() :] == pad).sum()) == sum(
        pipe._image_tokens(subject.vl_inputs["image_grid_thw"])
    )


# ----------------------------------------------------------------------------------------------------------
# Equal to diffusers' own QwenImageEditPlusPipeline
# ----------------------------------------------------------------------------------------------------------


def diffusers_latents(pipe, subject, images, prompt: str, seed: int, **args) -> torch.Tensor:
    """diffusers' `QwenImageEditPlusPipeline` on `pipe`'s components: reference sizing, VAE latents, noise,
    transformer (`img_shapes`, 2511's `zero_cond_t`), scheduler and true CFG are all diffusers' own.

    Only the prompt encodings are squeeze's (`subject`'s), passed as `prompt_embeds`: diffusers'
    `_get_qwen_prompt_embeds` calls Qwen2.5-VL without `mm_token_type_ids`, so under transformers 5 its
    image tokens get plain 1-D positions, where the released model (transformers 4) puts them at their grid
    positions (M-RoPE). squeeze follows the released model (`test_the_cached_prefix_gives_the_full_pass_
    encoding`); diffusers' own encoding also needs the full `Qwen2VLProcessor`, which transformers 5 cannot
    build without torchvision.
    """
    from diffusers import QwenImageEditPlusPipeline as DiffusersPipeline

    embeds = {}
    for name, text in (("prompt", prompt), ("negative_prompt", " ")):
        encoding = pipe.encode_instruction(subject, text)[None]
        embeds[f"{name}_embeds"] = encoding
        embeds[f"{name}_embeds_mask"] = torch.ones(encoding.shape[:2], dtype=torch.long)
    theirs = DiffusersPipeline(**pipe.components)
    theirs.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(seed)
    return theirs(image=images, generator=generator, true_cfg_scale=4.0, **embeds, **args).images


def squeeze_latents(pipe, subject, prompt: str, seed: int, **args) -> torch.Tensor:
    return pipe(
        [prompt],
        subject_condition=subject,
        negative_prompt=" ",
        true_cfg_scale=4.0,
        generator=generators(seed),
        **args,
    ).images


NON_SQUARE = ((400, 300), (300, 500))  # 4:3 and 3:5


@pytest.mark.parametrize("pipeline_class", ["qwen-image-edit-plus", "qwen-image-edit-2511"])
def test_an_image_equals_diffusers_qwen_image_edit_plus(pipeline_class, monkeypatch) -> None:
    """Issue 23: each tiny twin (2509; 2511 with `zero_cond_t`) gives diffusers' latents bit for bit, with two
    non-square references and true CFG. diffusers sizes the VAE's references at 1024² area; here at 64² (its
    module constant), which squeeze's `reference_size` 64 matches, to keep the test fast (the 1024² sizing
    itself: `test_non_square_references_are_sized_as_diffusers_sizes_them`)."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus

    spec = ModelSpec(builtin="tiny", pipeline_class=pipeline_class, dtype="float32")
    pipe = load_pipeline(spec, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.zero_cond_t == (pipeline_class == "qwen-image-edit-2511")
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", 64 * 64)
    images = [reference(seed, size) for seed, size in enumerate(NON_SQUARE)]
    subject = pipe.encode_subject(images, reference_size=64)
    args = dict(height=32, width=48, num_inference_steps=2, output_type="latent")
    ours = squeeze_latents(pipe, subject, "a dog", 3, **args)
    assert torch.equal(ours, diffusers_latents(pipe, subject, images, "a dog", 3, **args))


@pytest.mark.slow
def test_non_square_references_are_sized_as_diffusers_sizes_them(pipe) -> None:
    """Issue 19 item 8: at `reference_size` 1024 the VAE sees each reference at diffusers' size (4:3 →
    1184×896, 4,144 tokens; the longer side at 1024 gave 1024×768, 3,072), so the baseline runs as its authors
    run it; the images are then diffusers' bit for bit."""
    images = [reference(seed, size) for seed, size in enumerate(NON_SQUARE)]
    subject = pipe.encode_subject(images, reference_size=1024)
    assert [tuple(latents.shape) for latents in subject.reference_latents] == [
        (16, 1, 112, 148),  # 1184×896 px, 8× down
        (16, 1, 164, 100),  # 800×1312 px
    ]
    args = dict(height=32, width=48, num_inference_steps=2, output_type="latent")
    ours = squeeze_latents(pipe, subject, "a dog", 3, **args)
    assert torch.equal(ours, diffusers_latents(pipe, subject, images, "a dog", 3, **args))


@pytest.mark.parametrize(
    ("size", "reference_size", "expected"),
    [
        ((400, 300), 1024, (1184, 896)),  # diffusers' `calculate_dimensions(VAE_IMAGE_SIZE, 4 / 3)`
        ((1000, 600), 1024, (1312, 800)),
        ((17, 301), 32, (32, 128)),  # diffusers would make the width 0; kept at 32
    ],
)
def test_vae_reference_sizes_keep_the_area_and_aspect(size, reference_size, expected) -> None:
    assert vae_reference_size(*size, reference_size) == expected


def test_more_references_than_2511_takes_are_refused_at_validation(tmp_path, squeeze) -> None:
    for i in range(4):
        reference(i, (32, 32)).save(tmp_path / f"{i}.png")
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "version: 1\nrecipe: tiny-qwen-image-edit-2511\nsubjects:\n"
        "  - {name: a, references: ['[0-2].png'], prompts: [x]}\n"
        "  - {name: b, references: ['*.png'], prompts: [x]}\n"
    )
    result = squeeze("validate", str(manifest))
    assert result.code == 2
    errors = [line for line in result.err.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {manifest}:5:27: subjects[1].references: 4 reference images, more than the 3 the "
        "qwen-image-edit-2511 pipeline (recipe tiny-qwen-image-edit-2511) conditions on "
        "(hint: keep at most 3 for this subject)"
    ]
    # The 2509 pipeline has no such limit; three are fine with 2511.
    assert squeeze("validate", str(manifest), "--recipe", "tiny-qwen-image-edit").code == 0
    manifest.write_text(manifest.read_text().replace("'*.png'", "'[1-3].png'"))
    assert squeeze("validate", str(manifest)).code == 0
