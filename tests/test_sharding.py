"""Sharding a run: a prompt's seeds stay in one shard when the balance allows, `--shard slurm` reads the
job array, each shard's resolved manifest says which shard it is, and two machines share one output
folder (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import FOUR_SEEDS, ONE_IMAGE, TWO_PROMPTS, deadline, one_error_line


@pytest.fixture
def project(make_project) -> Path:
    return make_project(m=ONE_IMAGE)


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
        m=ONE_IMAGE.replace(
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
    from squeeze_cli.cli.shard import parse_shard

    for name in (
        "SLURM_ARRAY_TASK_ID",
        "SLURM_ARRAY_TASK_COUNT",
        "SLURM_ARRAY_TASK_MIN",
        "SLURM_ARRAY_TASK_STEP",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert parse_shard("slurm") == expected


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


NINES = "9" * 5000


@pytest.mark.parametrize(
    "shard",
    ["²/3", "1/³", "١/٣", f"{NINES}/{NINES}9", f"0/{NINES}", "0/99999999999999999999999", "0/100001"],
    ids=[
        "superscript",
        "superscript-count",
        "arabic-indic",
        "5000-digits",
        "5000-digit-count",
        "1e23",
        "max+1",
    ],
)
def test_odd_shards_are_one_error_line(project: Path, squeeze, shard: str) -> None:
    with deadline(60):  # a safety net: cutting a plan into 10**23 shards never ended
        result = squeeze("gen", str(project / "m.yaml"), "--dry-run", "--shard", shard)
    assert result.code == 2
    line = one_error_line(result.err)
    assert line.startswith("error: --shard ") and len(line) < 300, line


@pytest.mark.parametrize(
    "env",
    [
        {"SLURM_ARRAY_TASK_ID": "²", "SLURM_ARRAY_TASK_COUNT": "3"},
        {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "³"},
        {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "¹"},
        {"SLURM_ARRAY_TASK_ID": NINES, "SLURM_ARRAY_TASK_COUNT": "3"},
        {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "99999999999999999999999"},
    ],
    ids=["id-superscript", "count-superscript", "min-superscript", "id-5000-digits", "count-1e23"],
)
def test_odd_slurm_variables_are_one_error_line(project: Path, squeeze, monkeypatch, env) -> None:
    for name in ("SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with deadline(60):
        result = squeeze("gen", str(project / "m.yaml"), "--dry-run", "--shard", "slurm")
    assert result.code == 2
    line = one_error_line(result.err)
    assert line.startswith("error: --shard slurm: ") and len(line) < 300, line


def test_the_largest_shard_count_is_accepted(project: Path, squeeze) -> None:
    result = squeeze("gen", str(project / "m.yaml"), "--dry-run", "--shard", "99999/100000")
    assert result.code == 0, result.err


def test_a_shard_s_dry_run_says_which_shard_it_is(make_project, squeeze) -> None:
    project = make_project(m=FOUR_SEEDS)
    text = squeeze("gen", str(project / "m.yaml"), "--dry-run", "--shard", "0/2")
    assert text.code == 0, text.err
    lines = text.out.splitlines()
    assert lines[0].startswith("shard 0/2: dry run: 2 jobs over 1 subject, 0 already done, 2 to generate")
    assert all(line.startswith("shard 0/2: ") for line in lines), text.out
    report = json.loads(squeeze("gen", str(project / "m.yaml"), "--dry-run", "--json", "--shard", "0/2").out)
    assert (report["shard"], report["jobs"], report["subjects"]) == ([0, 2], 2, 1)


@pytest.mark.parametrize(
    ("flag", "env", "expected"),
    [
        ("k8s/8", {"JOB_COMPLETION_INDEX": "5"}, (5, 8)),
        ("aws-batch", {"AWS_BATCH_JOB_ARRAY_INDEX": "0", "AWS_BATCH_JOB_ARRAY_SIZE": "3"}, (0, 3)),
        ("gcp-batch", {"BATCH_TASK_INDEX": "9", "BATCH_TASK_COUNT": "10"}, (9, 10)),
        ("env:TASK/TASKS", {"TASK": "2", "TASKS": "4"}, (2, 4)),
    ],
)
def test_shard_reads_cloud_array_jobs(flag, env, expected) -> None:
    from squeeze_cli.cli.shard import parse_shard

    assert parse_shard(flag, env) == expected


@pytest.mark.parametrize(
    ("flag", "env", "error"),
    [
        ("k8s", {"JOB_COMPLETION_INDEX": "0"}, "--shard k8s: expected k8s/N, N the Job's completions"),
        ("k8s/4", {}, "--shard k8s/4: JOB_COMPLETION_INDEX is not set"),
        ("k8s/4", {"JOB_COMPLETION_INDEX": "4"}, "--shard k8s/4: task 4 is not one of 4 tasks"),
        (
            "aws-batch",
            {"AWS_BATCH_JOB_ARRAY_INDEX": "1"},
            "--shard aws-batch: AWS_BATCH_JOB_ARRAY_SIZE is not set",
        ),
        (
            "gcp-batch",
            {"BATCH_TASK_INDEX": "x", "BATCH_TASK_COUNT": "-2"},
            "BATCH_TASK_COUNT='-2' are not a whole",
        ),
        ("env:TASK", {"TASK": "1"}, "--shard env:TASK: expected env:INDEX_VAR/COUNT_VAR"),
        ("env:A/B", {"A": "0", "B": "100001"}, "--shard env:A/B: more than 100,000 shards"),
    ],
)
def test_a_missing_or_malformed_array_job_variable_is_a_usage_error(flag, env, error) -> None:
    from squeeze_cli.cli.shard import parse_shard
    from squeeze_cli.errors import UsageError

    with pytest.raises(UsageError) as raised:
        parse_shard(flag, env)
    assert error in raised.value.one_line()


def test_gen_shard_k8s_runs_the_pod_s_part(project: Path, squeeze, monkeypatch) -> None:
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    result = squeeze("gen", str(project / "m.yaml"), "--dry-run", "--json", "--shard", "k8s/2")
    assert result.code == 0, result.err
    assert squeeze("gen", str(project / "m.yaml"), "--dry-run", "--json", "--shard", "1/2").out == result.out
    monkeypatch.delenv("JOB_COMPLETION_INDEX")
    result = squeeze("gen", str(project / "m.yaml"), "--dry-run", "--shard", "k8s/2")
    assert result.code == 2
    assert result.err.startswith(
        "error: --shard k8s/2: JOB_COMPLETION_INDEX is not set (hint: run it in a pod"
    )
