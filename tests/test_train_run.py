"""`squeeze train` end to end on the tiny model, on CPU: both stages, outputs `squeeze gen` uses as they are,
the null condition shared with the pipeline, exact resume after SIGKILL, and overfitting a few samples."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from support import poll_until

from squeeze_cli.train.config import load_config
from squeeze_cli.train.data import load_data
from squeeze_cli.train.loop import Trainer

TINY_DATA = Path(__file__).resolve().parents[1] / "squeeze_cli" / "train" / "presets" / "tiny-data"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, squeeze) -> Path:
    """The packaged `tiny` preset, trained once for the module."""
    out = tmp_path_factory.mktemp("train") / "run"
    result = squeeze("train", "tiny", "--no-progress", "--set", f"output_dir={out}")
    assert result.code == 0, result.err
    assert f"--recipe {out / 'recipe.yaml'}" in result.out
    return out


def test_tiny_two_stage_run_writes_everything(tiny_run: Path) -> None:
    for stage in ("stage1", "stage2"):
        assert (tiny_run / stage / "aggregator" / "config.json").is_file()
        assert (tiny_run / stage / "aggregator" / "diffusion_pytorch_model.safetensors").is_file()
        assert (tiny_run / stage / "aggregator" / "null_condition.json").is_file()
        assert (tiny_run / stage / "lora" / "pytorch_lora_weights.safetensors").is_file()
        assert (tiny_run / stage / "recipe.yaml").is_file()
    log = [json.loads(line) for line in (tiny_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 11))
    assert {r["stage"] for r in log[:6]} == {"stage1"} and {r["stage"] for r in log[6:]} == {"stage2"}
    assert all({"loss", "lr_aggregator", "lr_lora", "samples_per_s"} <= set(r) for r in log)
    # Each record holds the rates that step used: stage 2's aggregator rate starts at step 7.
    assert log[5]["lr_aggregator"] == 1e-3 and log[6]["lr_aggregator"] == 5e-4
    # Validation grids at the end of each stage; checkpoints pruned to `keep`.
    grids = sorted(p.name for p in (tiny_run / "validation").glob("*.png"))
    assert grids == ["step-0000006.png", "step-0000010.png"]
    assert Image.open(tiny_run / "validation" / "step-0000010.png").width > 0
    assert sorted(p.name for p in (tiny_run / "checkpoints").iterdir()) == ["step-0000005", "step-0000010"]
    summary = json.loads((tiny_run / "training.json").read_text())
    assert summary["stages"]["stage1"]["reference_tokens"] is False
    assert summary["stages"]["stage2"]["reference_tokens"] is True
    assert summary["stages"]["stage1"]["trains"] == ["aggregator", "lora"]
    assert "mllm" in summary["stages"]["stage1"]["frozen"] and "vae" in summary["stages"]["stage2"]["frozen"]


def test_stage_one_recipe_uses_the_mllm_condition_only(tiny_run: Path) -> None:
    from squeeze_cli.manifest.recipes import load_recipe

    stage1 = load_recipe(str(tiny_run / "stage1" / "recipe.yaml"))
    assert stage1.defaults.stage_thresholds == (0.0, 0.0)
    final = load_recipe(str(tiny_run / "recipe.yaml"))
    assert final.model.components["aggregator"].path == str(tiny_run / "stage2" / "aggregator")
    assert final.model.lora.path == str(tiny_run / "stage2" / "lora")


def test_rerun_into_a_finished_run_is_refused(tiny_run: Path, squeeze) -> None:
    result = squeeze("train", "tiny", "--set", f"output_dir={tiny_run}")
    assert result.code == 2
    assert "already holds a training run" in result.err and "--resume latest" in result.err


def _gen_pixels(squeeze, manifest: Path, out: Path, *args: str) -> dict[str, np.ndarray]:
    result = squeeze("gen", str(manifest), "--out", str(out), *args)
    assert result.code == 0, result.err
    images = sorted(out.glob("*/[0-9]*-s*.png"))
    assert images
    return {p.name: np.asarray(Image.open(p), dtype=np.int16) for p in images}


def test_trained_output_loads_into_gen_and_changes_its_images(
    tiny_run: Path, squeeze, write_file, tmp_path
) -> None:
    manifest = write_file(
        f"""
        version: 1
        recipe: tiny
        output: {{grids: false, contact_sheet: false}}
        defaults: {{seeds: [0]}}
        subjects:
          - name: red
            references: [{TINY_DATA / "red-0.png"}]
            prompts: [the red toy on a green table]
        """
    )
    trained = _gen_pixels(squeeze, manifest, tmp_path / "trained", "--recipe", str(tiny_run / "recipe.yaml"))
    no_lora = _gen_pixels(
        squeeze,
        manifest,
        tmp_path / "no-lora",
        "--recipe",
        str(tiny_run / "recipe.yaml"),
        "--set",
        "model.lora.scale=0",
    )
    base = _gen_pixels(squeeze, manifest, tmp_path / "base")
    assert trained.keys() == no_lora.keys() == base.keys()
    # The tiny transformer is random, so conditions move its pixels only a little; any change is the
    # trained weights at work (the same seed, prompt and references otherwise).
    for name in trained:
        assert np.abs(trained[name] - base[name]).mean() > 0  # the trained aggregator + LoRA
        assert np.abs(trained[name] - no_lora[name]).mean() > 0  # the trained LoRA alone


def test_dropped_condition_is_exactly_the_pipelines_null_condition(tmp_path: Path) -> None:
    loaded = load_config("tiny", [f"output_dir={tmp_path / 'run'}"])
    trainer = Trainer(loaded, load_data(loaded))
    trainer._setup()
    # What training feeds for a dropped MLLM condition, through the trained aggregator...
    with torch.no_grad():
        embeds, pooled = trainer.trainable.aggregator(trainer.null_encoding)
    # ...is what the pipeline uses in stage 3 with the same aggregator.
    null_embeds, null_pooled = trainer.pipe.encode_null_condition(dtype=torch.float32)
    assert torch.equal(embeds, null_embeds) and torch.equal(pooled, null_pooled)
    assert not any(p.requires_grad for p in trainer.pipe.mllm.parameters())
    assert not any(p.requires_grad for p in trainer.pipe.vae.parameters())
    base = [p for n, p in trainer.pipe.transformer.named_parameters() if "lora_" not in n]
    assert base and not any(p.requires_grad for p in base)
    assert not tmp_path.joinpath("run").exists()  # setting up writes nothing


RESUME_CONFIG = """
version: 1
recipe: tiny
output_dir: {out}
seed: 3
data: {{format: jsonl, path: {data}}}
aggregator: {{width: 32, num_heads: 2, num_blocks: 2}}
lora: {{rank: 8}}
stages:
  stage1: {{steps: 8, learning_rates: {{aggregator: 1.0e-3, lora: 1.0e-3}}, warmup_steps: 3}}
  stage2: {{steps: 8, train: [lora], learning_rates: {{lora: 1.0e-3}}}}
training:
  batch_size: 2
  gradient_accumulation_steps: 2
  mixed_precision: "no"
  buckets: [[64, 64]]
  reference_size: 64
  cache_latents: true
checkpointing: {{every: 2, keep: 2}}
logging: {{every: 1}}
"""


@pytest.fixture
def one_thread():
    """The runs in this process use one thread, like the killed one in its subprocess: bit-equal results
    need the same reduction order, whatever OMP_NUM_THREADS the suite was started with."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    weights = load_file(str(run / "stage2" / "lora" / "pytorch_lora_weights.safetensors"))
    aggregator = load_file(str(run / "stage2" / "aggregator" / "diffusion_pytorch_model.safetensors"))
    return {**{f"lora.{k}": v for k, v in weights.items()}, **{f"agg.{k}": v for k, v in aggregator.items()}}


# Imported by a run the test stops (PYTHONPATH): after its checkpoint at step SQUEEZE_TEST_GATE_STEP it
# waits for the test's signal, so the signal lands there however the machine's load delays the test.
CHECKPOINT_GATE_HOOK = """
import os, time
from squeeze_cli.train import loop

_save = loop.Trainer.save_checkpoint


def _save_then_wait(self):
    saved = _save(self)
    if self.state.step == int(os.environ["SQUEEZE_TEST_GATE_STEP"]):
        open(os.environ["SQUEEZE_TEST_GATE"], "w").close()
        time.sleep(600)  # the test signals the run here
    return saved


loop.Trainer.save_checkpoint = _save_then_wait
"""


@pytest.mark.slow
def test_run_killed_with_sigkill_and_resumed_ends_like_an_uninterrupted_run(
    tmp_path: Path, squeeze, one_thread
) -> None:
    data = TINY_DATA / "samples.jsonl"
    straight = tmp_path / "straight.yaml"
    straight.write_text(RESUME_CONFIG.format(out=tmp_path / "straight", data=data))
    assert squeeze("train", str(straight), "--no-progress").code == 0

    killed = tmp_path / "killed.yaml"
    killed.write_text(RESUME_CONFIG.format(out=tmp_path / "killed", data=data))
    hook, gate = tmp_path / "hook", tmp_path / "at-step-6"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(CHECKPOINT_GATE_HOOK)
    process = subprocess.Popen(
        [sys.executable, "-m", "squeeze_cli", "train", str(killed), "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(hook)}
        | {"SQUEEZE_TEST_GATE": str(gate), "SQUEEZE_TEST_GATE_STEP": "6"},
    )
    checkpoint = tmp_path / "killed" / "checkpoints" / "step-0000006"
    poll_until(lambda: gate.exists() or process.poll() is not None)  # the run waits at the gate until killed
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoint.is_dir(), "the run ended before its step-6 checkpoint"
    assert not (tmp_path / "killed" / "stage2").exists(), "the run finished before it could be killed"

    # A save cut short leaves a `.partial-` folder: never resumed from, cleaned up on resume.
    (tmp_path / "killed" / "checkpoints" / ".partial-step-0000099").mkdir()
    result = squeeze("train", str(killed), "--resume", "latest", "--no-progress")
    assert not list((tmp_path / "killed").rglob(".partial-*"))
    assert result.code == 0, result.err
    expected, resumed = _final_weights(tmp_path / "straight"), _final_weights(tmp_path / "killed")
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name
    # The log is the uninterrupted run's: no step twice.
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, 17))
    # Latents are cached by sample id, one file per (sample, bucket, reference size).
    assert len(list((tmp_path / "killed" / "cache" / "latents").glob("*.safetensors"))) == 4


OVERFIT_CONFIG = """
version: 1
recipe: tiny
output_dir: {out}
data: {{format: jsonl, path: {data}}}
aggregator: {{width: 32, num_heads: 2, num_blocks: 2}}
lora:
  rank: 32
  targets: [to_q, to_k, to_v, to_out.0, add_q_proj, add_k_proj, add_v_proj, to_add_out, x_embedder, proj_out,
            proj_mlp, ff.net.0.proj, ff.net.2]
stages:
  stage1: {{steps: 40, learning_rates: {{aggregator: 3.0e-2, lora: 3.0e-2}}}}
  stage2: {{steps: 0}}
training:
  batch_size: 4
  mixed_precision: "no"
  buckets: [[64, 64]]
  reference_size: 64
  timesteps: {{logit_mean: 1.0, logit_std: 0.5}}
  dropout: {{text: 0.0, references: 0.0, both: 0.0}}
checkpointing: {{every: 1000}}
logging: {{every: 1}}
"""


@pytest.mark.slow
def test_four_samples_are_overfit(tmp_path: Path, squeeze) -> None:
    config = tmp_path / "overfit.yaml"
    config.write_text(OVERFIT_CONFIG.format(out=tmp_path / "run", data=TINY_DATA / "samples.jsonl"))
    assert squeeze("train", str(config), "--no-progress").code == 0
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 <= 0.5 * losses[0], losses


@pytest.mark.slow
def test_two_processes_train_with_ddp(tmp_path: Path) -> None:
    """Two CPU processes under torchrun (gloo): each draws its own batches, DDP averages the gradients, and
    a stage that freezes the aggregator leaves it exactly as stage 1 ended it."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "squeeze_cli",
        "train",
        "tiny",
        "--no-progress",
        "--set",
        f"output_dir={out}",
        "--set",
        "stages.stage1.steps=3",
        "--set",
        "stages.stage2.steps=2",
        "--set",
        "stages.stage2.train=[lora]",
        "--set",
        "stages.stage2.learning_rates={lora: 1.0e-3}",
        "--set",
        "validation.prompts=[]",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("trained: ") == 1  # reported by the main process only
    assert json.loads((out / "training.json").read_text())["processes"] == 2
    stage1 = load_file(str(out / "stage1" / "aggregator" / "diffusion_pytorch_model.safetensors"))
    stage2 = load_file(str(out / "stage2" / "aggregator" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(stage1[name], stage2[name]) for name in stage1)
    lora1 = load_file(str(out / "stage1" / "lora" / "pytorch_lora_weights.safetensors"))
    lora2 = load_file(str(out / "stage2" / "lora" / "pytorch_lora_weights.safetensors"))
    assert any(not torch.equal(lora1[name], lora2[name]) for name in lora1)


@pytest.mark.slow
def test_a_refused_launch_ends_every_process_with_the_refusals_code(tmp_path: Path) -> None:
    """`accelerate launch` on CPU ran each process as a lone main process (both took the lock, both said
    the refusal); with one main process, the others waited at a barrier for it until torchrun ended them
    by SIGTERM. Now the main process says the refusal once and every process exits 2 (the launcher still
    exits 1 with its summary of the failed processes)."""
    from test_runner import assert_refused_once_by_every_process, two_processes

    from squeeze_cli.train.checkpoints import RunLock

    out = tmp_path / "run"
    command = two_processes(
        "train", "tiny", "--no-progress", "--set", f"output_dir={out}", "--set", "validation.prompts=[]"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    other = RunLock(out)
    other.acquire()  # a run on that folder, still training
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    finally:
        other.release()
    assert_refused_once_by_every_process(result, "is in use by another squeeze train")


def test_instruction_too_long_for_the_mllm_is_refused_before_anything_is_written(
    squeeze, tmp_path: Path, make_image
) -> None:
    make_image("ref.png")
    make_image("target.png")
    lines = [
        {"references": ["ref.png"], "instruction": "a toy", "target": "target.png"},
        {"references": ["ref.png"], "instruction": "a toy " * 400, "target": "target.png"},
    ]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    config = tmp_path / "train.yaml"
    config.write_text(
        "version: 1\nrecipe: tiny\noutput_dir: out\ndata: {format: jsonl, path: data.jsonl}\n"
        "aggregator: {width: 32, num_heads: 2}\nstages: {stage1: {steps: 1}, stage2: {steps: 1}}\n"
        "training: {mixed_precision: 'no', buckets: [[64, 64]], reference_size: 64}\n"
    )
    result = squeeze("train", str(config))
    assert result.code == 2
    assert f"{tmp_path / 'data.jsonl'}:2: instruction: The instruction is" in result.err
    assert ":1:" not in result.err
    assert not (tmp_path / "out").exists()


def test_lora_can_take_the_single_blocks_proj_out(tmp_path: Path) -> None:
    loaded = load_config("tiny", [f"output_dir={tmp_path / 'run'}", "lora.single_blocks_proj_out=true"])
    trainer = Trainer(loaded, load_data(loaded))
    trainer._setup()
    transformer = trainer.pipe.transformer
    adapted = {
        n.removesuffix(".lora_A.default")
        for n, _ in transformer.named_modules()
        if n.endswith("lora_A.default")
    }
    single = {
        f"single_transformer_blocks.{i}.proj_out" for i in range(len(transformer.single_transformer_blocks))
    }
    assert single <= adapted
    assert "proj_out" not in adapted  # the transformer's own output projection stays as it is
    assert all(
        n.endswith(("to_q", "to_k", "to_v", "to_out.0", "_proj", "to_add_out")) for n in adapted - single
    )


def test_lora_alpha_travels_with_the_weights(squeeze, tmp_path: Path) -> None:
    """gen must scale the LoRA as training did: rank and alpha are stored in the LoRA file's metadata."""
    from squeeze_cli.loading import load_pipeline
    from squeeze_cli.manifest.recipes import load_recipe

    out = tmp_path / "run"
    overrides = ["lora.alpha=16", "stages.stage1.steps=1", "stages.stage2.steps=0", "validation.prompts=[]"]
    args = [arg for override in [f"output_dir={out}", *overrides] for arg in ("--set", override)]
    assert squeeze("train", "tiny", "--no-progress", *args).code == 0
    # Kept separate (not fused, as gen does by default) to read the scale it was loaded with.
    pipe = load_pipeline(load_recipe(str(out / "recipe.yaml")).model, fuse_lora=False)
    assert pipe.transformer.transformer_blocks[0].attn.to_q.scaling == {"squeeze": 16 / 8}


def test_configs_that_do_not_fit_the_models_are_located_and_write_nothing(squeeze, tmp_path: Path) -> None:
    out = f"output_dir={tmp_path / 'run'}"
    bad_targets = squeeze("train", "tiny", "--dry-run", "--set", out, "--set", "lora.targets=[to_qq]")
    assert bad_targets.code == 2
    assert "lora.targets: Target modules {'to_qq'} not found" in bad_targets.err
    bad_layers = squeeze("train", "tiny", "--set", out, "--set", "aggregator.layers=[0, 7]")
    assert bad_layers.code == 2
    assert "aggregator: `layers` [7] out of range for 3 hidden states" in bad_layers.err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_ctrl_c_stops_with_exit_130_and_says_how_to_resume(tmp_path: Path) -> None:
    config = tmp_path / "train.yaml"
    config.write_text(RESUME_CONFIG.format(out=tmp_path / "run", data=TINY_DATA / "samples.jsonl"))
    hook, gate = tmp_path / "hook", tmp_path / "at-step-2"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(CHECKPOINT_GATE_HOOK)
    process = subprocess.Popen(
        [sys.executable, "-m", "squeeze_cli", "train", str(config), "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(hook)}
        | {"SQUEEZE_TEST_GATE": str(gate), "SQUEEZE_TEST_GATE_STEP": "2"},
        # As a script's background job gets it: SIGINT ignored. Ctrl-C must stop training all the same.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    poll_until(lambda: gate.exists() or process.poll() is not None)  # the run waits there for the signal
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130, err[-2000:]
    assert "error: stopped by SIGINT at step" in err
    assert "continue with `--resume latest`, from step-" in err
    assert not (tmp_path / "run" / "stage2").exists()
