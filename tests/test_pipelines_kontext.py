"""KontextPipeline on its tiny random checkpoint, loaded as `squeeze gen` loads it (CPU, small images): what
is Kontext's own. The contract every pipeline meets (batches, seeds, callbacks, ...) is in
tests/test_pipeline_contract.py."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch

from squeeze_cli.loading import ensure_tiny_checkpoint, load_pipeline
from squeeze_cli.manifest.schema import ModelSpec
from squeeze_cli.pipelines.kontext import KontextPipeline, KontextSubject, kontext_reference_size

SIZE = 32
STEPS = 3


def generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def reference(seed: int, size: tuple[int, int]) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pipe() -> KontextPipeline:
    spec = ModelSpec(builtin="tiny", pipeline_class="kontext", dtype="float32")
    return load_pipeline(spec, device="cpu")


@pytest.fixture(scope="module")
def subject(pipe) -> KontextSubject:
    return pipe.encode_subject([reference(0, (48, 40)), reference(1, (32, 64))], reference_size=SIZE)


def run(pipe, prompts, seeds, subject, **kwargs) -> np.ndarray:
    args = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="np")
    return pipe(prompts, subject_condition=subject, generator=generators(*seeds), **{**args, **kwargs}).images


def test_tiny_checkpoint_has_the_hub_layout() -> None:
    path = ensure_tiny_checkpoint("", "kontext")
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == "FluxKontextPipeline"
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["text_encoder_2"] == ["transformers", "T5EncoderModel"]
    assert index["tokenizer"][1] == "CLIPTokenizer" and index["tokenizer_2"][1] == "T5Tokenizer"
    for folder in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        assert list((path / folder).glob("*.safetensors")), folder
    assert (path / "tokenizer" / "tokenizer.json").is_file() and (
        path / "tokenizer_2" / "tokenizer.json"
    ).is_file()


def test_the_trained_tokenizers_split_words(pipe) -> None:
    # The tiny T5 tokenizer splits text into words, not only bytes.
    tokens = pipe.tokenizer_2.tokenize("a photo of a dog on the beach")
    assert "▁dog" in tokens and len(tokens) < len("a photo of a dog on the beach")


def test_encode_subject_keeps_one_latent_per_reference_at_its_aspect(subject) -> None:
    shapes = [tuple(latents.shape) for latents in subject.reference_latents]
    # 48×40 → Kontext's 1104×944 at 32² area → 32×16 px (multiples of 16) → 4×2 latents; 32×64 → 720×1456
    # → 16×32 px → 2×4 latents.
    assert shapes == [(16, 2, 4), (16, 4, 2)]


def test_a_non_square_reference_gives_the_image_of_diffusers_kontext(pipe) -> None:
    """Issue 19 item 8: at `reference_size` 1024 a reference is sized as diffusers' FluxKontextPipeline
    sizes it (`_auto_resize`: 4:3 → 1184×880, 4,070 tokens; the longer side at 1024 gave 1024×768, 3,072),
    so the baseline is run as its authors run it; the images are then equal bit for bit."""
    from diffusers import FluxKontextPipeline

    image = reference(5, (400, 300))
    subject = pipe.encode_subject([image], reference_size=1024)
    assert subject.reference_latents[0].shape == (16, 110, 148)  # 880×1184 px, 8× down
    args = dict(height=32, width=48, num_inference_steps=1, guidance_scale=2.5, output_type="latent")
    ours = pipe(["a dog"], subject_condition=subject, generator=generators(3), **args).images
    diffusers_pipe = FluxKontextPipeline(**pipe.components)
    diffusers_pipe.set_progress_bar_config(disable=True)
    theirs = diffusers_pipe(
        image=image,
        prompt="a dog",
        generator=torch.Generator("cpu").manual_seed(3),
        max_sequence_length=pipe.max_sequence_length,
        max_area=32 * 48,  # diffusers scales the output to ~1 MP unless told its area
        **args,
    ).images
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((400, 300), (1184, 880)),
        ((600, 1000), (800, 1328)),
        ((1000, 600), (1328, 800)),
        ((64, 64), (1024, 1024)),
    ],
)
def test_reference_sizes_follow_kontexts_preferred_resolutions(size, expected) -> None:
    assert kontext_reference_size(*size, 1024) == expected
    # Smaller `reference_size`: the same preferred aspect ratio at that area, multiples of 16.
    assert kontext_reference_size(*size, 512) == (expected[0] // 2 // 16 * 16, expected[1] // 2 // 16 * 16)


def test_references_get_their_own_position_index(pipe, subject) -> None:
    tokens, ids = pipe._reference_tokens(subject, torch.device("cpu"), torch.float32)
    assert tokens.shape == (2 + 2, 64)  # each 2×4 latent packs 2×2 into 2 tokens of 16·4 channels
    assert ids[:2, 0].tolist() == [1.0, 1.0] and ids[2:, 0].tolist() == [2.0, 2.0]


def test_every_reference_changes_the_image(pipe, subject) -> None:
    base = run(pipe, ["a dog"], (0,), subject)
    swapped = pipe.encode_subject([reference(0, (48, 40)), reference(7, (32, 64))], reference_size=SIZE)
    assert np.abs(run(pipe, ["a dog"], (0,), swapped) - base).max() > 1e-3


def test_each_prompt_is_encoded_once(pipe, subject, monkeypatch) -> None:
    pipe._prompt_cache.clear()
    calls: list[list[str]] = []
    original = pipe.encode_prompt

    def counting(*args, **kwargs):
        calls.append(kwargs["prompt"])
        return original(*args, **kwargs)

    monkeypatch.setattr(pipe, "encode_prompt", counting)
    run(pipe, ["a dog", "a cat"], (0, 1), subject)
    run(pipe, ["a dog"], (2,), subject)
    assert calls == [["a dog"], ["a cat"]]


def test_a_prompt_longer_than_t5_reads_is_refused(pipe) -> None:
    pipe.check_prompt_fits([(32, 32)], ["a dog on the beach"])
    with pytest.raises(ValueError, match=r"T5 tokens, more than the 64 FLUX.1 Kontext reads"):
        pipe.check_prompt_fits([(32, 32)], ["a dog on the beach " * 20])


@pytest.mark.parametrize("size", [30, 0])
def test_sizes_must_be_multiples_of_16(pipe, subject, size) -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        run(pipe, ["a dog"], (0,), subject, height=size)


def test_the_model_section_of_a_kontext_recipe_is_checked() -> None:
    from pydantic import ValidationError

    from squeeze_cli.manifest.recipes import model_identity

    with pytest.raises(ValidationError, match="no model source for `pipeline_class: kontext`"):
        ModelSpec(pipeline_class="kontext")
    with pytest.raises(ValidationError, match="`family` applies to the squeeze pipeline only"):
        ModelSpec(pipeline_class="kontext", pipeline="org/kontext", family="internvl")
    # Naming the default pipeline changes nothing, job ids included; naming another one changes them.
    plain = model_identity(ModelSpec(builtin="tiny"))
    assert model_identity(ModelSpec(builtin="tiny", pipeline_class="squeeze")) == plain
    assert model_identity(ModelSpec(builtin="tiny", pipeline_class="kontext")) != plain


def test_a_dry_run_reports_no_stages_for_kontext(tmp_path, squeeze) -> None:
    PIL.Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    manifest = tmp_path / "m.yaml"
    subjects = "subjects:\n  - {name: a, references: [a.png], prompts: [x]}\n"
    manifest.write_text("version: 1\nrecipe: tiny-kontext\n" + subjects)
    result = squeeze("gen", str(manifest), "--dry-run")
    assert result.code == 0 and "1 job over" in result.out and "steps per stage" not in result.out
