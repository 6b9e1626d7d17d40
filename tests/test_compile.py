"""`model.compile`: torch.compile of the transformer's repeated blocks, opt-in, outside the job ids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from squeeze_cli.errors import ManifestError
from squeeze_cli.loading import load_pipeline
from squeeze_cli.manifest.resolve import load_manifest
from squeeze_cli.manifest.schema import ModelSpec
from squeeze_cli.pipelines.tiny import build_tiny_pipeline
from squeeze_cli.plan import plan_jobs


def manifest(write_file, make_image, model: str):
    make_image("refs/a.png")
    return write_file(
        f"""
        version: 1
        recipe: tiny
        {model}
        defaults: {{height: 64, width: 64}}
        subjects:
          - name: dog
            references: [refs/a.png]
            prompts: [a dog]
        """
    )


def test_compile_is_recorded_and_keeps_the_job_ids(write_file, make_image):
    eager = load_manifest(manifest(write_file, make_image, ""))
    compiled = load_manifest(manifest(write_file, make_image, "model: {compile: true}"))
    assert compiled.model.compile and not eager.model.compile
    # Float rounding at most, like --batch-size: a compiled run resumes an eager one's images.
    assert compiled.model_identity == eager.model_identity
    ids = [plan_jobs(m, model_identity=m.model_identity, max_jobs=10)[0].job_id for m in (eager, compiled)]
    assert ids[0] == ids[1]
    assert compiled.model.model_dump(mode="json")["compile"] is True  # what run.json and sidecars write


@pytest.mark.parametrize("value", ["max-autotune", "1", "{mode: full}"])
def test_bad_compile_is_located(write_file, make_image, value):
    path = manifest(write_file, make_image, f"model:\n          compile: {value}")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    (problem,) = info.value.problems
    assert problem.field == "model.compile" and "expected true or false" in problem.message


@pytest.mark.slow
def test_a_compiled_transformer_generates_the_eager_image(tmp_path):
    path = build_tiny_pipeline(tmp_path / "tiny")
    reference = Image.new("RGB", (40, 32), (180, 90, 30))

    def generate(pipe) -> np.ndarray:
        return pipe(
            "a toy on a table",
            reference,
            height=32,
            width=32,
            num_inference_steps=4,
            stage_thresholds=(0.9, 0.7),
            reference_size=32,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images

    eager = load_pipeline(ModelSpec(pipeline=str(path), dtype="float32"))
    compiled = load_pipeline(ModelSpec(pipeline=str(path), dtype="float32", compile=True))
    blocks = [*compiled.transformer.transformer_blocks, *compiled.transformer.single_transformer_blocks]
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert eager.transformer.transformer_blocks[0]._compiled_call_impl is None
    image = generate(compiled)
    np.testing.assert_allclose(image, generate(eager), atol=1e-4)
