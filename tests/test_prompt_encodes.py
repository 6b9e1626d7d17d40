"""`squeeze gen` encodes each prompt once (not once per seed or batch), and its images are the ones a plain
`pipe(prompt, references)` call gives for the same seed."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from squeeze_cli.pipelines.mllm import MLLMEncoder

REPO = Path(__file__).resolve().parents[1]

MANIFEST = """\
version: 1
recipe: tiny
output: {grids: false, contact_sheet: false}
defaults: {height: 32, width: 48, num_inference_steps: 3, reference_size: 32, seeds: [0, 1, 2]}
subjects:
  - name: dog
    class: dog
    references: [images/dog/*.jpg]
    prompts: ["a {class} in the snow", "a {class} on the beach"]
  - name: backpack
    class: backpack
    references: [images/backpack/00.jpg]
    prompts: ["a {class} on a table", "a {class} in the snow"]
"""
NUM_PROMPTS, NUM_JOBS = 4, 12


@pytest.fixture
def project(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "examples" / "images", tmp_path / "images")
    (tmp_path / "m.yaml").write_text(MANIFEST)
    return tmp_path


@pytest.fixture
def instruction_encodes(monkeypatch) -> list[str]:
    encoded: list[str] = []
    original = MLLMEncoder.encode_instruction

    def counting(self, prefix, instruction, **kwargs):
        encoded.append(instruction)
        return original(self, prefix, instruction, **kwargs)

    monkeypatch.setattr(MLLMEncoder, "encode_instruction", counting)
    return encoded


@pytest.mark.parametrize("batch_size", ["1", "2", "4"])
def test_each_prompt_is_encoded_once_whatever_the_batch(project, squeeze, instruction_encodes, batch_size):
    result = squeeze("gen", str(project / "m.yaml"), "--batch-size", batch_size, "--quiet")
    assert result.code == 0, result.err
    assert len(list((project / "squeeze-out").glob("*/*.png"))) == NUM_JOBS
    assert len(instruction_encodes) == NUM_PROMPTS  # was one per batch: 12 at --batch-size 1
    assert len(set(instruction_encodes)) == NUM_PROMPTS


def test_gen_images_equal_a_plain_pipeline_call(project, squeeze):
    from squeeze_cli.images import load_rgb
    from squeeze_cli.loading import load_pipeline
    from squeeze_cli.manifest.schema import ModelSpec

    assert squeeze("gen", str(project / "m.yaml"), "--quiet").code == 0
    pipe = load_pipeline(ModelSpec(builtin="tiny", family="internvl", dtype="float32"))
    references = [load_rgb(p) for p in sorted((project / "images" / "dog").glob("*.jpg"))]
    for seed in (0, 2):
        image = pipe(
            "a dog on the beach",
            references,
            height=32,
            width=48,
            num_inference_steps=3,
            reference_size=32,
            generator=torch.Generator().manual_seed(seed),
        ).images[0]
        (written,) = (project / "squeeze-out" / "dog").glob(f"001-s{seed}*.png")
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(written).convert("RGB")))


def test_a_subject_condition_reuses_its_instructions_and_plain_calls_do_not(instruction_encodes):
    from squeeze_cli.loading import load_pipeline
    from squeeze_cli.manifest.schema import ModelSpec

    pipe = load_pipeline(ModelSpec(builtin="tiny", family="internvl", dtype="float32"))
    references = [Image.new("RGB", (40, 32), (180, 90, 30))]
    params = dict(height=32, width=32, num_inference_steps=2, reference_size=32, output_type="latent")
    subject = pipe.encode_subject(references, reference_size=32)
    first = None
    for _ in range(3):  # calls as for 3 seeds, with true CFG: the prompt and its negative, once each
        out = pipe(
            "a toy",
            subject_condition=subject,
            negative_prompt="blurry",
            true_cfg_scale=2.0,
            generator=[torch.Generator().manual_seed(0)],
            **params,
        ).images
        first = out if first is None else first
        assert torch.equal(out, first)  # the reused condition is the same tensor, so the same latents
    assert instruction_encodes == ["a toy", "blurry"]
    instruction_encodes.clear()
    for _ in range(2):  # references passed in: a fresh subject condition per call, nothing kept
        pipe("a toy", references, generator=[torch.Generator().manual_seed(0)], **params)
    assert instruction_encodes == ["a toy", "a toy"]


@pytest.mark.parametrize("ahead", [16, 1])
def test_a_subjects_prompts_are_encoded_before_its_batches(project, squeeze, monkeypatch, ahead):
    """With model offload every switch between the MLLM and the transformer moves gigabytes: the runner
    encodes the next `PROMPTS_AHEAD` distinct prompts together, then denoises their batches."""
    from squeeze_cli.gen import worker

    events: list[str] = []
    original_encode, original_generate = MLLMEncoder.encode_instruction, worker.Worker._generate

    def encode(self, prefix, instruction, **kwargs):
        events.append(f"encode {instruction}")
        return original_encode(self, prefix, instruction, **kwargs)

    def generate(self, batch, condition):
        events.append(f"generate {batch[0].prompt}")
        return original_generate(self, batch, condition)

    monkeypatch.setattr(MLLMEncoder, "encode_instruction", encode)
    monkeypatch.setattr(worker.Worker, "_generate", generate)
    monkeypatch.setattr(worker, "PROMPTS_AHEAD", ahead)
    assert squeeze("gen", str(project / "m.yaml"), "--quiet").code == 0
    first, second = "a dog in the snow", "a dog on the beach"
    if ahead == 16:  # both prompts of the dog, then its six images
        expected = [f"encode {first}", f"encode {second}"] + [f"generate {first}"] * 3
        expected += [f"generate {second}"] * 3
    else:  # one prompt at a time, still once each
        expected = [f"encode {first}"] + [f"generate {first}"] * 3 + [f"encode {second}"]
        expected += [f"generate {second}"] * 3
    assert events[:8] == expected
    assert len([e for e in events if e.startswith("encode")]) == NUM_PROMPTS


def test_the_negative_prompt_is_encoded_with_the_prompts(project, squeeze, monkeypatch):
    """With true CFG the negative prompt is encoded ahead too, never inside a batch's call (with model
    offload that would move the MLLM back onto the GPU once more per subject)."""
    from squeeze_cli.gen import worker

    encodes: list[tuple[str, bool]] = []  # (instruction, while a batch was being generated)
    generating = [False]
    original_encode, original_generate = MLLMEncoder.encode_instruction, worker.Worker._generate

    def encode(self, prefix, instruction, **kwargs):
        encodes.append((instruction, generating[0]))
        return original_encode(self, prefix, instruction, **kwargs)

    def generate(self, batch, condition):
        generating[0] = True
        try:
            return original_generate(self, batch, condition)
        finally:
            generating[0] = False

    monkeypatch.setattr(MLLMEncoder, "encode_instruction", encode)
    monkeypatch.setattr(worker.Worker, "_generate", generate)
    overrides = ["--set", "defaults.true_cfg_scale=2.0", "--set", "defaults.negative_prompt=blurry"]
    assert squeeze("gen", str(project / "m.yaml"), "--quiet", *overrides).code == 0
    assert ("blurry", False) in encodes
    assert [text for text, during_a_batch in encodes if during_a_batch] == []
