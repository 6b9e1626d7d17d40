"""Damaged run records are damaged files, never a traceback or a hang: a sidecar whose `job_id` is a list or
a mapping (gen, status), a `run.json` that is a FIFO, nested too deep, a link to /dev/zero or huge (status,
its shards' too, plain, `--json` and `--merge`), a subject folder that is a FIFO (`status --merge`), and an
index over its size limit, named as such."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from support import TWO_SUBJECTS, one_error_line

from squeeze_cli import outputs
from squeeze_cli.errors import EXIT_INVALID, EXIT_JOBS_FAILED, EXIT_OK
from squeeze_cli.outputs import layout
from squeeze_cli.reading import INDEX_MAX_BYTES

# The status command in a process of its own, killed by the harness if it blocks (a FIFO) or grows past
# this much memory (/dev/zero): the assertions are on what the command itself did.
STATUS = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 * 1024**3, resource.RLIM_INFINITY))
from squeeze_cli.cli import main
main(sys.argv[1:])
"""


def _status(out: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", STATUS, "status", str(out), *flags],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.fixture
def sharded_run(make_project, squeeze) -> tuple[Path, Path]:
    """A run made by two shards: (the manifest, OUT)."""
    project = make_project(m=TWO_SUBJECTS)
    out = project / "out"
    for shard in ("0/2", "1/2"):
        result = squeeze("gen", str(project / "m.yaml"), "--out", str(out), "--shard", shard, "-q")
        assert result.code == EXIT_OK, result.err
    return project / "m.yaml", out


# A sidecar's job id ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("job_id", [["a"], {"a": 1}], ids=["list", "mapping"])
def test_a_sidecar_whose_job_id_is_a_list_or_a_mapping_is_a_damaged_sidecar(
    sharded_run, squeeze, plan_of, job_id
) -> None:
    manifest, out = sharded_run
    jobs = plan_of(manifest)
    layout.sidecar_path(out, jobs[0]).write_text(json.dumps({"job_id": job_id}))

    status = squeeze("status", str(out))
    assert status.code == EXIT_JOBS_FAILED, status.err  # counted as not done
    assert "  dog  3/4 done, 1 pending" in status.out
    result = squeeze("gen", str(manifest), "--out", str(out), "-q")
    assert result.code == EXIT_OK, result.err
    assert outputs.read_sidecar(layout.sidecar_path(out, jobs[0]))["job_id"] == jobs[0].job_id  # made again


# run.json ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", [".", "shards/0-of-2"])
@pytest.mark.parametrize("damage", ["fifo", "link to /dev/zero"])
def test_status_takes_a_run_json_that_is_a_fifo_or_dev_zero_as_no_summary(sharded_run, where, damage) -> None:
    _, out = sharded_run
    summary = out / where / "run.json"
    summary.unlink(missing_ok=True)
    if damage == "fifo":
        os.mkfifo(summary)
    else:
        summary.symlink_to("/dev/zero")
    for flags in ((), ("--json",), ("--merge",)):
        result = _status(out, *flags)
        assert result.returncode == EXIT_OK and "Traceback" not in result.stderr, (flags, result.stderr)
        if flags == ("--json",):
            runs = [run["folder"] for run in json.loads(result.stdout)["runs"]]
            assert runs == [folder for folder in ("shards/0-of-2", "shards/1-of-2") if folder != where]


def test_status_takes_a_deeply_nested_run_json_as_no_summary(sharded_run, squeeze) -> None:
    _, out = sharded_run
    (out / "shards" / "0-of-2" / "run.json").write_text("[" * 100000)
    for flags in ((), ("--json",), ("--merge",)):
        result = squeeze("status", str(out), *flags)
        assert result.code == EXIT_OK, result.err
    runs = json.loads(squeeze("status", str(out), "--json").out)["runs"]
    assert [run["folder"] for run in runs] == ["shards/1-of-2"]  # --merge writes no run.json


def test_status_does_not_read_a_huge_run_json(sharded_run, squeeze) -> None:
    _, out = sharded_run
    with open(out / "shards" / "1-of-2" / "run.json", "wb") as summary:
        summary.truncate(300 * 1024 * 1024)  # sparse: nothing on disk, 300 MB to whoever reads it all
    tracemalloc.start()
    try:
        result = squeeze("status", str(out), "--json")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.code == EXIT_OK, result.err
    assert [run["folder"] for run in json.loads(result.out)["runs"]] == ["shards/0-of-2"]
    assert peak < 150 * 1024 * 1024, peak  # read up to its limit (64 MiB), not whole


# A shard's index ------------------------------------------------------------------------------------------


def test_a_shards_index_that_is_a_fifo_says_to_remove_it(sharded_run, squeeze) -> None:
    """status writes nothing: gen's hint ("run the same command again: finished images are kept") was no
    help, and running it again changed nothing."""
    _, out = sharded_run
    index = out / "shards" / "1-of-2" / "index.jsonl"
    index.unlink()
    os.mkfifo(index)
    for flags in ((), ("--merge",)):
        line = one_error_line(squeeze("status", str(out), *flags).err)
        assert line.startswith(f"error: cannot read {index}: not a regular file (a FIFO (named pipe))"), line
        assert "(hint: remove it: squeeze writes that file itself" in line and "finished images" not in line


# status --merge ---------------------------------------------------------------------------------------------


def test_merge_with_a_subject_folder_that_is_a_fifo_merges_the_rest(sharded_run, squeeze, plan_of) -> None:
    manifest, out = sharded_run
    jobs = plan_of(manifest)
    for view in out.glob("*/grid-*.png"):
        view.unlink()
    for path in (out / "dog").iterdir():
        path.unlink()
    (out / "dog").rmdir()
    os.mkfifo(out / "dog")

    result = squeeze("status", str(out), "--merge")
    assert result.code == EXIT_INVALID
    line = one_error_line(result.err)
    assert f"{out / 'dog'} is a FIFO (named pipe), not a folder" in line and "not drawn" in line
    # The rest is done: the index holds every finished image, and the other subject's views are drawn.
    cat = [job for job in jobs if job.subject == "cat"]
    assert {entry["job_id"] for entry in outputs.read_index(out)} == {job.job_id for job in cat}
    assert outputs.plan_views(out, cat, outputs.find_finished(out, cat)) == []


def test_bad_rules_stop_a_merge_before_it_writes(sharded_run, squeeze) -> None:
    """`status --merge --rules bad.yaml` rebuilt the index, then refused the rules."""
    _, out = sharded_run
    (out / "index.jsonl").unlink(missing_ok=True)  # what a merge writes
    result = squeeze("status", str(out), "--merge", "--rules", "missing.yaml")
    assert result.code == 2 and "cannot read rules file 'missing.yaml'" in result.err
    assert not (out / "index.jsonl").exists()


# The index's size limit -------------------------------------------------------------------------------------


def test_the_index_size_limit_is_named_as_such(sharded_run, squeeze, monkeypatch) -> None:
    from squeeze_cli.reading import size_text

    _, out = sharded_run
    assert size_text(INDEX_MAX_BYTES) == "1 GiB"  # as docs/reliability.md says it
    (out / "index.jsonl").write_text("x" * 2048 + "\n")
    monkeypatch.setattr("squeeze_cli.outputs.index.INDEX_MAX_BYTES", 1024)  # 1 GiB is slow to write
    result = squeeze("status", str(out), "--merge")
    line = one_error_line(result.err)
    assert "larger than the 1,024 bytes limit for this kind of file" in line, line
    assert "file system" not in line and "rebuilds index.jsonl from the sidecars" in line
