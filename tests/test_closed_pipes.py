"""A command whose stdout or stderr reader is gone (`squeeze gen m.yaml 2>&1 | head -1`) stops as if by
SIGPIPE: exit 141, nothing more written, no traceback; `gen` stops as on SIGTERM, after the current batch,
its finished images kept and its summary saying it was stopped, so that the same command resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from support import ONE_IMAGE, unstamped

from squeeze_cli.errors import EXIT_OK, EXIT_SIGPIPE

# Three images, one per batch.
THREE_SEEDS = ONE_IMAGE.replace("reference_size: 32\n", "reference_size: 32\n  seeds: [0, 1, 2]\n")

# Loaded by the child Python through PYTHONPATH: the first batch waits until the gate file exists, so the
# test closes its end of the pipe at a known point (the plan is out, no image yet) however busy the machine.
GATE_HOOK = """
import os, time
from squeeze_cli.gen import worker

_generate = worker.Worker._generate


def _gated(self, batch, condition):
    for _ in range(30_000):  # a hang guard that counts looks: the test opens the gate
        if os.path.exists(os.environ["SQUEEZE_TEST_GATE"]):
            break
        time.sleep(0.02)
    return _generate(self, batch, condition)


worker.Worker._generate = _gated
"""


@pytest.fixture(scope="module")
def tiny_cache() -> str:
    from squeeze_cli.loading import ensure_tiny_checkpoint

    ensure_tiny_checkpoint("internvl")
    return os.environ["SQUEEZE_CACHE"]


@pytest.mark.parametrize("json_events", [False, True], ids=["2>&1", "--json"])
def test_gen_whose_reader_is_gone_stops_after_the_batch_and_resumes(
    make_project, squeeze, tiny_cache: str, json_events: bool
) -> None:
    """It exited 1 ("jobs failed") at once, and `run.json` kept saying `running` with no process alive."""
    project = make_project(m=THREE_SEEDS)
    hook, gate, out = project / "hook", project / "gate", project / "out"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(GATE_HOOK)
    # Without --json the log lines go to stderr, into the pipe as with `2>&1 | head -1`; with it, the events.
    flags = ["--json"] if json_events else []
    process = subprocess.Popen(
        [sys.executable, "-m", "squeeze_cli", "gen", str(project / "m.yaml"), "--out", str(out), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE if json_events else subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(hook), "SQUEEZE_TEST_GATE": str(gate), "OMP_NUM_THREADS": "1"},
    )
    assert process.stdout is not None
    first = process.stdout.readline()  # the plan (`3 jobs, ...`, or the run_started event)
    process.stdout.close()
    gate.touch()
    stderr = process.stderr.read() if process.stderr is not None else ""
    assert process.wait(timeout=600) == EXIT_SIGPIPE, first + stderr
    assert "Traceback" not in stderr
    summary = json.loads((out / "run.json").read_text())
    assert summary["status"] == "interrupted"
    assert summary["jobs"]["succeeded"] == 1  # the batch under way when the reader went is kept

    status = squeeze("status", str(out))
    assert "last run  interrupted" in status.out, status.out + status.err

    rerun = squeeze("gen", str(project / "m.yaml"), "--out", str(out))
    assert rerun.code == EXIT_OK, rerun.err
    summary = json.loads((out / "run.json").read_text())
    assert summary["status"] == "completed"
    assert (summary["jobs"]["skipped"], summary["jobs"]["succeeded"]) == (1, 2)


@pytest.mark.parametrize("args", [["recipes"], ["--version"], ["--help"], ["gen", "--help"]], ids=" ".join)
def test_a_short_command_whose_reader_is_gone_exits_141_without_a_traceback(args: list[str]) -> None:
    """`squeeze recipes | head -1` exited 1, and so did `squeeze --version | true` (the root's own options
    are read before any command runs). The pipe's reader is closed before the command writes, so that it
    is gone by the first line however fast the command is."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "squeeze_cli", *args],
            stdout=writer,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(writer)
    assert result.returncode == EXIT_SIGPIPE
    assert unstamped(result.stderr) == ""  # no traceback, and not Python's "Exception ignored" at exit
