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


# 10.2: every input error before any model loads ---------------------------------------------------------


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


# 10.3: metadata that tells the truth --------------------------------------------------------------------


def test_a_negative_prompt_without_true_cfg_is_a_warning_and_left_out_of_the_png(
    project: Path, squeeze
) -> None:
    manifest = project / "m.yaml"
    manifest.write_text(
        TINY.replace("  reference_size: 32\n", "  reference_size: 32\n  negative_prompt: blurry\n")
    )
    result = squeeze("validate", str(manifest))
    assert result.code == 0
    assert result.err.startswith(f"warning: {manifest}:8:20: defaults.negative_prompt: is ignored")
    assert "(hint: set `true_cfg_scale: 4.0`" in result.err
    as_json = json.loads(squeeze("validate", str(manifest), "--json").out)
    assert as_json["warnings"][0]["field"] == "defaults.negative_prompt"

    assert squeeze("gen", str(manifest), "--out", str(project / "out")).code == 0
    from squeeze_cli.outputs.records import read_png_parameters

    (png,) = (project / "out").glob("dog/[0-9]*-s*.png")
    parameters = read_png_parameters(png)
    assert "Negative prompt" not in parameters
    assert "CFG scale: 1, Distilled CFG Scale: 2.5," in parameters
    sidecar = json.loads(png.with_suffix(".json").read_text())
    assert sidecar["timings"]["batch_size"] == 1 and isinstance(sidecar["timings"]["batch_size"], int)


# 10.4: JSON everywhere, the summary on stdout -----------------------------------------------------------


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
    assert result.err.splitlines()[0] == f"1 job, 0 already done, 1 to generate → {project / 'out'}"


# 10.6: sharding that keeps a prompt together ------------------------------------------------------------


def test_a_prompt_s_seeds_stay_in_one_shard_when_the_balance_allows() -> None:
    from squeeze_cli.plan import shard_boundaries

    # One subject, three prompts of four seeds: the fair cut (6) is inside prompt 1; 4 and 8 start prompts.
    prompts = [0] * 4 + [1] * 4 + [2] * 4
    assert shard_boundaries([1.0] * 12, [0] * 12, 2) == [0, 6, 12]  # without prompts: split mid-prompt
    assert shard_boundaries([1.0] * 12, [0] * 12, 2, prompts=prompts) == [0, 4, 12]
    # One prompt of eight seeds over four shards: keeping it whole would leave three shards idle.
    assert shard_boundaries([1.0] * 8, [0] * 8, 4, prompts=[0] * 8) == [0, 2, 4, 6, 8]


def test_shard_jobs_keeps_prompts_whole(make_project) -> None:
    from squeeze_cli.manifest import load_manifest
    from squeeze_cli.plan import plan_jobs, shard_jobs

    project = make_project(
        m=TINY.replace(
            'prompts: ["a {class} in the snow"]',
            'prompts: ["a {class} in the snow", "a {class} at sea", "a {class} in a car"]',
        ).replace("  reference_size: 32\n", "  reference_size: 32\n  seeds: [0, 1, 2, 3]\n")
    )
    loaded = load_manifest(project / "m.yaml")
    jobs = plan_jobs(loaded, model_identity=loaded.model_identity, max_jobs=100)
    shards = [shard_jobs(jobs, index, 2) for index in range(2)]
    assert [job for shard in shards for job in shard] == jobs
    prompts_of = [{job.prompt_index for job in shard} for shard in shards]
    assert prompts_of[0].isdisjoint(prompts_of[1])


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}, (2, 4)),
        ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"}, (2, 4)),
        (
            {
                "SLURM_ARRAY_TASK_ID": "4",
                "SLURM_ARRAY_TASK_COUNT": "3",
                "SLURM_ARRAY_TASK_MIN": "0",
                "SLURM_ARRAY_TASK_STEP": "2",
            },
            (2, 3),
        ),
    ],
)
def test_shard_slurm_reads_the_job_array(monkeypatch, env, expected) -> None:
    from squeeze_cli.cli.gen import _parse_shard

    for name in (
        "SLURM_ARRAY_TASK_ID",
        "SLURM_ARRAY_TASK_COUNT",
        "SLURM_ARRAY_TASK_MIN",
        "SLURM_ARRAY_TASK_STEP",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert _parse_shard("slurm") == expected


def test_shard_slurm_outside_a_job_array_is_a_usage_error(project: Path, squeeze, monkeypatch) -> None:
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"):
        monkeypatch.delenv(name, raising=False)
    result = squeeze("gen", str(project / "m.yaml"), "--shard", "slurm", "--out", str(project / "out"))
    assert result.code == 2
    assert result.err.startswith(
        "error: --shard slurm: SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT are not set"
    )


def test_a_shard_s_resolved_manifest_says_which_shard(project: Path, squeeze) -> None:
    assert squeeze("gen", str(project / "m.yaml"), "--out", str(project / "out"), "--shard", "1/2").code == 0
    text = (project / "out" / "shards" / "1-of-2" / "manifest.resolved.yaml").read_text()
    assert "# This is shard 1/2 (--shard 1/2)" in text
    # Still a manifest that plans the whole run.
    assert (
        squeeze("validate", str(project / "out" / "shards" / "1-of-2" / "manifest.resolved.yaml")).code == 0
    )


# 10.7: the terminal -------------------------------------------------------------------------------------


def _job(subject: str = "dog"):
    from squeeze_cli.params import SamplingParams
    from squeeze_cli.plan import Job

    return Job(0, "0" * 16, subject, 0, None, 0, "p", 0, SamplingParams(), (), 1.0)


def _summary(status: str, succeeded: int, failed: int = 0) -> dict:
    return {
        "status": status,
        "jobs": {"planned": succeeded + failed, "skipped": 0, "succeeded": succeeded, "failed": failed},
        "timings": {"total": 1.0},
        "out": "/o",
        "command": ["squeeze", "gen", "my manifest.yaml", "--out", "/o"],
    }


def test_the_bar_shows_the_subject_and_failures_and_the_stop_message_does_not_overwrite_it(capsys) -> None:
    import io

    from squeeze_cli.gen.progress import Reporter

    stream = io.StringIO()
    reporter = Reporter("tty", stream=stream)
    reporter.run_started(3, skipped=1, processes=1, out="/o")
    assert stream.getvalue().startswith("4 jobs, 1 already done, 3 to generate → /o\n")
    reporter.batch_started([_job("backpack")], 2)
    reporter.job_failed(_job("backpack"), "boom")
    reporter.batch_finished()
    assert "subject=backpack" in stream.getvalue()  # drawn when the batch starts
    assert reporter._bar.postfix == "subject=backpack, failed=1"  # drawn at the bar's next refresh
    before = len(stream.getvalue())
    reporter.interrupted("SIGINT")
    written = stream.getvalue()[before:]
    # tqdm.write clears the bar's line first and draws the bar again below the message.
    assert "\r" in written.split("SIGINT: stopping after the current batch")[0]
    reporter.run_finished(_summary("interrupted", 1, 1))
    assert capsys.readouterr().out.startswith("interrupted: 1 generated")
    assert (
        "to resume, run the same command again: squeeze gen 'my manifest.yaml' --out /o" in stream.getvalue()
    )


def test_a_multi_process_run_ends_with_the_run_s_progress_line(capsys) -> None:
    import io

    from squeeze_cli.gen.progress import Reporter

    stream = io.StringIO()
    reporter = Reporter("plain", stream=stream)
    reporter.run_started(6, skipped=0, processes=2)
    for _ in range(3):  # the main process's half
        reporter.job_finished(_job(), "dog/x.png", 0.1)
    reporter.run_finished(_summary("completed", 6))
    progress = [line for line in stream.getvalue().splitlines() if line.startswith("[")]
    assert progress[-1].startswith("[6/6] 0 failed")
    assert capsys.readouterr().out.startswith("completed: 6 generated")


# 10.8: manifest help ------------------------------------------------------------------------------------


def test_names_from_other_tools_get_the_right_key(project: Path, squeeze) -> None:
    manifest = project / "m.yaml"
    manifest.write_text(TINY.replace("  num_inference_steps: 2\n", "  steps: 2\n  cfg_scale: 3\n  seed: 4\n"))
    result = squeeze("validate", str(manifest))
    assert result.code == 2
    assert "defaults.steps: unknown key `steps` (hint: squeeze calls it `num_inference_steps`)" in result.err
    assert (
        "defaults.cfg_scale: unknown key `cfg_scale` (hint: FLUX's distilled guidance is `guidance_scale`"
        in result.err
    )
    assert "defaults.seed: unknown key `seed` (hint: squeeze takes a list: `seeds: [42]`" in result.err


def test_an_unquoted_placeholder_in_a_flow_list_gets_a_hint_to_quote(project: Path, squeeze) -> None:
    manifest = project / "m.yaml"
    manifest.write_text(
        TINY.replace('prompts: ["a {class} in the snow"]', "prompts: [a {class} in the snow]")
    )
    result = squeeze("validate", str(manifest))
    assert result.code == 2 and "(hint: inside [...] a `{` starts a mapping: quote each prompt" in result.err


def test_no_relative_path_hint_for_an_absolute_path(project: Path, squeeze) -> None:
    manifest = project / "m.yaml"
    manifest.write_text(TINY.replace("images/dog/00.jpg", str(project / "missing.jpg")))
    result = squeeze("validate", str(manifest))
    assert result.code == 2 and "no such file" in result.err and "relative to" not in result.err
    manifest.write_text(TINY.replace("images/dog/00.jpg", "missing.jpg"))
    assert "paths are relative to the manifest's folder" in squeeze("validate", str(manifest)).err


def test_x_keys_hold_anchors_for_reuse(make_project, squeeze) -> None:
    project = make_project(
        m="""\
version: 1
recipe: tiny
x-prompts: &prompts
  - a {class} in the snow
  - a {class} on the beach
subjects:
  - {name: dog, class: dog, references: [images/dog/00.jpg], prompts: *prompts}
  - {name: backpack, class: backpack, references: [images/backpack/00.jpg], prompts: *prompts}
"""
    )
    summary = json.loads(squeeze("validate", str(project / "m.yaml"), "--json").out)
    assert summary["ok"] is True and [s["prompts"] for s in summary["subjects"]] == [2, 2]


def test_usage_lines_show_manifest_plainly(squeeze) -> None:
    for command in ("gen", "validate"):
        text = squeeze(command, "--help").out
        assert f"Usage: squeeze {command} [OPTIONS] MANIFEST\n" in text
        assert "{MANIFEST}" not in text and "MANIFEST <str>" not in text


# 10.5: squeeze status -----------------------------------------------------------------------------------

TWO_PROMPTS = TINY.replace(
    'prompts: ["a {class} in the snow"]',
    'prompts: ["a {class} in the snow", "a {class} at sea"]\n    seeds: [0, 1]',
)


def test_status_of_a_sharded_run_and_merge(make_project, squeeze) -> None:
    project = make_project(m=TWO_PROMPTS)
    out = project / "out"
    assert squeeze("status", str(out)).code == 2  # not there yet
    assert squeeze("gen", str(project / "m.yaml"), "--out", str(out), "--shard", "0/2", "-q").code == 0

    half = squeeze("status", str(out))
    assert half.code == 1, half.err
    assert "  dog  2/4 done, 2 pending" in half.out
    assert "last run  shards/0-of-2: completed" in half.out
    assert f"incomplete: 2 jobs left; to finish them: squeeze gen {out}/shards/0-of-2/" in half.out

    # A failure recorded by a shard's run index counts as failed until the job is finished.
    first_pending = json.loads(squeeze("status", str(out), "--json").out)
    assert first_pending["jobs"] == {"planned": 4, "done": 2, "failed": 0, "pending": 2}
    from squeeze_cli.gen.status import run_status
    from squeeze_cli.outputs.index import append_index, failed_index_entry

    status = run_status(out)
    pending_job = next(job for job in status.jobs if job.job_id not in status.finished)
    append_index(out / "shards" / "1-of-2", failed_index_entry(pending_job, "RuntimeError: boom"))
    failed = json.loads(squeeze("status", str(out), "--json").out)
    assert failed["jobs"]["failed"] == 1 and failed["failures"][0]["error"] == "RuntimeError: boom"

    assert squeeze("gen", str(project / "m.yaml"), "--out", str(out), "--shard", "1/2", "-q").code == 0
    assert not (out / "index.jsonl").exists()  # only the shards' indexes so far
    merged = squeeze("status", str(out), "--merge")
    assert merged.code == 0 and "complete: every planned image is done" in merged.out
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert sorted(entry["job_id"] for entry in index) == sorted(job.job_id for job in status.jobs)
    assert all(entry["status"] == "ok" for entry in index)
    assert (out / "dog" / "grid-000.png").is_file() and (out / "dog" / "contact-sheet.png").is_file()


def test_status_of_a_folder_that_is_not_a_run(tmp_path: Path, squeeze) -> None:
    result = squeeze("status", str(tmp_path))
    assert result.code == 2 and "is not a squeeze run folder" in result.err
    as_json = json.loads(squeeze("status", str(tmp_path), "--json").out)
    assert as_json["ok"] is False and "is not a squeeze run folder" in as_json["problems"][0]["message"]


def test_status_imports_no_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, squeeze_cli.cli.status, squeeze_cli.gen.status\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_documented_dreambench_anchors_example_is_valid(make_image, tmp_path: Path) -> None:
    from squeeze_cli.manifest import load_manifest

    text = (Path(__file__).resolve().parents[1] / "docs" / "manifest.md").read_text()
    example = next(block for block in text.split("```yaml\n")[1:] if "x-object-prompts" in block)
    for subject in ("backpack", "can", "dog"):
        make_image(f"dreambench/{subject}/00.jpg")
    path = tmp_path / "dreambench.yaml"
    path.write_text(example.split("```", 1)[0])
    loaded = load_manifest(path, check_sources=False)  # the paper's weights are not on this machine
    assert [len(subject.prompts) for subject in loaded.subjects] == [5, 5, 3]
    assert loaded.subjects[1].prompts[0].text == "a can in the jungle"
    assert "x-object-prompts" not in loaded.resolved_yaml()


# 10.6: several machines (two "machines" on loopback) ----------------------------------------------------


@pytest.mark.slow
def test_two_machines_on_loopback_share_one_output_folder(make_project, squeeze) -> None:
    """`torchrun --nnodes 2` as on two machines writing to shared storage: here two node ranks on
    127.0.0.1 with gloo, each one process; the images match a one-process run."""
    import os
    import socket
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    project = make_project(m=TWO_PROMPTS)
    assert squeeze("gen", str(project / "m.yaml"), "--out", str(project / "one"), "-q").code == 0
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node_rank",
                str(rank),
                "--nproc_per_node",
                "1",
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                "-m",
                "squeeze_cli",
                "gen",
                str(project / "m.yaml"),
                "--out",
                str(project / "two"),
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in (0, 1)
    ]
    results = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in results]
    summary = json.loads((project / "two" / "run.json").read_text())
    assert summary["processes"] == 2 and summary["jobs"]["succeeded"] == 4
    ranks = {json.loads(p.read_text())["process"] for p in (project / "two").glob("dog/[0-9]*-s*.json")}
    assert ranks == {0, 1}
    for image in (project / "one").glob("dog/[0-9]*-s*.png"):
        one = np.asarray(Image.open(image).convert("RGB"), dtype=np.int16)
        two = np.asarray(Image.open(project / "two" / "dog" / image.name).convert("RGB"), dtype=np.int16)
        assert np.abs(one - two).max() <= 1, image.name
    assert squeeze("status", str(project / "two")).code == 0


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


def test_hub_ids_in_the_offline_cache_pass(tmp_path: Path, monkeypatch) -> None:
    """A hub id whose snapshot is in the Hugging Face cache is fine offline; a missing subfolder is not."""
    import huggingface_hub.constants

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
    assert source_problems(spec(transformer={"path": "org/other"})) == []


def test_gen_json_reports_problems_found_after_loading(project: Path, squeeze) -> None:
    manifest = project / "m.yaml"
    long_prompt = "a {class} " + "with a very long story " * 200
    manifest.write_text(TINY.replace('prompts: ["a {class} in the snow"]', f'prompts: ["{long_prompt}"]'))
    result = squeeze("gen", str(manifest), "--out", str(project / "out"), "--json")
    assert result.code == 2
    document = json.loads(result.out)
    assert document["ok"] is False and "limit of 512 tokens" in document["problems"][0]["message"]


def test_gen_json_failure_is_one_line_of_its_event_stream(project: Path, squeeze) -> None:
    manifest = project / "m.yaml"
    manifest.write_text(TINY.replace("height: 32", "height: 30"))
    lines = squeeze("gen", str(manifest), "--json").out.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["ok"] is False
    assert squeeze("gen", str(manifest), "--json").err.startswith(f"error: {manifest}:4:11: defaults.height")


def test_no_relative_path_hint_for_an_absolute_recipe_path(project: Path, squeeze) -> None:
    absolute = squeeze("validate", str(project / "m.yaml"), "--recipe", str(project / "none.yaml")).err
    assert "cannot read recipe file" in absolute and "relative to" not in absolute
    relative = squeeze("validate", str(project / "m.yaml"), "--recipe", "presets/none.yaml").err
    assert "(hint: a path on the command line is relative to the current folder)" in relative


def test_validate_checks_the_device_and_offload_mode_gen_would_use(project: Path, squeeze) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = squeeze("validate", str(project / "m.yaml"), "--device", "cuda")
    assert result.code == 2 and result.err.startswith("error: --device cuda: no CUDA GPU is visible")
    as_json = json.loads(squeeze("validate", str(project / "m.yaml"), "--offload", "model", "--json").out)
    assert as_json["ok"] is False and "--offload model needs a CUDA GPU" in as_json["problems"][0]["message"]
    assert squeeze("validate", str(project / "m.yaml"), "--device", "cpu").code == 0
