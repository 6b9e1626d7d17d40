"""Issue 10 as a new user meets it: input errors before any model loads, metadata that tells the truth,
JSON on stdout for scripts, and the terminal output of a run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from squeeze_cli.model_checks import device_problem

TINY = """\
version: 1
recipe: tiny
defaults:
  height: 32
  width: 32
  num_inference_steps: 2
  reference_size: 32
subjects:
  - name: dog
    class: dog
    references: [images/dog/00.jpg]
    prompts: ["a {class} in the snow"]
"""


@pytest.fixture
def project(make_project) -> Path:
    return make_project(m=TINY)


# 10.2: every input error before any model loads -----------------------------------------------------------


def test_validate_with_the_paper_recipe_names_the_missing_weight_folders(project: Path, squeeze) -> None:
    result = squeeze("validate", str(project / "m.yaml"), "--recipe", "paper-internvl3-flux")
    assert result.code == 2, result.out
    errors = result.err.splitlines()
    aggregator = f"no such folder: {project / 'weights' / 'aggregator'}"
    assert any("model.components.aggregator.path: " + aggregator in line for line in errors), errors
    assert any(f"model.lora.path: no such folder: {project / 'weights' / 'lora'}" in line for line in errors)
    assert any("--set model.lora.path=DIR" in line for line in errors)
    # Offline, hub ids that are not in the cache are reported too, with how to get them.
    assert any("OpenGVLab/InternVL3-8B-hf is not in the Hugging Face cache" in line for line in errors)
    assert any("hf download black-forest-labs/FLUX.1-dev" in line for line in errors)


def test_gen_reports_missing_weights_without_loading(project: Path, squeeze, monkeypatch) -> None:
    import squeeze_cli.loading

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(squeeze_cli.loading, "load_pipeline", no_loading)
    result = squeeze(
        "gen", str(project / "m.yaml"), "--set", f"model={{pipeline: {project / 'nowhere'}}}",
        "--out", str(project / "out"),
    )
    assert result.code == 2 and f"model.pipeline: no such folder: {project / 'nowhere'}" in result.err
    assert not (project / "out").exists()


def test_a_local_folder_that_is_not_a_checkpoint_is_refused(project: Path, squeeze) -> None:
    (project / "empty").mkdir()
    result = squeeze("validate", str(project / "m.yaml"), "--set", "model={pipeline: ./empty}")
    assert result.code == 2 and "has no model_index.json: not a saved checkpoint" in result.err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--device", "cuda"], "error: --device cuda: no CUDA GPU is visible on this machine"),
        (["--device", "mps"], "error: --device mps: Apple's MPS is not available here"),
        (["--device", "tpu"], "error: --device tpu:"),
        (["--offload", "model", "--device", "cpu"], "error: --offload model moves weights to a GPU"),
        (["--offload", "model"], "error: --offload model needs a CUDA GPU and none is visible"),
    ],
)
def test_a_device_that_is_not_here_is_exit_2_before_loading(project: Path, squeeze, flags, message) -> None:
    import torch

    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("this machine has a GPU")
    result = squeeze("gen", str(project / "m.yaml"), "--out", str(project / "out"), *flags)
    assert result.code == 2 and result.err.startswith(message), result.err
    assert len(result.err.splitlines()) == 1 and "loading" not in result.err
    assert not (project / "out").exists()


def test_device_problem_accepts_what_exists() -> None:
    assert device_problem("cpu", "none") is None and device_problem("auto", "none") is None


# 10.3: metadata that tells the truth ---------------------------------------------------------------------


def test_a_negative_prompt_without_true_cfg_is_a_warning_and_left_out_of_the_png(
    project: Path, squeeze
) -> None:
    manifest = project / "m.yaml"
    manifest.write_text(TINY.replace("  reference_size: 32\n", "  reference_size: 32\n  negative_prompt: blurry\n"))
    result = squeeze("validate", str(manifest))
    assert result.code == 0
    assert result.err.startswith(f"warning: {manifest}:8:20: defaults.negative_prompt: is ignored")
    assert "(hint: set `true_cfg_scale: 4.0`" in result.err
    as_json = json.loads(squeeze("validate", str(manifest), "--json").out)
    assert as_json["warnings"][0]["field"] == "defaults.negative_prompt"

    assert squeeze("gen", str(manifest), "--out", str(project / "out")).code == 0
    from squeeze_cli.outputs import read_png_parameters

    (png,) = (project / "out").glob("dog/[0-9]*-s*.png")
    parameters = read_png_parameters(png)
    assert "Negative prompt" not in parameters
    assert "CFG scale: 1, Distilled CFG Scale: 2.5," in parameters
    sidecar = json.loads(png.with_suffix(".json").read_text())
    assert sidecar["timings"]["batch_size"] == 1 and isinstance(sidecar["timings"]["batch_size"], int)


# 10.4: JSON everywhere, the summary on stdout --------------------------------------------------------------


def test_gen_json_prints_the_problems_of_an_invalid_manifest(project: Path, squeeze) -> None:
    manifest = project / "m.yaml"
    manifest.write_text(TINY.replace("height: 32", "height: 30"))
    result = squeeze("gen", str(manifest), "--json")
    assert result.code == 2
    document = json.loads(result.out)
    assert document["ok"] is False and document["problems"][0]["field"] == "defaults.height"
    assert document == json.loads(squeeze("validate", str(manifest), "--json").out)
    manifest.write_text(TINY)
    bad_flag = json.loads(squeeze("gen", str(manifest), "--json", "--shard", "3/2").out)
    assert bad_flag["ok"] is False and "--shard 3/2" in bad_flag["problems"][0]["message"]


def test_the_text_summary_of_gen_goes_to_stdout(project: Path, squeeze) -> None:
    result = squeeze("gen", str(project / "m.yaml"), "--out", str(project / "out"))
    assert result.code == 0
    assert result.out.startswith("completed: 1 generated, 0 already done, 0 failed")
    assert "completed:" not in result.err
    # 10.7: the plan comes before the progress.
    assert result.err.splitlines()[0] == f"1 jobs, 0 already done, 1 to generate → {project / 'out'}"
