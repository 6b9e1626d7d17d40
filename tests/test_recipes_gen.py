"""The tiny FLUX.1 Kontext and Qwen-Image-Edit recipes beyond the contract every pipeline meets
(tests/test_pipeline_contract.py: generation, resume, two processes, metadata, keys refused): a key a
pipeline ignores is refused at every level of the manifest, the PNG `parameters` chunk of a real
checkpoint, and a manifest switching the pipeline of a recipe."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_IMAGES = REPO / "examples" / "images"

MANIFEST = """\
version: 1
recipe: {recipe}
defaults:
  height: 32
  width: 48
  num_inference_steps: 3
  reference_size: 32
  seeds: [0, 1]
subjects:
  - name: dog
    class: dog
    references: [images/dog/*.jpg]
    prompts:
      - a {{class}} in the snow
      - a {{class}} on the beach, in the sun
  - name: backpack
    class: backpack
    references: [images/backpack/00.jpg]
    prompts:
      - a {{class}} on a table
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    shutil.copytree(EXAMPLE_IMAGES, tmp_path / "images")
    (tmp_path / "m.yaml").write_text(MANIFEST.format(recipe="tiny-qwen-image-edit"))
    return tmp_path


def test_a_key_the_pipeline_ignores_is_refused_at_every_level(project: Path, squeeze) -> None:
    # Qwen-Image has no guidance embedding; the contract test sets each ignored key in `defaults`.
    manifest = project / "m.yaml"
    manifest.write_text(
        manifest.read_text().replace(
            "      - a {class} on a table", "      - {text: 'a {class} on a table', guidance_scale: 3}"
        )
    )
    result = squeeze("validate", str(manifest), "--set", "subjects.0.guidance_scale=3")
    assert result.code == 2
    message = "`guidance_scale` is not used by the qwen-image-edit-plus pipeline"
    assert f"error: --set subjects.0.guidance_scale=3: subjects[0].guidance_scale: {message}" in result.err
    assert (
        f"error: {manifest}:20:" in result.err
        and f"subjects[1].prompts[0].guidance_scale: {message}" in result.err
    )


def test_parameters_chunk_of_a_real_checkpoint_names_it() -> None:
    from squeeze_cli.outputs.records import parameters_text

    record = {
        "prompt": "a dog on the beach",
        "seed": 7,
        "preset": "kontext-dev",
        "params": {"num_inference_steps": 28, "guidance_scale": 2.5, "height": 1024, "width": 1024,
                   "true_cfg_scale": 3.0, "negative_prompt": "blurry", "reference_size": 1024},
        "pipeline": {"name": "kontext", "class": "KontextPipeline", "distilled_guidance": True},
        "model": {"pipeline": "black-forest-labs/FLUX.1-Kontext-dev", "pipeline_class": "kontext"},
    }  # fmt: skip
    text = parameters_text(record)
    assert text.splitlines()[1] == "Negative prompt: blurry"
    assert "CFG scale: 3.0, Distilled CFG Scale: 2.5, Seed: 7, Size: 1024x1024, Model: kontext-dev" in text
    assert "Pipeline: KontextPipeline, Model id: black-forest-labs/FLUX.1-Kontext-dev" in text


def test_a_manifest_can_switch_the_pipeline_of_a_recipe(project: Path, squeeze) -> None:
    # `recipe: tiny` is the squeeze pipeline with `family: internvl`; naming another pipeline drops the
    # recipe's source and family, so the manifest's own source is used.
    manifest = project / "m.yaml"
    text = manifest.read_text().split("\n", 2)[2]  # without `version` and `recipe`
    manifest.write_text("version: 1\nrecipe: tiny\nmodel: {pipeline_class: kontext, builtin: tiny}\n" + text)
    result = squeeze("validate", str(manifest))
    assert result.code == 0, result.err
    manifest.write_text("version: 1\nrecipe: tiny\nmodel: {pipeline_class: kontext}\n" + text)
    result = squeeze("validate", str(manifest))
    assert result.code == 2 and "no model source for `pipeline_class: kontext`" in result.err
