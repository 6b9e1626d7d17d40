"""Flux2KleinPipeline and Flux2DevPipeline on their tiny random checkpoints, loaded as `squeeze gen` loads
them (CPU, small images): what is FLUX.2's own, above all that the images are diffusers' own. The contract
every pipeline meets (batches, seeds, callbacks, two processes, ...) is in tests/test_pipeline_contract.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch
from transformers import MistralConfig, Qwen3Config

from squeeze_cli.loading import ensure_tiny_checkpoint, load_pipeline
from squeeze_cli.manifest.schema import ModelSpec
from squeeze_cli.pipelines.flux2 import (
    Flux2DevPipeline,
    Flux2KleinKVPipeline,
    Flux2KleinPipeline,
    flux2_reference_size,
)

HEIGHT, WIDTH = 32, 48
STEPS = 3
MODELS = ("flux2-klein", "flux2-klein-kv", "flux2-dev")


def generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def reference(seed: int, size: tuple[int, int]) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# Sides that are multiples of 16, at least diffusers' 64, the longer one 80 in both: with `reference_size`
# 80 squeeze resizes neither, as diffusers does not, so both see the same pixels.
REFERENCES = ((64, 80), (80, 64))
REFERENCE_SIZE = 80


@pytest.fixture(scope="module", params=MODELS)
def pipe(request):
    spec = ModelSpec(builtin="tiny", pipeline_class=request.param, dtype="float32")
    return load_pipeline(spec, device="cpu")


@pytest.fixture(scope="module")
def subject(pipe):
    references = [reference(i, size) for i, size in enumerate(REFERENCES)]
    return pipe.encode_subject(references, reference_size=REFERENCE_SIZE)


def run(pipe, prompts, seeds, subject, **kwargs) -> np.ndarray:
    args = dict(height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, output_type="np")
    return pipe(prompts, subject_condition=subject, generator=generators(*seeds), **{**args, **kwargs}).images


@pytest.mark.parametrize("name", MODELS)
def test_tiny_checkpoint_has_the_hub_layout(name) -> None:
    path = ensure_tiny_checkpoint("", name)
    index = json.loads((path / "model_index.json").read_text())
    expected = {
        "flux2-klein": ("Flux2KleinPipeline", "Qwen3ForCausalLM", "Qwen2Tokenizer"),
        "flux2-klein-kv": ("Flux2KleinKVPipeline", "Qwen3ForCausalLM", "Qwen2Tokenizer"),
        "flux2-dev": ("Flux2Pipeline", "Mistral3ForConditionalGeneration", "PixtralProcessor"),
    }[name]
    assert (index["_class_name"], index["text_encoder"][1], index["tokenizer"][1]) == expected
    assert index["transformer"] == ["diffusers", "Flux2Transformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLFlux2"]
    for folder in ("transformer", "vae", "text_encoder"):
        assert list((path / folder).glob("*.safetensors")), folder
    assert (path / "tokenizer" / "tokenizer.json").is_file()
    if name == "flux2-klein":
        assert index["is_distilled"] is True  # as FLUX.2-klein-4B's
    if name == "flux2-dev":
        assert (path / "tokenizer" / "processor_config.json").is_file()


def test_images_equal_diffusers_own_pipeline(pipe, subject) -> None:
    # diffusers' own class over the very same modules, given the references as images, one prompt, one seed.
    # The KV pipeline computes the references' keys and values once per subject, diffusers' in the first step
    # of the call: the same numbers.
    guidance: dict = {}
    ours: dict = {}
    if isinstance(pipe, Flux2KleinKVPipeline):
        reference_pipe = diffusers.Flux2KleinKVPipeline(**pipe.components)
    elif isinstance(pipe, Flux2KleinPipeline):
        reference_pipe = diffusers.Flux2KleinPipeline(**pipe.components, is_distilled=True)
        guidance = {"guidance_scale": 1.0}  # unused by a distilled model either way
    else:
        reference_pipe = diffusers.Flux2Pipeline(**pipe.components)
        guidance = ours = {"guidance_scale": 3.5}
    theirs = reference_pipe(
        prompt="a dog on the beach",
        image=[reference(i, size) for i, size in enumerate(REFERENCES)],
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=STEPS,
        generator=torch.Generator("cpu").manual_seed(7),
        max_sequence_length=pipe.max_sequence_length,
        text_encoder_out_layers=pipe.text_encoder_out_layers,
        output_type="np",
        **guidance,
    ).images
    assert np.array_equal(run(pipe, ["a dog on the beach"], (7,), subject, **ours), theirs)


def test_encode_subject_keeps_one_latent_per_reference_at_its_aspect(subject) -> None:
    shapes = [tuple(latents.shape) for latents in subject.reference_latents]
    # 64×80 px → 8×10 latents of 32 channels → patchified 2×2 into 128 channels of 4×5; 80×64 → 5×4.
    assert shapes == [(128, 5, 4), (128, 4, 5)]


def test_references_get_their_own_time_coordinate(pipe, subject) -> None:
    tokens, ids = pipe._reference_tokens(subject.reference_latents, torch.device("cpu"), torch.float32)
    assert tokens.shape == (20 + 20, 128)
    assert ids[:20, 0].unique().tolist() == [10] and ids[20:, 0].unique().tolist() == [20]


def test_every_reference_changes_the_image(pipe, subject) -> None:
    base = run(pipe, ["a dog"], (0,), subject)
    swapped = pipe.encode_subject(
        [reference(0, (64, 80)), reference(9, (80, 64))], reference_size=REFERENCE_SIZE
    )
    # Random tiny weights pass the references on weakly, but far above float32 rounding (~1e-7).
    assert np.abs(run(pipe, ["a dog"], (0,), swapped) - base).max() > 1e-5


def test_each_prompt_is_encoded_once(pipe, subject, monkeypatch) -> None:
    pipe._prompt_cache.clear()
    calls: list[str] = []
    original = pipe._encode_prompt_text

    def counting(prompt, device):
        calls.append(prompt)
        return original(prompt, device)

    monkeypatch.setattr(pipe, "_encode_prompt_text", counting)
    pipe.prepare_prompts(subject, ["a dog", "a cat"])
    run(pipe, ["a dog", "a cat"], (0, 1), subject)
    run(pipe, ["a dog"], (2,), subject)
    assert calls == ["a dog", "a cat"]


def test_more_references_than_the_model_takes_are_refused(pipe) -> None:
    limit = pipe.max_references
    assert limit == {"FLUX.2 [klein]": 4, "FLUX.2 [dev]": 10}[pipe.model_name]
    with pytest.raises(ValueError, match=f"takes at most {limit} reference images, got {limit + 1}"):
        pipe.encode_subject([reference(0, (16, 16))] * (limit + 1), reference_size=16)


def test_a_prompt_longer_than_the_text_encoder_reads_is_refused(pipe) -> None:
    pipe.check_prompt_fits([(32, 32)], ["a dog on the beach"])
    with pytest.raises(ValueError, match=r"tokens with its chat template, more than the 512 FLUX.2"):
        pipe.check_prompt_fits([(32, 32)], ["a dog on the beach " * 200])


def test_the_kv_pipeline_runs_the_reference_tokens_once_per_subject(pipe, subject) -> None:
    # Tokens the transformer runs on, per step: the KV pipeline's steps see the 6 image tokens alone (its
    # reference keys and values came from `encode_subject`); the others also the 2 × 20 reference tokens.
    lengths: list[int] = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["hidden_states"].shape[1]), with_kwargs=True
    )
    try:
        run(pipe, ["a dog", "a cat"], (0, 1), subject)
    finally:
        hook.remove()
    kv = isinstance(pipe, Flux2KleinKVPipeline)
    assert (subject.reference_kv is not None) == kv
    assert lengths == [6 if kv else 6 + 40] * STEPS


def test_klein_refuses_guidance_and_dev_reads_it(pipe, subject) -> None:
    if not isinstance(pipe, Flux2DevPipeline):
        with pytest.raises(ValueError, match="`guidance_scale` is not used by the step-distilled"):
            run(pipe, ["a dog"], (0,), subject, guidance_scale=2.0)
    else:
        low = run(pipe, ["a dog"], (0,), subject, guidance_scale=1.0)
        assert np.abs(run(pipe, ["a dog"], (0,), subject, guidance_scale=6.0) - low).max() > 1e-3


@pytest.mark.parametrize(
    ("config", "layers"),
    [
        (Qwen3Config(num_hidden_layers=36), (9, 18, 27)),  # FLUX.2 [klein] 4B's Qwen3-4B: diffusers' default
        (MistralConfig(num_hidden_layers=40), (10, 20, 30)),  # FLUX.2 [dev]'s Mistral Small 3.1: diffusers'
    ],
)
def test_the_text_layers_read_are_diffusers_defaults_for_the_real_encoders(config, layers) -> None:
    stand_in = SimpleNamespace(text_encoder=SimpleNamespace(config=config))
    assert Flux2KleinPipeline.text_encoder_out_layers.fget(stand_in) == layers


def test_validation_refuses_more_references_than_the_model_takes(tmp_path, squeeze) -> None:
    for index in range(5):
        PIL.Image.new("RGB", (32, 32), (index, 0, 0)).save(tmp_path / f"{index}.png")
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "version: 1\nrecipe: tiny-flux2-klein\nsubjects:\n"
        "  - {name: four, references: ['[0-3].png'], prompts: [x]}\n"
        "  - {name: five, references: ['*.png'], prompts: [x]}\n"
    )
    result = squeeze("validate", str(manifest))
    assert result.code == 2
    assert (
        f"error: {manifest}:5:" in result.err
        and "subjects[1].references: 5 reference images, more than the 4 the flux2-klein pipeline "
        "(recipe tiny-flux2-klein) conditions on (hint: keep at most 4 for this subject)"
        in result.err
    )
    assert "subjects[0]" not in result.err
    # FLUX.2 [dev] takes up to 10.
    assert squeeze("validate", str(manifest), "--recipe", "tiny-flux2-dev").code == 0


def test_a_large_non_square_reference_gives_the_image_of_diffusers_own_pipeline(pipe) -> None:
    """At `reference_size` 1024 a reference over 1 MP is sized as diffusers sizes it (scaled to 1024² area,
    then cropped to multiples of 16: 1300×900 → 1216×848), so the baseline is run as its authors run it; the
    images are then diffusers' own, bit for bit."""
    image = reference(11, (1300, 900))
    subject = pipe.encode_subject([image], reference_size=1024)
    assert subject.reference_latents[0].shape[1:] == (848 // 16, 1216 // 16)
    if isinstance(pipe, Flux2KleinKVPipeline):
        reference_pipe = diffusers.Flux2KleinKVPipeline(**pipe.components)
        guidance: dict = {}
    elif isinstance(pipe, Flux2KleinPipeline):
        reference_pipe = diffusers.Flux2KleinPipeline(**pipe.components, is_distilled=True)
        guidance = {}
    else:
        reference_pipe = diffusers.Flux2Pipeline(**pipe.components)
        guidance = {"guidance_scale": 3.5}
    reference_pipe.set_progress_bar_config(disable=True)
    theirs = reference_pipe(
        prompt="a dog",
        image=[image],
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=1,
        generator=torch.Generator("cpu").manual_seed(5),
        max_sequence_length=pipe.max_sequence_length,
        text_encoder_out_layers=pipe.text_encoder_out_layers,
        output_type="np",
        **guidance,
    ).images
    ours = run(pipe, ["a dog"], (5,), subject, num_inference_steps=1, **guidance)
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize(
    ("size", "reference_size", "expected"),
    [
        ((1600, 1200), 1024, (1168, 880)),  # over 1 MP: scaled to 1024² area, then cut to multiples of 16
        ((800, 600), 1024, (800, 592)),  # under: never enlarged, only cut
        ((80, 64), 80, (80, 64)),
        ((200, 100), 64, (80, 32)),  # a smaller cap: the same rule at 64² area
    ],
)
def test_reference_sizes_follow_diffusers_flux2_rule(size, reference_size, expected) -> None:
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    assert flux2_reference_size(*size, reference_size) == expected
    # diffusers' own steps at its 1024² cap give the same sides.
    if reference_size == 1024:
        image = PIL.Image.new("RGB", size)
        if size[0] * size[1] > 1024 * 1024:
            image = Flux2ImageProcessor._resize_to_target_area(image, 1024 * 1024)
        assert (image.width // 16 * 16, image.height // 16 * 16) == expected
