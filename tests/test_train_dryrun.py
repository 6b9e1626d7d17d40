"""`squeeze train --dry-run`: the paper's models on the meta device from the shipped configs, offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from squeeze_cli.train.config import load_config
from squeeze_cli.train.estimate import build_meta_models, estimate_memory, parameter_counts

pytestmark = pytest.mark.slow  # builds the 20 B-parameter models on the meta device: ~10 s


@pytest.fixture(scope="module")
def paper():
    loaded = load_config("paper")
    models = build_meta_models(loaded)
    return loaded, models, parameter_counts(models)


def test_paper_parameter_counts_match_the_fidelity_review(paper) -> None:
    _, models, counts = paper
    assert round(counts["transformer"] / 1e9, 1) == 11.9
    # InternVL3-8B is 7.94 B with its LM head (151,674 x 3,584 = 0.54 B), which squeeze does not load.
    assert round(counts["mllm"] / 1e9, 2) == 7.40
    assert round(counts["lora"] / 1e9, 2) == 0.84
    assert round(counts["aggregator"] / 1e6) == 78
    # Rank 512 on the 8 attention projections of 19 double blocks and 3 of 38 single blocks: 266 layers of
    # 3072 -> 3072, each 512 * (3072 + 3072) parameters.
    assert counts["lora"] == (19 * 8 + 38 * 3) * 512 * (3072 + 3072)
    assert next(models.transformer.parameters()).device.type == "meta"


def test_memory_estimate_is_consistent(paper) -> None:
    loaded, models, counts = paper
    memory = estimate_memory(loaded, models, counts)
    stage1, stage2 = memory["stages"]["stage1"], memory["stages"]["stage2"]
    # bf16 frozen weights (transformer + MLLM + VAE) and fp32 trained ones.
    frozen = counts["transformer"] + counts["mllm"] + counts["vae"]
    assert stage1["weights_gib"] * 1024**3 == pytest.approx(
        frozen * 2 + (counts["lora"] + counts["aggregator"]) * 4
    )
    assert stage1["optimizer_gib"] == pytest.approx(2 * stage1["gradients_gib"])
    # Reference tokens make stage 2's sequence longer; checkpointing keeps far fewer activations.
    assert stage2["sequence_tokens"] == stage1["sequence_tokens"] + 1024
    assert stage2["activations_gib"] > stage1["activations_gib"]
    for stage in (stage1, stage2):
        assert stage["activations_checkpointed_gib"] < stage["activations_gib"] / 4


def test_cli_dry_run_prints_counts_and_writes_nothing(squeeze, tmp_path: Path) -> None:
    result = squeeze("train", "paper", "--dry-run", "--set", f"output_dir={tmp_path / 'run'}")
    assert result.code == 0, result.err
    assert "transformer (frozen base)  11.90 B" in result.out
    assert "LoRA rank 512" in result.out and "0.84 B" in result.out
    assert "MLLM (frozen)              7.40 B" in result.out
    assert "aggregator (trained)       77.9 M" in result.out
    assert "stage2 (10000 steps" in result.out and "DDP buckets 3.4" in result.out
    assert "-> this config: 60.4 GiB" in result.out and "-> this config: 60.9 GiB" in result.out
    assert not (tmp_path / "run").exists()


def test_paper_plan_counts_ddp_buckets_autocast_copies_and_the_adamw_step(paper) -> None:
    # The fidelity review's D2: 59-61 GiB per GPU, not the 51-52 GiB of weights, gradients, moments and
    # activations alone.
    loaded, models, counts = paper
    trained = counts["lora"] + counts["aggregator"]
    for stage in estimate_memory(loaded, models, counts)["stages"].values():
        assert stage["ddp_buckets_gib"] == pytest.approx(stage["gradients_gib"]) == trained * 4 / 1024**3
        assert stage["autocast_cache_gib"] * 1024**3 == pytest.approx(trained * 2)  # bf16 copies
        assert stage["optimizer_step_gib"] * 1024**3 == pytest.approx(trained * 4)  # foreach sqrt
        static = (
            stage["weights_gib"] + stage["gradients_gib"] + stage["optimizer_gib"] + stage["ddp_buckets_gib"]
        )
        transient = stage["activations_checkpointed_gib"] + stage["autocast_cache_gib"]
        assert stage["total_checkpointed_gib"] == pytest.approx(
            static + max(transient, stage["optimizer_step_gib"])
        )
        assert 56 < stage["total_checkpointed_gib"] < 58
        assert 59 < stage["planned_checkpointed_gib"] < 61
    one_process = estimate_memory(loaded, models, counts, distributed=False)["stages"]["stage1"]
    assert one_process["ddp_buckets_gib"] == 0


def test_the_plan_matches_what_a_small_model_step_allocates_on_the_cpu(tmp_path, monkeypatch) -> None:
    """The plan's peak within 15 % of the bytes live tensors hold during real training steps of the
    `small` checkpoint (counted at every operator: deterministic), in both stages, float32."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_train_memory

    config = bench_train_memory.write_config(
        tmp_path, size=128, batch_size=2, mixed_precision="no", checkpointing=False
    )
    for stage, (measured, planned) in bench_train_memory.measure(config).items():
        assert abs(planned / measured - 1) < 0.15, (stage, measured, planned)


def test_the_memory_count_leaves_out_tracing_tensors_of_earlier_tests(monkeypatch) -> None:
    """torch.compile's fake tensors that an earlier test left alive hold no memory: the count at the start
    must not include them (CI once got a symbolic "measured" number from such a tensor's size)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_train_memory

    before = bench_train_memory.PeakMemory().start
    with FakeTensorMode():
        traced = torch.empty(1000, 1000)  # 4 MB it never holds
    assert traced.device.type == "cpu"
    assert bench_train_memory.PeakMemory().start == before
    del traced
