"""Every input error is found before the model loads: weight folders that are missing and hub ids absent
from the offline cache (by `validate` and by `gen`), a folder that is not a checkpoint, a device or
offload mode this machine lacks; and a model's small parts load before its large ones."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from support import ONE_IMAGE

from squeeze_cli.model_checks import device_problem


@pytest.fixture
def project(make_project) -> Path:
    return make_project(m=ONE_IMAGE)


def test_validate_with_the_paper_recipe_names_the_missing_weight_folders(project: Path, squeeze) -> None:
    result = squeeze("validate", str(project / "m.yaml"), "--recipe", "paper-internvl3-flux")
    assert result.code == 2, result.out
    errors = result.err.splitlines()
    aggregator = f"no such folder: {project / 'weights' / 'aggregator'}"
    assert any("model.components.aggregator.path: " + aggregator in line for line in errors), errors
    assert any(f"model.lora.path: no such folder: {project / 'weights' / 'lora'}" in line for line in errors)
    assert any("--set model.lora.path=DIR" in line for line in errors)
    # Offline, hub ids that are not in the cache are reported too, with how to get them.
    # One line per absent repo, although the MLLM, its tokenizer and its image processor all name it.
    assert sum("OpenGVLab/InternVL3-8B-hf is not in the Hugging Face cache" in line for line in errors) == 1
    assert any("hf download black-forest-labs/FLUX.1-dev" in line for line in errors)


def test_gen_reports_missing_weights_without_loading(project: Path, squeeze, monkeypatch) -> None:
    import squeeze_cli.loading

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(squeeze_cli.loading, "load_pipeline", no_loading)
    result = squeeze(
        "gen",
        str(project / "m.yaml"),
        "--set",
        f"model={{pipeline: {project / 'nowhere'}}}",
        "--out",
        str(project / "out"),
    )
    assert result.code == 2 and f"model.pipeline: no such folder: {project / 'nowhere'}" in result.err
    assert not (project / "out").exists()


def test_a_local_folder_that_is_not_a_checkpoint_is_refused(project: Path, squeeze, monkeypatch) -> None:
    (project / "empty").mkdir()
    monkeypatch.chdir(project)  # `--set` paths start from the current folder
    result = squeeze("validate", str(project / "m.yaml"), "--set", "model={pipeline: ./empty}")
    assert result.code == 2 and "has no model_index.json: not a saved checkpoint" in result.err


def test_hub_ids_in_the_offline_cache_pass(tmp_path: Path, monkeypatch) -> None:
    """A hub id whose snapshot is in the Hugging Face cache is fine offline; a missing subfolder is not."""
    import huggingface_hub.constants

    from squeeze_cli import model_checks
    from squeeze_cli.manifest.schema import ModelSpec
    from squeeze_cli.model_checks import source_problems

    cache = tmp_path / "hub"
    repo = cache / "models--org--flux"
    snapshot = repo / "snapshots" / ("a" * 40)
    (snapshot / "transformer").mkdir(parents=True)
    (snapshot / "transformer" / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def spec(**components) -> ModelSpec:
        base = {"mllm": {"path": "org/flux", "subfolder": "transformer"}}
        for name in ("aggregator", "vae", "scheduler"):
            base[name] = {"path": "org/flux", "subfolder": "transformer"}
        return ModelSpec(components={**base, **components}, dtype="float32")

    problems = source_problems(spec(transformer={"path": "org/flux", "subfolder": "transformer"}))
    assert [p.field for p in problems] == ["model.components.scheduler.path"]  # no scheduler_config.json
    missing = source_problems(spec(transformer={"path": "org/flux", "subfolder": "vae2"}))
    assert "org/flux/vae2 in the Hugging Face cache has no config.json" in [p.message for p in missing]
    absent = source_problems(spec(transformer={"path": "org/other"}))
    assert "org/other is not in the Hugging Face cache" in [p.message for p in absent]
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # online: from_pretrained may download, nothing to check
    monkeypatch.setattr(model_checks, "hub_unreachable", lambda: None)  # the hub answers
    assert source_problems(spec(transformer={"path": "org/other"})) == []
    # No network (the hub does not answer): the model must be in the cache after all.
    monkeypatch.setattr(model_checks, "hub_unreachable", lambda: "https://huggingface.co: timed out")
    unreachable = [p.message for p in source_problems(spec(transformer={"path": "org/other"}))]
    assert unreachable == [
        "org/flux/transformer in the Hugging Face cache has no scheduler_config.json and the hub is offline "
        "(https://huggingface.co: timed out)",
        "org/other is not in the Hugging Face cache and the hub is offline "
        "(https://huggingface.co: timed out)",
    ]


def test_a_cached_hub_id_loads_from_the_cache_at_once_when_the_hub_does_not_answer(monkeypatch) -> None:
    """Without HF_HUB_OFFLINE and without network, from_pretrained would ask the hub about a cached model
    first (retries for ~40 s): once one quick probe fails, every hub request of the process is refused at
    once (huggingface_hub's offline mode) and the libraries fall back to the cache."""
    import huggingface_hub
    import huggingface_hub.constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    from squeeze_cli import model_checks
    from squeeze_cli.manifest.schema import ModelSpec

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    local = ModelSpec(pipeline="/models/kontext", dtype="float32")
    hub = ModelSpec(pipeline="org/kontext", dtype="float32")
    monkeypatch.setattr(model_checks, "hub_unreachable", lambda: None)  # the hub answers
    assert model_checks.read_cache_only_if_hub_unreachable(hub) is None
    monkeypatch.setattr(model_checks, "hub_unreachable", lambda: "https://huggingface.co: timed out")
    assert model_checks.read_cache_only_if_hub_unreachable(local) is None  # no hub id: nothing to ask
    assert not huggingface_hub.constants.HF_HUB_OFFLINE
    note = model_checks.read_cache_only_if_hub_unreachable(hub)
    assert note == (
        "the hub does not answer (https://huggingface.co: timed out): loading from the local Hugging Face "
        "cache only"
    )
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(OfflineModeIsEnabled):  # no request leaves the process
        huggingface_hub.model_info("org/kontext")


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
def test_a_device_that_is_not_here_is_exit_2_before_loading(
    project: Path, squeeze, monkeypatch, flags, message
) -> None:
    import torch

    import squeeze_cli.loading

    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("this machine has a GPU")

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(squeeze_cli.loading, "load_pipeline", no_loading)
    result = squeeze("gen", str(project / "m.yaml"), "--out", str(project / "out"), *flags)
    assert result.code == 2 and result.err.startswith(message), result.err
    assert len(result.err.splitlines()) == 1 and "loading" not in result.err
    assert not (project / "out").exists()


def test_device_problem_accepts_what_exists() -> None:
    assert device_problem("cpu", "none") is None and device_problem("auto", "none") is None


def test_validate_checks_the_device_and_offload_mode_gen_would_use(project: Path, squeeze) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = squeeze("validate", str(project / "m.yaml"), "--device", "cuda")
    assert result.code == 2 and result.err.startswith("error: --device cuda: no CUDA GPU is visible")
    as_json = json.loads(squeeze("validate", str(project / "m.yaml"), "--offload", "model", "--json").out)
    assert as_json["ok"] is False and "--offload model needs a CUDA GPU" in as_json["problems"][0]["message"]
    assert squeeze("validate", str(project / "m.yaml"), "--device", "cpu").code == 0


def test_validate_takes_gens_dtype_flag(project: Path, squeeze) -> None:
    """`gen --dtype` changes the model's identity, so every job id: validate had no such flag."""

    def plan(*flags: str) -> dict:
        result = squeeze("validate", str(project / "m.yaml"), "--json", *flags)
        assert result.code == 0, result.err
        return json.loads(result.out)

    flagged, default = plan("--dtype", "bfloat16"), plan()
    assert flagged["dtype"] == "bfloat16" and flagged["model_identity"] != default["model_identity"]
    assert flagged["model_identity"] == plan("--set", "model.dtype=bfloat16")["model_identity"]
    assert squeeze("validate", str(project / "m.yaml"), "--dtype", "fp8").code == 2


def test_small_local_parts_load_before_the_large_ones(monkeypatch) -> None:
    import squeeze_cli.loading as loading
    from squeeze_cli.manifest.schema import ModelSpec

    tiny = loading.ensure_tiny_checkpoint("internvl")
    parts = ("mllm", "transformer", "vae", "scheduler", "aggregator", "tokenizer", "image_processor")
    spec = ModelSpec(
        components={name: {"path": str(tiny), "subfolder": name} for name in parts}, dtype="float32"
    )
    order = []
    real = loading.load_component

    def recording(name, *args, **kwargs):
        order.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(loading, "load_component", recording)
    loading.load_pipeline(spec)
    assert order == ["aggregator", "scheduler", "tokenizer", "image_processor", "vae", "mllm", "transformer"]


def _cut_short(file: Path) -> None:
    os.truncate(file, file.stat().st_size - 100)  # the header whole, the last tensor's bytes not


def _split_transformer(folder: Path) -> Path:
    """The transformer's weights as two shards and their index, as large checkpoints are saved; returns
    the index."""
    from safetensors.torch import load_file, save_file

    whole = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(whole)
    whole.unlink()
    names = sorted(tensors)
    weight_map = {}
    for number, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :]), 1):
        shard = f"diffusion_pytorch_model-0000{number}-of-00002.safetensors"
        save_file({name: tensors[name] for name in part}, folder / "transformer" / shard)
        weight_map.update(dict.fromkeys(part, shard))
    index = folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def _damage(folder: Path, kind: str) -> tuple[str, Path]:
    """Damage the checkpoint copy in `folder` as an interrupted download or copy would; returns the `--set`
    that points the run at the damaged weights, and the file the error must name."""
    pipeline = f"model={{pipeline: {folder}}}"
    if kind == "empty":
        file = folder / "transformer" / "diffusion_pytorch_model.safetensors"
        file.write_bytes(b"")
    elif kind == "cut-short":
        file = folder / "mllm" / "model.safetensors"
        _cut_short(file)
    elif kind == "fifo":
        file = folder / "vae" / "diffusion_pytorch_model.safetensors"
        file.unlink()
        os.mkfifo(file)
    elif kind == "missing-shard":
        _split_transformer(folder)
        file = folder / "transformer" / "diffusion_pytorch_model-00002-of-00002.safetensors"
        file.unlink()
    elif kind == "index-not-json":
        file = _split_transformer(folder)
        file.write_text("{not json")
    else:  # a LoRA file cut short
        file = folder.parent / "lora.safetensors"
        file.write_bytes((folder / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()[:-100])
        return f"model={{pipeline: {folder}, lora: {{path: {file}}}}}", file
    return pipeline, file


@pytest.mark.parametrize(
    "kind", ["empty", "cut-short", "fifo", "missing-shard", "index-not-json", "lora-cut-short"]
)
def test_damaged_weights_are_one_error_naming_the_file_before_loading(
    project: Path, squeeze, monkeypatch, kind: str
) -> None:
    import shutil

    import squeeze_cli.loading

    copy = project / "checkpoint"
    shutil.copytree(squeeze_cli.loading.ensure_tiny_checkpoint("internvl"), copy)
    override, damaged = _damage(copy, kind)
    result = squeeze("validate", str(project / "m.yaml"), "--set", override)
    assert result.code == 2, result.err
    [error] = [line for line in result.err.splitlines() if "error:" in line]
    assert str(damaged) in error and "copy or download the weights again" in error, error

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(squeeze_cli.loading, "load_pipeline", no_loading)
    result = squeeze("gen", str(project / "m.yaml"), "--set", override, "--out", str(project / "out"))
    assert result.code == 2 and str(damaged) in result.err, result.err
    assert not (project / "out").exists()


def test_a_model_path_that_is_a_symlink_loop_is_one_error(project: Path, squeeze) -> None:
    (project / "a").symlink_to(project / "b")
    (project / "b").symlink_to(project / "a")
    result = squeeze("validate", str(project / "m.yaml"), "--set", f"model={{pipeline: {project / 'a'}}}")
    assert result.code == 2, result.err  # not pathlib's "Symlink loop" traceback
    assert f"model.pipeline: {project / 'a'} is a link to nothing (broken, or a loop)" in result.err


def test_a_checkpoint_without_a_component_folder_is_refused_unless_loaded_apart(
    project: Path, squeeze
) -> None:
    import shutil

    import squeeze_cli.loading

    tiny = squeeze_cli.loading.ensure_tiny_checkpoint("internvl")
    copy = shutil.copytree(tiny, project / "checkpoint", ignore=shutil.ignore_patterns("vae"))
    result = squeeze("validate", str(project / "m.yaml"), "--set", f"model={{pipeline: {copy}}}")
    assert result.code == 2, result.err  # `gen` said: no file named config.json in {copy}, after loading
    assert f"{copy} has no vae/ folder, which its model_index.json names" in result.err
    # A component the manifest loads from elsewhere need not be in the folder.
    apart = f"model={{pipeline: {copy}, components: {{vae: {{path: {tiny / 'vae'}}}}}}}"
    assert squeeze("validate", str(project / "m.yaml"), "--set", apart).code == 0
    # Another pipeline's checkpoint: the squeeze pipeline loads its MLLM and aggregator from the folder.
    kontext = squeeze_cli.loading.ensure_tiny_checkpoint("", "kontext")
    result = squeeze("validate", str(project / "m.yaml"), "--set", f"model={{pipeline: {kontext}}}")
    assert result.code == 2, result.err  # `gen` said, after loading: Unrecognized model in {kontext}
    assert f"{kontext} has no aggregator/ folder, which the squeeze pipeline loads" in result.err
    assert "`model.pipeline_class`" in result.err
    (copy / "model_index.json").write_text('{"_class_name": "SqueezePipeline",')
    result = squeeze("validate", str(project / "m.yaml"), "--set", f"model={{pipeline: {copy}}}")
    assert result.code == 2 and "model_index.json is damaged: not a JSON object" in result.err
