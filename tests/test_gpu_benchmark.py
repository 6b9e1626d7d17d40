"""benchmarks/gpu.py: the full-size configs build (on the meta device: no memory), and `--small` runs end
to end on the CPU and writes its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
def test_full_size_architectures_have_the_real_sizes(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu

    pipe = gpu.build_full_size("meta", torch.bfloat16)
    billions = {
        name: sum(p.numel() for p in getattr(pipe, name).parameters()) / 1e9
        for name in ("mllm", "transformer")
    }
    assert 11.8 < billions["transformer"] < 12.0  # FLUX.1-dev: 11.9 B
    assert 7.35 < billions["mllm"] < 7.45  # InternVL3-8B without its LM head, as squeeze loads it: 7.40 B
    encoder = pipe.mllm_encoder
    shape = (encoder.adapter.tokens_per_tile, encoder.num_hidden_states, encoder.hidden_size)
    assert shape == (256, 29, 3584)
    assert pipe.aggregator.config.joint_attention_dim == pipe.transformer.config.joint_attention_dim


@pytest.mark.slow
def test_small_run_writes_every_case(tmp_path: Path) -> None:
    command = [
        sys.executable,
        str(BENCHMARKS / "gpu.py"),
        "--small",
        "--out",
        str(tmp_path),
        "--sizes",
        "32",
        "--batches",
        "2",
        "--steps",
        "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_results.json").read_text())
    cases = report["cases"]
    assert [(c["stage_plan"], c["batch"]) for c in cases] == [("on", 1), ("off", 1), ("on", 2)]
    for case in cases:
        assert case["transformer_tflops_per_image"] > 0 and case["lower_bound_seconds"] > 0
        assert case["x_limit"] == pytest.approx(
            case["seconds_per_image"]["median"] / case["lower_bound_seconds"], rel=0.05
        )
    # Stage 1 leaves the reference tokens out: the plan saves transformer FLOPs.
    assert cases[0]["transformer_tflops_per_image"] < cases[1]["transformer_tflops_per_image"]
    assert report["environment"]["matmul_tflops"] > 0 and report["best_batch"]
