"""`squeeze gen` end to end on the tiny preset: outputs, resume, batching, sharding, failures, processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support import in_two_threads, threads_as_processes

from squeeze_cli.loading import TINY_FORMAT
from squeeze_cli.outputs import records

MANIFEST = """\
version: 1
recipe: tiny
defaults:
  height: 32
  width: 48
  num_inference_steps: 3
  reference_size: 32
  seeds: [0, 1, 2]
subjects:
  - name: dog
    class: dog
    references: [images/dog/*.jpg]
    prompts:
      - a {class} in the snow
      - text: a {class} on the beach, in the sun
        seeds: [5]
  - name: backpack
    class: backpack
    references: [images/backpack/00.jpg]
    prompts:
      - a {class} on a table
"""
NUM_JOBS = 3 + 1 + 3


@pytest.fixture
def project(make_project) -> Path:
    return make_project(m=MANIFEST)


@pytest.fixture
def gen(squeeze):
    """Run `squeeze gen ARGS` through the console entry point; returns stdout, checks the exit code."""

    def run(*args: str, expect: int = 0) -> str:
        result = squeeze("gen", *args)
        assert result.code == expect, (result.code, result.out[-3000:], result.err[-3000:])
        run.stderr = result.err
        return result.out

    return run


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def images_of(out: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(out)): pixels(p) for p in sorted(out.glob("*/[0-9]*-s*.png"))}


def assert_same_images(first: dict[str, np.ndarray], second: dict[str, np.ndarray]) -> None:
    assert first.keys() == second.keys()
    for name in first:
        # Different batch shapes may round the last float bit differently; never more than one level.
        assert np.abs(first[name] - second[name]).max() <= 1, name


def test_gen_writes_the_documented_outputs(project: Path, gen) -> None:
    out = project / "out"
    gen(str(project / "m.yaml"), "--out", str(out))

    pngs = sorted(out.glob("*/[0-9]*-s*.png"))
    assert len(pngs) == NUM_JOBS
    assert Image.open(out / "dog" / "000-s0.png").size == (48, 32)
    record = json.loads((out / "dog" / "001-s5.json").read_text())
    assert record["prompt"] == "a dog on the beach, in the sun"
    assert record["seed"] == 5 and record["params"]["num_inference_steps"] == 3
    assert sum(record["stage_plan"]["counts"]) == 3
    assert record["preset"] == "tiny" and record["versions"]["torch"]
    assert records.read_png_record(out / "dog" / "001-s5.png")["job_id"] == record["job_id"]
    assert "Seed: 5" in records.read_png_parameters(out / "dog" / "001-s5.png")

    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert len(index) == NUM_JOBS and {entry["status"] for entry in index} == {"ok"}
    summary = json.loads((out / "run.json").read_text())
    assert summary["status"] == "completed"
    assert summary["jobs"] == {"planned": NUM_JOBS, "skipped": 0, "succeeded": NUM_JOBS, "failed": 0}
    for name in ("grid-000.png", "grid-001.png", "contact-sheet.png"):
        assert (out / "dog" / name).is_file()
    assert (out / "backpack" / "grid-000.png").is_file()
    assert not list(out.rglob("*.tmp"))
    # The resolved manifest reproduces the run: every job is found done.
    again = gen(str(out / "manifest.resolved.yaml"), "--out", str(out), "--json")
    summary = json.loads(again.strip().splitlines()[-1])
    assert summary["jobs"]["skipped"] == NUM_JOBS and summary["jobs"]["succeeded"] == 0


def test_second_run_does_no_work_and_overwrite_redoes_it(project: Path, gen) -> None:
    out = project / "out"
    gen(str(project / "m.yaml"), "--out", str(out))
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/[0-9]*-s*.png")}
    events = [
        json.loads(line) for line in gen(str(project / "m.yaml"), "--out", str(out), "--json").splitlines()
    ]
    assert not [e for e in events if e["event"] == "job_finished"]
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert len((out / "index.jsonl").read_text().splitlines()) == NUM_JOBS

    events = [
        json.loads(line)
        for line in gen(str(project / "m.yaml"), "--out", str(out), "--json", "--overwrite").splitlines()
    ]
    assert len([e for e in events if e["event"] == "job_finished"]) == NUM_JOBS
    assert len((out / "index.jsonl").read_text().splitlines()) == NUM_JOBS


def test_changed_prompt_regenerates_only_its_jobs(project: Path, gen) -> None:
    out = project / "out"
    gen(str(project / "m.yaml"), "--out", str(out))
    output = gen(
        str(project / "m.yaml"),
        "--out",
        str(out),
        "--json",
        "--set",
        "subjects.1.prompts.0=a {class} on a chair",
    )
    finished = [json.loads(line) for line in output.splitlines() if '"job_finished"' in line]
    assert {event["subject"] for event in finished} == {"backpack"} and len(finished) == 3


def test_images_do_not_depend_on_batch_size(project: Path, gen) -> None:
    gen(str(project / "m.yaml"), "--out", str(project / "b1"), "--batch-size", "1")
    gen(str(project / "m.yaml"), "--out", str(project / "b4"), "--batch-size", "4")
    assert_same_images(images_of(project / "b1"), images_of(project / "b4"))


def test_shards_union_equals_the_unsharded_run(project: Path, gen) -> None:
    gen(str(project / "m.yaml"), "--out", str(project / "all"))
    for index in range(3):
        gen(str(project / "m.yaml"), "--out", str(project / "sharded"), "--shard", f"{index}/3")
    assert_same_images(images_of(project / "all"), images_of(project / "sharded"))
    shard_lines = [
        json.loads(line)["job_id"]
        for path in (project / "sharded" / "shards").glob("*/index.jsonl")
        for line in path.read_text().splitlines()
    ]
    assert sorted(shard_lines) == sorted(set(shard_lines)) and len(shard_lines) == NUM_JOBS


def test_dry_run_loads_and_writes_nothing(project: Path, gen) -> None:
    out = project / "out"
    report = json.loads(gen(str(project / "m.yaml"), "--out", str(out), "--dry-run", "--json"))
    assert report["jobs"] == NUM_JOBS and report["pending"] == NUM_JOBS
    assert report["steps_per_stage"]
    assert not out.exists()


def test_a_failing_job_is_recorded_and_the_run_goes_on(project: Path, gen, monkeypatch) -> None:
    from squeeze_cli.pipelines.squeeze import SqueezePipeline

    original = SqueezePipeline.__call__

    def flaky(self, prompt, *args, **kwargs):
        if any("beach" in text for text in prompt):
            raise RuntimeError("simulated failure")
        return original(self, prompt, *args, **kwargs)

    monkeypatch.setattr(SqueezePipeline, "__call__", flaky)
    out = project / "out"
    gen(str(project / "m.yaml"), "--out", str(out), expect=1)
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    failed = [entry for entry in index if entry["status"] == "failed"]
    assert len(failed) == 1 and "simulated failure" in failed[0]["error"]
    assert len(index) == NUM_JOBS
    summary = json.loads((out / "run.json").read_text())
    assert summary["status"] == "completed_with_failures" and summary["jobs"]["failed"] == 1

    monkeypatch.setattr(SqueezePipeline, "__call__", original)
    gen(str(project / "m.yaml"), "--out", str(out))  # the failed job is retried, nothing else
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert len(index) == NUM_JOBS and {entry["status"] for entry in index} == {"ok"}


def test_out_of_memory_halves_the_batch(project: Path, gen, monkeypatch) -> None:
    import torch

    from squeeze_cli.pipelines.squeeze import SqueezePipeline

    original = SqueezePipeline.__call__
    sizes = []

    def small_gpu(self, prompt, *args, **kwargs):
        sizes.append(len(prompt))
        if len(prompt) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, prompt, *args, **kwargs)

    monkeypatch.setattr(SqueezePipeline, "__call__", small_gpu)
    gen(str(project / "m.yaml"), "--out", str(project / "out"), "--batch-size", "4")
    assert len(list((project / "out").glob("*/[0-9]*-s*.png"))) == NUM_JOBS
    assert max(sizes) == 4 and sizes.count(1) == NUM_JOBS


def test_a_second_run_on_a_busy_output_directory_is_refused(project: Path, gen) -> None:
    import fcntl

    out = project / "out"
    out.mkdir()
    with open(out / ".squeeze.lock", "w") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.write("4242")
        holder.flush()
        gen(str(project / "m.yaml"), "--out", str(out), expect=2)
    assert "in use by another squeeze gen (pid 4242)" in gen.stderr
    assert not list(out.glob("*/*.png"))


def test_a_run_started_on_the_same_new_folder_while_this_one_loaded_makes_nothing_twice(
    project: Path, gen, monkeypatch
) -> None:
    """Two runs started together on a new OUT: neither could lock a folder that did not exist yet, so the
    second found nothing finished and, once the first was done, made every image again."""
    from squeeze_cli.gen.runner import GenRun

    out = project / "out"
    real_open = GenRun.open

    def open_after_another_run(run: GenRun) -> None:  # the other run, between this one's scan and writes
        other = subprocess.run(
            [
                sys.executable,
                "-m",
                "squeeze_cli",
                "gen",
                str(project / "m.yaml"),
                "--out",
                str(out),
                "--quiet",
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
            timeout=600,
        )
        assert other.returncode == 0, other.stderr
        real_open(run)

    monkeypatch.setattr(GenRun, "open", open_after_another_run)
    gen(str(project / "m.yaml"), "--out", str(out), "--quiet")
    assert len(list(out.glob("*/[0-9]*-s*.png"))) == NUM_JOBS
    summary = json.loads((out / "run.json").read_text())
    assert summary["jobs"]["skipped"] == NUM_JOBS and summary["jobs"]["succeeded"] == 0, summary["jobs"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def assert_refused_once_by_every_process(result: subprocess.CompletedProcess, message: str) -> None:
    """What a launch of two processes that one of them refused prints: one `error:` line saying `message`,
    both processes exited 2 (the launcher's summary), and no traceback but the launcher's ChildFailedError."""
    import re

    errors = [line for line in result.stderr.splitlines() if " error: " in line]
    assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]
    codes = re.findall(r"^ +exitcode +: (\S+)", result.stderr, re.MULTILINE)
    assert codes == ["2", "2"], result.stderr[-3000:]
    assert result.stderr.count("Traceback") == 1, result.stderr[-3000:]


def two_processes(*args: str) -> list[str]:
    """The command line of `squeeze ARGS` as two CPU processes of `accelerate launch`."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--main_process_port",
        str(free_port()),  # not the default 29500, which another run on the machine may hold
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "squeeze_cli",
        *args,
    ]


@pytest.mark.slow
def test_two_processes_split_the_jobs_and_match_one_process(project: Path, gen) -> None:
    gen(str(project / "m.yaml"), "--out", str(project / "one"))
    # A cold cache: the tiny checkpoint is built by the main process while the other waits (built by rank 1,
    # it would lack the weights transformers writes on rank 0 only).
    cold_cache = project / "cold-cache"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "SQUEEZE_CACHE": str(cold_cache)}
    command = two_processes("gen", str(project / "m.yaml"), "--out", str(project / "two"), "--json")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((project / "two" / "run.json").read_text())
    assert summary["processes"] == 2 and summary["jobs"]["succeeded"] == NUM_JOBS
    index = [json.loads(line) for line in (project / "two" / "index.jsonl").read_text().splitlines()]
    assert sorted(e["job_id"] for e in index) == sorted({e["job_id"] for e in index})
    assert len(index) == NUM_JOBS
    # Both processes did work: each image's sidecar records the process that made it.
    ranks = {json.loads(p.read_text())["process"] for p in (project / "two").glob("*/[0-9]*-s*.json")}
    assert ranks == {0, 1}
    assert_same_images(images_of(project / "one"), images_of(project / "two"))
    # One complete build, no staging.
    assert [p.name for p in cold_cache.iterdir()] == [f"tiny-internvl-v{TINY_FORMAT}"]


def gen_as_two_processes(monkeypatch, manifest: Path, out: Path, load=None) -> dict[int, object]:
    """`run_gen` in two threads as the two processes of a launch, models neither built nor loaded (`load`,
    if given, is called with the process's index instead) and instructions not checked; what each returned
    or raised."""
    from squeeze_cli.gen import runner
    from squeeze_cli.gen.worker import GenOptions, Worker
    from squeeze_cli.manifest import load_manifest

    monkeypatch.setattr(runner, "Processes", threads_as_processes(monkeypatch))
    monkeypatch.setattr(Worker, "build_tiny_models", lambda self: None)
    monkeypatch.setattr(Worker, "load", lambda self: load and load(self.processes.index))
    monkeypatch.setattr(Worker, "check_instructions", lambda self, jobs: [])
    loaded = load_manifest(str(manifest), [])
    return in_two_threads(lambda: runner.run_gen(loaded, GenOptions(out=out), quiet=True))


def test_a_refusal_of_the_main_process_ends_every_process(project: Path, monkeypatch) -> None:
    """Under `accelerate launch`, the main process alone takes the output folder's lock: refused (another
    gen holds it), it exited 2 while the others waited for it at the next collective until the launcher
    ended them by SIGTERM. Now every process ends with the refusal's exit code; only the main one says it."""
    from squeeze_cli.errors import OtherProcessError
    from squeeze_cli.gen.lock import DirectoryLock, OutputInUseError

    out = project / "out"
    other = DirectoryLock(out)
    other.acquire()  # another gen on that folder, still running
    try:
        ended = gen_as_two_processes(monkeypatch, project / "m.yaml", out)
    finally:
        other.release()
    assert {rank: type(end) for rank, end in ended.items()} == {0: OutputInUseError, 1: OtherProcessError}
    assert isinstance(ended[1], OtherProcessError) and ended[1].exit_code == 2
    assert sorted(path.name for path in out.iterdir()) == [".squeeze.lock"]


def test_a_refusal_of_the_main_process_at_the_first_writes_ends_every_process(
    project: Path, monkeypatch
) -> None:
    """A new output folder is locked at the first writes (`GenRun.open`), by the main process alone: when
    another gen began in it while this one loaded, the main process was refused and the others waited for
    it at the barrier after those writes."""
    from squeeze_cli.errors import OtherProcessError
    from squeeze_cli.gen.lock import DirectoryLock, OutputInUseError

    out = project / "out"
    other = DirectoryLock(out)

    def load(rank: int) -> None:
        if rank == 0:
            other.acquire()  # another gen starts on the same new folder

    try:
        ended = gen_as_two_processes(monkeypatch, project / "m.yaml", out, load=load)
    finally:
        other.release()
    assert {rank: type(end) for rank, end in ended.items()} == {0: OutputInUseError, 1: OtherProcessError}
    assert "in use by another squeeze gen" in str(ended[0])
    assert not (out / "run.json").exists()


def test_a_model_that_one_process_cannot_load_ends_every_process(project: Path, monkeypatch) -> None:
    """Only a process with jobs loads the model: with one job left, the other one waited at the gather of
    the instructions' problems for the one whose model failed to load."""
    from squeeze_cli.errors import ModelLoadError, OtherProcessError

    def load(rank: int) -> None:
        if rank == 0:
            raise ModelLoadError("model.path: cannot load it", "check the path")

    ended = gen_as_two_processes(monkeypatch, project / "m.yaml", project / "out", load=load)
    assert {rank: type(end) for rank, end in ended.items()} == {0: ModelLoadError, 1: OtherProcessError}


@pytest.mark.slow
def test_a_refused_launch_ends_every_process_with_the_refusals_code(project: Path) -> None:
    """Two processes of `accelerate launch` on an output folder another gen holds: the main process says
    the refusal once (its line, and with --json its document) and every process exits 2 (the launcher
    exits 1 with its summary of the failed processes). Before, the other process waited for the main one
    until the launcher's SIGTERM ended it (-15)."""
    from squeeze_cli.gen.lock import DirectoryLock

    out = project / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "SQUEEZE_CACHE": str(project / "c")}
    other = DirectoryLock(out)
    other.acquire()  # another gen on that folder, still running
    try:
        command = two_processes("gen", str(project / "m.yaml"), "--out", str(out), "--json")
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    finally:
        other.release()
    assert_refused_once_by_every_process(result, "is in use by another squeeze gen")
    documents = [json.loads(line) for line in result.stdout.splitlines()]
    assert [document["ok"] for document in documents] == [False], result.stdout


def test_an_instruction_longer_than_the_context_is_refused_before_writing(project: Path, gen) -> None:
    manifest = project / "m.yaml"
    long_prompt = "a {class} " + "with a very long story " * 200
    manifest.write_text(MANIFEST.replace("      - a {class} on a table", f"      - {long_prompt}"))
    line = 1 + MANIFEST.splitlines().index("      - a {class} on a table")
    out = project / "out"
    gen(str(manifest), "--out", str(out), expect=2)
    errors = gen.stderr.splitlines()  # one line: no loading chatter or tokenizer warning off a terminal
    assert len(errors) == 1 and "limit of 512 tokens" in errors[0]
    assert errors[0].startswith(f"error: {manifest}:{line}:9: subjects[1].prompts[0]: The instruction is ")
    assert not out.exists()
    # Through --set, the problem is placed at the flag.
    gen(str(manifest), "--out", str(out), "--set", f"subjects.0.prompts.0={long_prompt!r}", expect=2)
    assert "error: --set subjects.0.prompts.0=" in gen.stderr and "subjects[0].prompts[0]" in gen.stderr
    assert not out.exists()


def test_progress_off_a_terminal_is_a_few_plain_lines(project: Path, gen) -> None:
    summary = gen(str(project / "m.yaml"), "--out", str(project / "out"))
    logged = gen.stderr.splitlines()  # without the UTC time stamps (tests/test_logs.py checks those)
    progress = [line for line in logged if line.startswith("[")]
    # The first and the last image; the rest only every 30 s, which this run is far below.
    assert [line.split("]")[0] for line in progress] == ["[1/7", "[7/7"]
    # The summary is the command's output (stdout); logs and progress stay on stderr.
    assert summary.startswith("completed: 7 generated, 0 already done, 0 failed")


def test_quiet_prints_nothing_on_success(project: Path, gen) -> None:
    assert gen(str(project / "m.yaml"), "--out", str(project / "out"), "--quiet") == ""
    assert gen.stderr == ""


def test_out_pointing_at_a_file_is_refused_before_anything_runs(project: Path, gen) -> None:
    (project / "afile").write_text("not a folder")
    gen(str(project / "m.yaml"), "--out", str(project / "afile" / "sub"), expect=2)
    assert gen.stderr.strip() == (
        f"error: --out {project / 'afile' / 'sub'}: {str(project / 'afile')!r} is a file, not a folder "
        "(hint: choose another --out)"
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dtype", "float64"], "error: --dtype float64: expected float32, bfloat16 or float16"),
        (["--offload", "disk"], "error: --offload disk: expected none, model or sequential"),
        (["--shard", "2/2"], "error: --shard 2/2: expected I/N with 0 <= I < N"),
    ],
)
def test_bad_flags_are_one_line_usage_errors(project: Path, gen, flags, message) -> None:
    gen(str(project / "m.yaml"), "--out", str(project / "out"), *flags, expect=2)
    assert gen.stderr.startswith(message) and len(gen.stderr.splitlines()) == 1
    assert not (project / "out").exists()


@pytest.mark.parametrize(("grids", "sheets"), [(False, True), (True, False), (False, False)])
def test_grids_and_contact_sheets_follow_the_output_settings(project: Path, gen, grids, sheets) -> None:
    out = project / "out"
    gen(
        str(project / "m.yaml"),
        "--out",
        str(out),
        "--set",
        f"output={{grids: {str(grids).lower()}, contact_sheet: {str(sheets).lower()}}}",
    )
    assert bool(list(out.glob("*/grid-*.png"))) is grids
    assert bool(list(out.glob("*/contact-sheet.png"))) is sheets


def test_the_thread_count_fits_the_cores_and_the_load_unless_the_user_set_it() -> None:
    from squeeze_cli.processes import choose_threads

    def threads(cores: int, load: float, environ: dict, processes: int = 1, requested=None) -> int:
        return choose_threads(cores, load, environ, processes, requested).threads

    # A lone process takes the cores the others leave idle, at least one and at most every core.
    assert threads(16, 0.0, {}) == 16
    assert threads(16, 3.2, {}) == 13
    assert threads(2, 7.6, {}) == 1  # the busy 2-core machine: ×3.0–3.4 faster than torch's 2 threads
    assert threads(2, 0.4, {}) == 2
    assert threads(4, -1.0, {}) == 4
    # Several local processes share the cores, never below one thread each.
    assert threads(8, 0.0, {"LOCAL_WORLD_SIZE": "2"}, 2) == 4
    assert threads(8, 0.0, {}, 80) == 1
    # An explicit setting wins: --threads over OMP_NUM_THREADS over the choice.
    assert threads(2, 7.6, {"OMP_NUM_THREADS": "3"}) == 3
    assert threads(16, 0.0, {"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "2"}, 2) == 3
    assert threads(2, 7.6, {"OMP_NUM_THREADS": "3"}, requested=2) == 2
    assert threads(2, 0.0, {"OMP_NUM_THREADS": "many"}) == 2  # not a count: as if unset
    choice = choose_threads(2, 7.6, {})
    assert choice.to_dict() == {"threads": 1, "threads_from": "2 cores, load 7.6"}


def test_gen_says_its_threads_in_the_plan_line_and_threads_wins(project: Path, gen) -> None:
    import torch

    before = torch.get_num_threads()
    try:
        gen(str(project / "m.yaml"), "--out", str(project / "out"), "--threads", "2")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    plan = next(line for line in gen.stderr.splitlines() if "to generate" in line)
    assert "to generate, 2 threads (--threads) → " in plan, plan


def test_accelerate_launch_without_multi_gpu_says_it_runs_one_process(project: Path, tmp_path: Path) -> None:
    """`accelerate launch --num_processes 2` without `--multi_gpu` starts one plain process on a CPU
    machine (the form `eval --help` used to recommend): gen and eval say so instead of quietly running 1."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2"]
    launch += [
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "squeeze_cli",
    ]
    gen = [*launch, "gen", str(project / "m.yaml"), "--out", str(tmp_path / "out"), "--dry-run"]
    evaluate = [*launch, "eval", str(tmp_path / "no-such-run"), "--metrics", "tiny"]
    for command in (gen, evaluate):
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        warnings = [
            line for line in result.stderr.splitlines() if "accelerate launch started 1 process" in line
        ]
        # (accelerate repeats a failed process's output: eval of a missing run ends with its error twice)
        assert warnings and "add --multi_gpu" in warnings[0], result.stderr[-3000:]
    # With --multi_gpu, or without accelerate, no such warning.
    plain = subprocess.run(
        [sys.executable, "-m", "squeeze_cli", *gen[len(launch) :]], capture_output=True, text=True, env=env
    )
    assert plain.returncode == 0 and "accelerate launch started" not in plain.stderr, plain.stderr


# Loaded by every Python of the launch through PYTHONPATH: a worker's first batch writes `<pid>.waiting` in
# the gate folder and then waits (up to 5 minutes) for a gate that this test never opens.
WORKER_GATE_HOOK = """
import os, time
from squeeze_cli.gen import worker

_generate = worker.Worker._generate


def _gated(self, batch, condition):
    gate = os.environ["SQUEEZE_TEST_GATE"]
    open(os.path.join(gate, f"{os.getpid()}.waiting"), "w").close()
    for _ in range(6_000):  # a hang guard that counts looks: the test opens the gate
        if os.path.exists(os.path.join(gate, "open")):
            break
        time.sleep(0.05)
    return _generate(self, batch, condition)


worker.Worker._generate = _gated
"""


def process_is_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has ended
    except FileNotFoundError:
        return True


@pytest.mark.slow
def test_workers_end_when_their_launcher_is_killed(project: Path) -> None:
    """torchrun puts each worker in a session of its own, so SIGKILL of `accelerate launch` does not reach
    them: they watch their launcher and end when it is gone, instead of running on alone."""
    import signal

    hook, gate = project / "hook", project / "gate"
    hook.mkdir()
    gate.mkdir()
    (hook / "sitecustomize.py").write_text(WORKER_GATE_HOOK)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "SQUEEZE_CACHE": str(project / "cache"),
        "PYTHONPATH": str(hook),
        "SQUEEZE_TEST_GATE": str(gate),
    }
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no"]
    command += ["--dynamo_backend", "no", "-m", "squeeze_cli", "gen", str(project / "m.yaml")]
    command += ["--out", str(project / "out"), "--json"]
    launcher = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    workers: list[int] = []
    try:
        for _ in range(6000):  # both workers at the gate (a generous bound for a loaded machine)
            workers = [int(p.name.split(".")[0]) for p in gate.glob("*.waiting")]
            if len(workers) == 2 or launcher.poll() is not None:
                break
            time.sleep(0.1)
        assert len(workers) == 2, launcher.stderr.read().decode()[-3000:] if launcher.poll() else workers
        for pid in workers:  # the launcher is their parent, as the watch assumes
            with open(f"/proc/{pid}/stat") as stat:
                assert int(stat.read().rsplit(")", 1)[1].split()[1]) == launcher.pid
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        for _ in range(3000):  # they look once a second; the bound only guards against a hang
            if all(process_is_gone(pid) for pid in workers):
                break
            time.sleep(0.1)
        assert all(process_is_gone(pid) for pid in workers), workers
    finally:
        (gate / "open").touch()
        for pid in workers:
            if not process_is_gone(pid):
                os.kill(pid, signal.SIGKILL)


# A launcher that starts one worker in a session of its own (as torchrun does), prints its pid and exits.
LAUNCHER = """
import os, subprocess, sys
worker = subprocess.Popen(
    [sys.executable, "-c", "import os, time; from squeeze_cli.processes import exit_with_launcher; "
     "assert exit_with_launcher(os.environ); time.sleep(300)"],
    env={**os.environ, "WORLD_SIZE": sys.argv[1]},
    start_new_session=True,
)
print(worker.pid, flush=True)
"""


def test_a_worker_ends_when_its_launcher_is_gone() -> None:
    launched = subprocess.run(
        [sys.executable, "-c", LAUNCHER, "2"], capture_output=True, text=True, check=True
    )
    worker = int(launched.stdout)
    try:
        for _ in range(600):  # it looks once a second; 60 s is a generous bound on a loaded machine
            if process_is_gone(worker):
                break
            time.sleep(0.1)
        assert process_is_gone(worker)
    finally:
        if not process_is_gone(worker):
            os.kill(worker, 9)


def test_one_process_does_not_watch_its_parent() -> None:
    from squeeze_cli.processes import exit_with_launcher

    assert not exit_with_launcher({})  # `nohup squeeze gen ...`: its shell may go, the run goes on
    assert not exit_with_launcher({"WORLD_SIZE": "1"})


def test_a_joined_process_group_is_left_before_exit(tmp_path: Path) -> None:
    """`main` ends with `end_process_group`: a process group left to the interpreter's exit can abort the
    process (gloo's threads) after its work is done; without one it does nothing."""
    import torch.distributed as dist

    from squeeze_cli.processes import end_process_group

    assert not end_process_group()  # none joined
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    assert end_process_group()
    assert not dist.is_initialized()


def test_a_process_that_was_in_a_group_ends_without_the_interpreters_teardown(tmp_path: Path) -> None:
    """After `destroy_process_group`, the interpreter's teardown could still abort a worker (SIGABRT,
    "terminate called without an active exception": 5 of 36 two-process evals on a busy machine, none of
    40 since), and its launcher then failed the run and stopped the other process. `main` now ends such a
    process after the exit handlers, skipping the teardown, with its exit code and its output whole."""
    script = f"""
import atexit, sys
import torch.distributed as dist
from squeeze_cli.cli import main

class Teardown:
    def __del__(self, open=open):  # the builtins may be gone by then
        open({str(tmp_path / "teardown")!r}, "w").close()

teardown = Teardown()  # a module global: deleted in the interpreter's teardown
atexit.register(lambda: open({str(tmp_path / "atexit")!r}, "w").close())
dist.init_process_group("gloo", init_method="file://{tmp_path / "store"}", rank=0, world_size=1)
sys.stdout.write("buffered, no newline")
main(["status", {str(tmp_path / "no-such-run")!r}])
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr  # status's exit code for a folder that is not there
    assert result.stdout.startswith("buffered, no newline")
    assert "no-such-run" in result.stderr
    assert (tmp_path / "atexit").exists()  # Python's exit handlers ran
    assert not (tmp_path / "teardown").exists()  # the teardown did not
