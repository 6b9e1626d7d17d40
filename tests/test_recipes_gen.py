"""`squeeze gen` end to end with the tiny FLUX.1 Kontext and Qwen-Image-Edit recipes: a two-subject manifest,
resume, batch size, two processes, metadata read by an A1111 reader, keys the pipeline ignores refused."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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
NUM_JOBS = 6
RECIPES = {"tiny-kontext": "KontextPipeline", "tiny-qwen-image-edit": "QwenImageEditPlusPipeline"}


@pytest.fixture(params=sorted(RECIPES))
def recipe(request) -> str:
    return request.param


@pytest.fixture
def project(tmp_path: Path, recipe: str) -> Path:
    shutil.copytree(EXAMPLE_IMAGES, tmp_path / "images")
    (tmp_path / "m.yaml").write_text(MANIFEST.format(recipe=recipe))
    return tmp_path


@pytest.fixture
def gen(squeeze):
    def run(*args: str, expect: int = 0) -> str:
        result = squeeze("gen", *args)
        assert result.code == expect, (result.code, result.out[-3000:], result.err[-3000:])
        run.stderr = result.err
        return result.out

    return run


def images_of(out: Path) -> dict[str, np.ndarray]:
    return {
        str(p.relative_to(out)): np.asarray(Image.open(p).convert("RGB"), dtype=np.int16)
        for p in sorted(out.glob("*/[0-9]*-s*.png"))
    }


def assert_same_images(first: dict[str, np.ndarray], second: dict[str, np.ndarray]) -> None:
    assert first.keys() == second.keys() and len(first) == NUM_JOBS
    for name in first:
        assert np.abs(first[name] - second[name]).max() <= 1, name


def test_gen_writes_every_image_with_the_pipeline_in_its_metadata(project: Path, gen, recipe) -> None:
    from sd_parsers import ParserManager

    out = project / "out"
    gen(str(project / "m.yaml"), "--out", str(out))
    assert len(images_of(out)) == NUM_JOBS
    assert (out / "dog" / "grid-000.png").is_file() and (out / "backpack" / "contact-sheet.png").is_file()
    record = json.loads((out / "dog" / "000-s0.json").read_text())
    assert record["pipeline"]["class"] == RECIPES[recipe] and record["preset"] == recipe
    assert record["model"]["pipeline_class"] == record["pipeline"]["name"]
    assert len(record["references"]) == 2 and record["stage_plan"] is None
    # The params recorded are the ones the pipeline read: no stage thresholds, no MLLM switch.
    assert "stage_thresholds" not in record["params"] and "keep_mllm_condition" not in record["params"]

    info = ParserManager().parse(out / "dog" / "000-s0.png")
    sampler = info.samplers[0]
    assert info.generator.name == "AUTOMATIC1111" and sampler.parameters["seed"] == "0"
    assert info.metadata["Pipeline"] == RECIPES[recipe]
    if recipe == "tiny-kontext":
        # FLUX's distilled guidance is not CFG: Forge's name for it, and CFG scale 1 (no real CFG).
        assert sampler.parameters["cfg_scale"] == "1" and info.metadata["Distilled CFG Scale"] == "2.5"
    else:
        assert sampler.parameters["cfg_scale"] == "4.0" and "Distilled CFG Scale" not in info.metadata


def test_resume_regenerates_only_what_is_missing(project: Path, gen) -> None:
    out = project / "out"
    gen(str(project / "m.yaml"), "--out", str(out))
    first = images_of(out)
    gen(str(project / "m.yaml"), "--out", str(out))
    assert json.loads((out / "run.json").read_text())["jobs"]["skipped"] == NUM_JOBS
    (out / "dog" / "001-s1.png").unlink()
    (out / "dog" / "001-s1.json").unlink()
    gen(str(project / "m.yaml"), "--out", str(out))
    summary = json.loads((out / "run.json").read_text())
    assert summary["jobs"]["succeeded"] == 1 and summary["jobs"]["skipped"] == NUM_JOBS - 1
    assert_same_images(first, images_of(out))


def test_images_do_not_depend_on_batch_size(project: Path, gen) -> None:
    gen(str(project / "m.yaml"), "--out", str(project / "one"), "--batch-size", "1")
    gen(str(project / "m.yaml"), "--out", str(project / "four"), "--batch-size", "4")
    assert_same_images(images_of(project / "one"), images_of(project / "four"))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("stage_thresholds", "[0.9, 0.8]"),
        ("keep_mllm_condition", "true"),
        ("step_cache", "{method: first_block, threshold: 0.1}"),
    ],
)
def test_a_key_the_pipeline_ignores_is_refused_at_validation(
    project: Path, squeeze, recipe, key, value
) -> None:
    manifest = project / "m.yaml"
    manifest.write_text(
        MANIFEST.format(recipe=recipe).replace("  seeds: [0, 1]", f"  seeds: [0, 1]\n  {key}: {value}")
    )
    result = squeeze("validate", str(manifest))
    assert result.code == 2
    name = "kontext" if recipe == "tiny-kontext" else "qwen-image-edit-plus"
    message = f"defaults.{key}: `{key}` is not used by the {name} pipeline (recipe {recipe})"
    assert result.err.startswith(f"error: {manifest}:9:") and message in result.err


def test_guidance_scale_is_refused_for_qwen_image_edit(project: Path, squeeze, recipe) -> None:
    result = squeeze("validate", str(project / "m.yaml"), "--set", "subjects.1.guidance_scale=3")
    if recipe == "tiny-kontext":
        assert result.code == 0, result.err
    else:
        assert (
            result.code == 2
            and "`guidance_scale` is not used by the qwen-image-edit-plus pipeline" in result.err
        )


def test_a_prompt_too_long_is_refused_before_writing(project: Path, gen) -> None:
    manifest = project / "m.yaml"
    manifest.write_text(
        manifest.read_text().replace("a {class} on a table", "a {class} " + "on a table " * 80)
    )
    out = project / "out"
    gen(str(manifest), "--out", str(out), expect=2)
    assert f"{manifest}:20:9: subjects[1].prompts[0]: " in gen.stderr and "reads; shorten it" in gen.stderr
    assert not out.exists()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(project: Path, gen, plan_of) -> None:
    gen(str(project / "m.yaml"), "--out", str(project / "one"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
        "--dynamo_backend", "no", "-m", "squeeze_cli", "gen", str(project / "m.yaml"),
        "--out", str(project / "two"), "--json",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((project / "two" / "run.json").read_text())
    assert summary["processes"] == 2 and summary["jobs"]["succeeded"] == NUM_JOBS
    ranks = {json.loads(p.read_text())["process"] for p in (project / "two").glob("*/[0-9]*-s*.json")}
    assert ranks == {0, 1}
    assert_same_images(images_of(project / "one"), images_of(project / "two"))
    # The processes shared the views out: together they drew every one, from the images on disk.
    from squeeze_cli import outputs

    jobs = plan_of(project / "m.yaml")
    assert outputs.plan_views(project / "two", jobs, outputs.find_finished(project / "two", jobs)) == []
    prompts = {(job.subject, job.prompt_index) for job in jobs}
    assert len(list((project / "two").glob("*/grid-*.png"))) == len(prompts)


def test_the_resolved_manifest_replans_the_same_jobs(project: Path, gen, squeeze) -> None:
    from squeeze_cli.manifest import load_manifest
    from squeeze_cli.plan import plan_jobs

    out = project / "out"
    gen(str(project / "m.yaml"), "--out", str(out))
    resolved = out / "manifest.resolved.yaml"
    assert "stage_thresholds" not in resolved.read_text()
    assert squeeze("validate", str(resolved)).code == 0

    def job_ids(path: Path) -> list[str]:
        manifest = load_manifest(path)
        jobs = plan_jobs(manifest, model_identity=manifest.model_identity, max_jobs=100)
        return [job.job_id for job in jobs]

    assert job_ids(resolved) == job_ids(project / "m.yaml")


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
