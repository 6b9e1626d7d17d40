"""`squeeze status`: a sharded run's progress and failures read from its files, `--merge` bringing the run
index and the views up to date, a folder that is not a run, and no torch imported."""

from __future__ import annotations

import json
import os
from pathlib import Path

from support import ONE_IMAGE, TWO_PROMPTS, gen_example_run

from squeeze_cli.processes import this_machine


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


def test_status_of_a_plain_run_names_no_folder_for_its_last_run(tmp_path: Path, squeeze) -> None:
    out = gen_example_run(tmp_path, squeeze, ONE_IMAGE)
    text = squeeze("status", str(out))
    assert text.code == 0, text.err
    (last_run,) = [line for line in text.out.splitlines() if line.startswith("last run")]
    assert last_run.startswith("last run  completed ("), text.out  # not `last run  .: completed`
    assert json.loads(squeeze("status", str(out), "--json").out)["runs"][0]["folder"] == "."


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


def test_a_run_whose_process_is_gone_is_not_called_running(tmp_path: Path, squeeze) -> None:
    """A run killed with kill -9 (or by the OOM killer) never writes its summary: `run.json` says `running`
    for good, and status said so every night. Its pid is looked up where the run ran: this machine's."""
    import subprocess
    import sys

    out = gen_example_run(tmp_path, squeeze, ONE_IMAGE)
    summary = json.loads((out / "run.json").read_text())
    assert summary["host"] == this_machine()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid names no process now

    def status_with(pid: int, host: str) -> tuple[str, dict]:
        (out / "run.json").write_text(
            json.dumps({**summary, "status": "running", "finished_at": None, "pid": pid, "host": host})
        )
        text = squeeze("status", str(out)).out
        (last_run,) = [line for line in text.splitlines() if line.startswith("last run")]
        return last_run, json.loads(squeeze("status", str(out), "--json").out)["runs"][0]

    line, run = status_with(dead.pid, this_machine())
    assert line == (
        f"last run  stopped without its summary: process {dead.pid} is gone (killed, out of memory, or "
        "run.json could not be written)"
    )
    assert run["status"] == "running" and run["alive"] is False and run["pid"] == dead.pid
    line, run = status_with(os.getpid(), this_machine())  # alive
    assert line == "last run  running (not finished)" and run["alive"] is True
    line, run = status_with(dead.pid, "another-host pid:[1]")  # cannot be told from here
    assert line == "last run  running (not finished)" and run["alive"] is None


def test_a_pid_reused_by_a_later_process_is_not_the_run(tmp_path: Path, squeeze) -> None:
    """A killed run's pid, once the machine has run long enough, names another process: one that started
    after the run did is not the run, which is gone."""
    out = gen_example_run(tmp_path, squeeze, ONE_IMAGE)
    summary = json.loads((out / "run.json").read_text())
    # This test's process (alive) as the pid of a run that started long before it.
    (out / "run.json").write_text(
        json.dumps(
            {
                **summary,
                "status": "running",
                "finished_at": None,
                "pid": os.getpid(),
                "host": this_machine(),
                "started_at": "2001-01-01T00:00:00+00:00",
            }
        )
    )
    run = json.loads(squeeze("status", str(out), "--json").out)["runs"][0]
    assert run["alive"] is False
