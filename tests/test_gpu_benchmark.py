"""benchmarks/gpu.py and its run kit (benchmarks/gpu/): every shipped recipe's full-size networks build (on
the meta device: no memory) with their published parameter counts, and the launcher runs every recipe's
tiny twin end to end on the CPU with `--small`, writing every case to its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from squeeze_cli.manifest.recipes import list_recipes

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"

# Published sizes, in billions of parameters, of each network as the recipe's pipeline loads it.
FLUX1 = {"transformer": 11.90, "vae": 0.084}  # FLUX.1-dev and FLUX.1 Kontext [dev]: the same 11.9B
QWEN_IMAGE_EDIT = {"transformer": 20.43, "vae": 0.127, "text_encoder": 8.29}  # Qwen2.5-VL-7B: 8.29B
SIZES = {
    # InternVL3-8B and Qwen2.5-VL-7B without their LM heads (squeeze loads the base models); the DLA.
    "paper-internvl3-flux": {**FLUX1, "mllm": 7.40, "aggregator": 0.078},
    "qwen2.5vl-flux": {**FLUX1, "mllm": 7.75, "aggregator": 0.078},
    "kontext-dev": {**FLUX1, "text_encoder": 0.123, "text_encoder_2": 4.76},  # CLIP-L, T5-XXL encoder
    "qwen-image-edit-plus": QWEN_IMAGE_EDIT,
    "qwen-image-edit-2511": QWEN_IMAGE_EDIT,
    # Black Forest Labs: [klein] 4B (Qwen3-4B), [klein] 9B (Qwen3-8B), [dev] 32B (Mistral Small 3.1 24B).
    "flux2-klein-4b": {"transformer": 3.88, "vae": 0.084, "text_encoder": 4.02},
    "flux2-klein-9b-kv": {"transformer": 9.08, "vae": 0.084, "text_encoder": 8.19},
    "flux2-dev": {"transformer": 32.22, "vae": 0.084, "text_encoder": 24.01},
}


@pytest.fixture(scope="module")
def gpu():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import gpu

        yield gpu
    finally:
        sys.path.remove(str(BENCHMARKS))


def shipped_recipes() -> list[str]:
    return [r.name for r in list_recipes() if r.model.builtin is None]


def test_every_shipped_recipe_has_full_size_configs(gpu) -> None:
    assert sorted(gpu.CONFIGS["recipes"]) == sorted(shipped_recipes()) == sorted(SIZES)
    # --quick runs one recipe per transformer: the others share theirs with one it runs, or (2509) differ
    # from 2511's only by its zero_cond_t switch.
    quick = gpu.CONFIGS["quick_recipes"]
    transformers = {gpu.CONFIGS["recipes"][name]["models"]["transformer"] for name in quick}
    for name, entry in gpu.CONFIGS["recipes"].items():
        config = gpu.CONFIGS["models"][entry["models"]["transformer"]]["config"]
        assert (
            name in quick
            or entry["models"]["transformer"] in transformers
            or any(
                {k: v for k, v in gpu.CONFIGS["models"][t]["config"].items() if k != "zero_cond_t"} == config
                for t in transformers
            )
        ), name


@pytest.mark.parametrize("recipe", sorted(SIZES))
def test_full_size_networks_have_the_real_sizes(gpu, recipe: str) -> None:
    models = gpu.build_models(recipe, "meta", torch.bfloat16)
    billions = {part: gpu.parameter_count(model) / 1e9 for part, model in models.items()}
    real = {part: count / 1e9 for part, count in gpu.stand_in_parameter_counts(recipe).items()}
    assert {**billions, **real} == pytest.approx(SIZES[recipe], rel=0.01)
    for part, stand_in in gpu.CONFIGS["recipes"][recipe].get("stand_in", {}).items():
        # A stand-in is shallower, never narrower: the transformer sees the real condition's shape.
        config = models[part].config.get_text_config()
        assert config.num_hidden_layers == stand_in["layers"] and billions[part] < real[part]


@pytest.mark.slow
def test_squeeze_pipeline_at_full_size_reads_a_reference_as_the_real_model(gpu) -> None:
    # The real 448-px InternVL processor and image_seq_length over the tiny tokenizer: 256 tokens a
    # reference, every hidden layer into the aggregator, and its condition is the transformer's width.
    pipe, _ = gpu.build_pipeline("paper-internvl3-flux", "meta", torch.bfloat16, small=False)
    encoder = pipe.mllm_encoder
    shape = (encoder.adapter.tokens_per_tile, encoder.num_hidden_states, encoder.hidden_size)
    assert shape == (256, 29, 3584)
    for recipe in ("paper-internvl3-flux", "qwen2.5vl-flux"):
        models = gpu.build_models(recipe, "meta", torch.bfloat16)
        text = models["mllm"].config.get_text_config()
        aggregator = models["aggregator"].config
        assert aggregator.num_hidden_states == text.num_hidden_layers + 1
        assert aggregator.mllm_hidden_size == text.hidden_size
        assert aggregator.joint_attention_dim == models["transformer"].config.joint_attention_dim


def test_projection_adds_each_missing_step_at_its_stages_median(gpu) -> None:
    # One stage: 4 steps ran in 1.0 s (0.2 s each), 28 planned: 24 more steps.
    seconds, per_image = gpu.project([(1.0, [0.2] * 4)], [0] * 4, [0] * 28, batch=1)
    assert seconds == {0: 0.2} and per_image == pytest.approx([1.0 + 24 * 0.2])
    # The stage plan: 1 / 1 / 4 steps ran, 3 / 4 / 21 planned; two calls of batch 2, medians over both.
    ran = [1, 2, 3, 3, 3, 3]
    calls = [(2.0, [0.1, 0.3, 0.2, 0.2, 0.2, 0.2]), (3.0, [0.1, 0.5, 0.2, 0.2, 0.2, 0.4])]
    planned = [1] * 3 + [2] * 4 + [3] * 21
    seconds, per_image = gpu.project(calls, ran, planned, batch=2)
    assert seconds == pytest.approx({1: 0.1, 2: 0.4, 3: 0.2})
    extra = 2 * 0.1 + 3 * 0.4 + 17 * 0.2
    assert per_image == pytest.approx([(2.0 + extra) / 2, (3.0 + extra) / 2])
    with pytest.raises(ValueError, match="stages \\[2\\] do not run"):
        gpu.project(calls, [1, 3, 3, 3, 3, 3], planned, batch=1)


def test_case_plan(gpu) -> None:
    assert gpu.case_plan(True, [512, 1024], [2, 4]) == [
        (512, "on", 1),
        (512, "off", 1),
        (512, "on", 2),
        (512, "on", 4),
        (1024, "on", 1),
        (1024, "off", 1),
        (1024, "on", 2),
    ]
    assert gpu.case_plan(False, [512], [2]) == [(512, None, 1), (512, None, 2)]


@pytest.mark.slow
def test_launcher_runs_every_recipe_small_on_the_cpu(tmp_path: Path) -> None:
    recipes = shipped_recipes()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "SQUEEZE_GPU_KIT_INSTALLED": "1",  # the rest of the launcher: what a GPU machine runs after pip
        "PYTHON": sys.executable,
        "OUT": str(tmp_path),
    }
    command = ["bash", str(BENCHMARKS / "gpu" / "run.sh"), "--small", "--sizes", "32", "--recipes", *recipes]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "s/image" in result.stdout and "MFU" in result.stdout
    report = json.loads((tmp_path / "gpu_results.json").read_text())
    assert report["environment"]["quick"] and report["environment"]["peak_tflops"] > 0
    by_recipe: dict[str, list[dict]] = {}
    for case in report["cases"]:
        assert "error" not in case and "skipped" not in case, case
        by_recipe.setdefault(case["recipe"], []).append(case)
    assert sorted(by_recipe) == sorted(recipes) == sorted(report["models"])
    for name, cases in by_recipe.items():
        staged = name in ("paper-internvl3-flux", "qwen2.5vl-flux")
        expected = [("on", 1), ("off", 1), ("on", 2)] if staged else [(None, 1), (None, 2)]
        assert [(c["stage_plan"], c["batch"]) for c in cases] == expected, name
        for case in cases:
            assert case["transformer_tflops_per_image"] > 0
            assert case["mfu"] > 0 and case["transformer_mfu"] > 0
            # --quick runs fewer steps than the recipe and projects to its steps, never below what ran.
            assert case["steps_run"] == min(case["steps"], 6 if staged else 4)
            assert case["seconds_per_image"]["median"] >= case["measured_seconds_per_image"]["median"]
        if staged:
            # Stage 1 leaves the reference tokens out: the plan saves transformer FLOPs.
            assert cases[0]["transformer_tflops_per_image"] < cases[1]["transformer_tflops_per_image"]
            assert cases[0]["stages_run"] and set(cases[0]["stages_run"]) == {1, 2, 3}
