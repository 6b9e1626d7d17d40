"""Loading a pipeline from a recipe's model section: builtin, a full folder, parts, LoRA, and refusals."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from squeeze_cli.errors import ModelLoadError, UsageError
from squeeze_cli.loading import ensure_tiny_checkpoint, load_pipeline
from squeeze_cli.manifest.schema import ModelSpec
from squeeze_cli.pipelines.tiny import build_tiny_pipeline

PARTS = ("mllm", "tokenizer", "image_processor", "aggregator", "transformer", "vae", "scheduler")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipe")


def generate(pipe) -> np.ndarray:
    reference = Image.new("RGB", (40, 32), (180, 90, 30))
    return pipe(
        "a toy on a table",
        reference,
        height=32,
        width=32,
        num_inference_steps=2,
        reference_size=32,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images


def test_builtin_tiny_is_built_once_into_the_cache() -> None:
    first = ensure_tiny_checkpoint("internvl")
    stamp = (first / "model_index.json").stat().st_mtime_ns
    assert ensure_tiny_checkpoint("internvl") == first
    assert (first / "model_index.json").stat().st_mtime_ns == stamp
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # no staging folder left
    pipe = load_pipeline(ModelSpec(builtin="tiny", dtype="float32"))
    assert generate(pipe).shape == (1, 32, 32, 3)


def test_a_pipeline_assembled_from_parts_equals_the_folder(tiny_dir: Path) -> None:
    whole = load_pipeline(ModelSpec(pipeline=str(tiny_dir), dtype="float32"))
    parts = {
        name: {"path": str(tiny_dir), "subfolder": name}
        for name in PARTS
        if name not in ("tokenizer", "image_processor")
    }
    # Without `tokenizer` / `image_processor`, they come from the MLLM's source.
    parts["mllm"] = {"path": str(tiny_dir / "mllm")}
    for name in ("tokenizer", "image_processor"):
        target = tiny_dir / "mllm"
        for file in (tiny_dir / name).iterdir():
            if not (target / file.name).exists():
                (target / file.name).write_bytes(file.read_bytes())
    assembled = load_pipeline(ModelSpec(components=parts, dtype="float32"))
    np.testing.assert_allclose(generate(whole), generate(assembled), atol=1e-5)


def test_image_processors_load_with_the_pil_backend_not_the_deprecated_use_fast(
    tiny_dir: Path, monkeypatch
) -> None:
    """transformers 5 deprecates `use_fast` (and warns on every load): the PIL backend is asked by name."""
    from transformers import AutoImageProcessor

    calls: list[dict] = []
    from_pretrained = AutoImageProcessor.from_pretrained

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return from_pretrained(*args, **kwargs)

    monkeypatch.setattr(AutoImageProcessor, "from_pretrained", recording)
    parts = {name: {"path": str(tiny_dir), "subfolder": name} for name in PARTS}
    load_pipeline(ModelSpec(components=parts, dtype="float32"))
    assert calls and all(call.get("backend") == "pil" and "use_fast" not in call for call in calls)


def test_pickle_weights_are_refused_unless_allowed(tiny_dir: Path, tmp_path: Path) -> None:
    from squeeze_cli.pipelines.aggregator import DualLayerAggregator

    pickled = tmp_path / "aggregator"
    DualLayerAggregator.from_pretrained(tiny_dir / "aggregator").save_pretrained(
        pickled, safe_serialization=False
    )
    assert (pickled / "diffusion_pytorch_model.bin").is_file()
    spec = ModelSpec(
        pipeline=str(tiny_dir), components={"aggregator": {"path": str(pickled)}}, dtype="float32"
    )
    with pytest.raises(ModelLoadError) as refused:
        load_pipeline(spec)
    assert "aggregator" in refused.value.message and "--allow-pickle" in refused.value.hint
    assert load_pipeline(spec, allow_pickle=True) is not None


def test_a_model_missing_offline_names_it_and_how_to_get_it() -> None:
    spec = ModelSpec(pipeline="no-such-org/no-such-model", dtype="float32")
    with pytest.raises(ModelLoadError) as missing:
        load_pipeline(spec)
    assert "no-such-org/no-such-model" in missing.value.message
    assert "hf download no-such-org/no-such-model" in missing.value.hint
    assert "\n" not in missing.value.one_line()


def test_lora_from_the_spec_changes_the_output(tiny_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model_state_dict

    from squeeze_cli.pipelines.squeeze import SqueezePipeline

    base = load_pipeline(ModelSpec(pipeline=str(tiny_dir), dtype="float32"))
    expected = generate(base)
    base.transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    )
    SqueezePipeline.save_lora_weights(
        tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(base.transformer)
    )
    spec = ModelSpec(pipeline=str(tiny_dir), lora={"path": str(tmp_path / "lora")}, dtype="float32")
    with_lora = generate(load_pipeline(spec))
    assert np.abs(with_lora - expected).max() > 1e-3


def test_a_lora_of_another_model_size_is_one_error(tiny_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model_state_dict

    from squeeze_cli.pipelines.squeeze import SqueezePipeline

    base = load_pipeline(ModelSpec(pipeline=str(tiny_dir), dtype="float32"))
    base.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q"]))
    # The same layers twice as wide: a LoRA trained on a larger model of the same family.
    wider = {
        name: torch.zeros(2 * weight.shape[0], weight.shape[1])
        if "lora_B" in name
        else torch.zeros(weight.shape[0], 2 * weight.shape[1])
        for name, weight in get_peft_model_state_dict(base.transformer).items()
    }
    SqueezePipeline.save_lora_weights(tmp_path / "lora", transformer_lora_layers=wider)
    spec = ModelSpec(pipeline=str(tiny_dir), lora={"path": str(tmp_path / "lora")}, dtype="float32")
    with pytest.raises(ModelLoadError) as refused:  # not torch's RuntimeError and its traceback
        load_pipeline(spec)
    assert "size mismatch" in refused.value.message and "does not fit" in refused.value.hint


@pytest.mark.parametrize("damage", ["empty", "missing"])
def test_damaged_weights_met_while_loading_are_one_error(tiny_dir: Path, tmp_path: Path, damage: str) -> None:
    """What the checks before loading find (a hub snapshot is not checked file by file) still ends as one
    error when loading meets it, not also diffusers' log line of it, and a missing weights file is not
    taken for refused pickle weights."""
    import shutil

    copy = shutil.copytree(tiny_dir, tmp_path / "pipe")
    weights = (
        copy / "mllm" / "model.safetensors"
        if damage == "empty"
        else copy / "vae" / "diffusion_pytorch_model.safetensors"
    )
    if damage == "empty":
        weights.write_bytes(b"")
    else:
        weights.unlink()
    logged = []  # what diffusers prints on stderr (through its own handler, out of pytest's reach)
    handler = logging.Handler(logging.ERROR)
    handler.emit = logged.append  # type: ignore[method-assign]
    logging.getLogger("diffusers.models.modeling_utils").addHandler(handler)
    try:
        with pytest.raises(ModelLoadError) as refused:  # not safetensors' SafetensorError and its traceback
            load_pipeline(ModelSpec(pipeline=str(copy), dtype="float32"))
    finally:
        logging.getLogger("diffusers.models.modeling_utils").removeHandler(handler)
    assert "copy or download the weights again" in refused.value.hint
    assert "--allow-pickle" not in refused.value.hint
    assert logged == []


def test_offload_needs_a_gpu(tiny_dir: Path) -> None:
    with pytest.raises(UsageError, match="--offload model"):
        load_pipeline(ModelSpec(pipeline=str(tiny_dir), dtype="float32"), device="cpu", offload="model")


def test_a_missing_local_folder_says_which_setting_to_fix(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as missing:
        load_pipeline(ModelSpec(pipeline=str(tmp_path / "nope"), dtype="float32"))
    assert f"no such folder: {tmp_path / 'nope'}" in missing.value.message
    assert "--set model.pipeline=DIR" in missing.value.hint


def test_trust_remote_code_is_off_unless_the_preset_asks_and_then_warns(tiny_dir: Path, capsys) -> None:
    load_pipeline(ModelSpec(pipeline=str(tiny_dir), dtype="float32"))
    assert "trust_remote_code" not in capsys.readouterr().err
    load_pipeline(ModelSpec(pipeline=str(tiny_dir), dtype="float32", trust_remote_code=True))
    assert "warning: the preset sets trust_remote_code" in capsys.readouterr().err


def test_a_family_that_is_not_the_checkpoints_is_an_error(tiny_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="model.family is 'qwen2_5_vl' but the MLLM .* is 'internvl'"):
        load_pipeline(ModelSpec(pipeline=str(tiny_dir), family="qwen2_5_vl", dtype="float32"))
    assert load_pipeline(ModelSpec(pipeline=str(tiny_dir), family="internvl", dtype="float32")) is not None


def test_a_fused_lora_gives_the_unfused_output(tiny_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model_state_dict

    from squeeze_cli.pipelines.squeeze import SqueezePipeline

    base = load_pipeline(ModelSpec(pipeline=str(tiny_dir), dtype="float32"))
    base.transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    )
    SqueezePipeline.save_lora_weights(
        tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(base.transformer)
    )
    spec = ModelSpec(
        pipeline=str(tiny_dir), lora={"path": str(tmp_path / "lora"), "scale": 0.5}, dtype="float32"
    )
    unfused = load_pipeline(spec, fuse_lora=False)
    fused = load_pipeline(spec)
    assert fused.lora_fused and not unfused.lora_fused
    assert not any("lora" in name for name, _ in fused.transformer.named_parameters())
    assert any("lora" in name for name, _ in unfused.transformer.named_parameters())
    unfused_image, fused_image = generate(unfused), generate(fused)
    np.testing.assert_allclose(fused_image, unfused_image, atol=1e-4)
    # The unload after fusing kept the merged weights: the LoRA still changes the output.
    plain = generate(load_pipeline(ModelSpec(pipeline=str(tiny_dir), dtype="float32")))
    assert np.abs(fused_image - plain).max() > 1e-3


@pytest.mark.parametrize("family", ["internvl", "qwen2_5_vl"])
def test_the_mllm_is_loaded_without_its_lm_head(family: str, tmp_path: Path) -> None:
    from squeeze_cli.pipelines.squeeze import SqueezePipeline

    folder = build_tiny_pipeline(tmp_path / "pipe", family=family)
    pipe = load_pipeline(ModelSpec(pipeline=str(folder), dtype="float32"))
    assert not hasattr(pipe.mllm, "lm_head")  # the base model: its hidden states are all squeeze reads
    assert type(pipe.mllm).__name__ in ("InternVLModel", "Qwen2_5_VLModel")
    # The same images as the folder's own class (with the head) gives.
    with_head = SqueezePipeline.from_pretrained(folder, dtype=torch.float32)
    assert hasattr(with_head.mllm, "lm_head")
    np.testing.assert_array_equal(generate(pipe), generate(with_head))


def test_a_tiny_checkpoint_without_its_weights_never_enters_the_cache(tmp_path: Path, monkeypatch) -> None:
    from transformers import PreTrainedModel

    # As on rank 1 of a distributed run: transformers' save_pretrained then writes no weights.
    monkeypatch.setattr(PreTrainedModel, "should_save_on_this_rank", lambda self, is_main_process: False)
    monkeypatch.setenv("SQUEEZE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelLoadError) as incomplete:
        ensure_tiny_checkpoint("internvl")
    assert "lacks weights (mllm)" in incomplete.value.message
    assert list((tmp_path / "cache").iterdir()) == []  # neither the broken folder nor its staging copy


def test_a_cache_that_cannot_be_written_is_one_error(tmp_path: Path, monkeypatch) -> None:
    # A file where the cache folder goes (as root, a read-only folder is writable: the same OSError path).
    (tmp_path / "cache").write_text("not a folder")
    monkeypatch.setenv("SQUEEZE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelLoadError) as refused:  # not FileExistsError's traceback
        ensure_tiny_checkpoint("internvl")
    assert str(tmp_path / "cache") in refused.value.message and "SQUEEZE_CACHE" in refused.value.hint


def test_an_aggregator_trained_for_another_mllm_is_one_error_at_loading(
    tiny_dir: Path, tmp_path: Path
) -> None:
    from squeeze_cli.pipelines.aggregator import DualLayerAggregator

    # A DLA for a wider MLLM and transformer: it loads, and every job would fail on a shape mismatch.
    config = {
        key: value
        for key, value in DualLayerAggregator.load_config(tiny_dir / "aggregator").items()
        if not key.startswith("_")
    }
    config.update(mllm_hidden_size=2 * config["mllm_hidden_size"])
    DualLayerAggregator(**config).save_pretrained(tmp_path / "dla")
    spec = ModelSpec(
        pipeline=str(tiny_dir), components={"aggregator": {"path": str(tmp_path / "dla")}}, dtype="float32"
    )
    with pytest.raises(ModelLoadError) as refused:
        load_pipeline(spec)
    assert str(tmp_path / "dla") in refused.value.message and "mllm_hidden_size" in refused.value.message
    assert "squeeze train" in refused.value.hint


def test_weights_of_another_size_than_their_config_are_one_error(tiny_dir: Path, tmp_path: Path) -> None:
    import json
    import shutil

    copy = shutil.copytree(tiny_dir, tmp_path / "pipe")
    # config.json of a larger model beside the smaller one's weights: transformers raises RuntimeError.
    config = json.loads((copy / "mllm" / "config.json").read_text())
    config["text_config"]["intermediate_size"] *= 2
    (copy / "mllm" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as refused:
        load_pipeline(ModelSpec(pipeline=str(copy), dtype="float32"))
    assert str(copy) in refused.value.message and "other sizes than its config.json" in refused.value.message
    assert "take both from the same checkpoint" in refused.value.hint
