"""Logs off a terminal (cron): sparse progress lines, never a carriage-return redraw, and every line
squeeze writes to stderr starts with its UTC time."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

from squeeze_cli.logs import PlainProgress, progress_bar, stamped

STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ")
DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo.yaml"


def test_a_bar_off_a_terminal_is_the_first_and_the_last_line_time_stamped() -> None:
    stream = io.StringIO()
    bar = progress_bar(100, "clip", unit="img", stream=stream)
    assert isinstance(bar, PlainProgress)
    for _ in range(100):
        bar.update()
    bar.close()
    lines = stream.getvalue().splitlines()
    # The rest only every 30 s, far more than 100 updates take.
    assert [line.split(" [")[1].split("]")[0] for line in lines] == ["1/100", "100/100"]
    assert all(STAMP.match(line) for line in lines) and "\r" not in stream.getvalue()


def test_a_resumed_bar_counts_from_where_it_resumed() -> None:
    stream = io.StringIO()
    bar = progress_bar(10, "train", unit="step", initial=6, stream=stream)
    for _ in range(4):
        bar.update()
    assert [line.split(" [")[1].split("]")[0] for line in stream.getvalue().splitlines()] == ["7/10", "10/10"]


def test_stamped_marks_every_line() -> None:
    assert all(STAMP.match(line) for line in stamped("one\ntwo").splitlines())


def test_gen_eval_and_train_write_stamped_lines_and_no_carriage_return_off_a_terminal(tmp_path: Path):
    """As cron runs them: stdout and stderr to files (here pipes). The libraries' own warnings are
    silenced (TRANSFORMERS_VERBOSITY): what is left is squeeze's."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "SQUEEZE_CACHE": str(tmp_path / "cache"),  # cold: first builds write model shards too
    }
    out = tmp_path / "out"
    commands = {
        "gen": ["gen", str(DEMO), "--out", str(out)],
        "eval": ["eval", str(out), "--metrics", "tiny"],
        "train": ["train", "tiny", "--set", f"output_dir={tmp_path / 'train'}"],
    }
    for name, argv in commands.items():
        # Bytes: text mode would turn each `\r` into a line break.
        result = subprocess.run(
            [sys.executable, "-m", "squeeze_cli", *argv], capture_output=True, env=env, timeout=600
        )
        stdout, stderr = result.stdout.decode(), result.stderr.decode()
        assert result.returncode == 0, (name, stderr[-3000:])
        assert "\r" not in stdout and "\r" not in stderr, (name, stderr[-3000:])
        lines = stderr.split("\n")[:-1]
        assert lines, name
        unstamped = [line for line in lines if not STAMP.match(line)]
        assert unstamped == [], (name, unstamped)
        # The progress is there: its first and its last line.
        progress = [line for line in lines if re.search(r"\[\d+/\d+\]", line)]
        assert len(progress) >= 2, (name, lines)


def test_errors_and_warnings_off_a_terminal_start_with_their_utc_time(tmp_path: Path) -> None:
    """A cron log of a failed night: the `error:` line and the manifest's warnings are time-stamped too."""
    manifest = tmp_path / "m.yaml"
    manifest.write_text(DEMO.read_text().replace("version: 1", "version: 1\nunknown_key: 1"))
    result = subprocess.run(
        [sys.executable, "-m", "squeeze_cli", "validate", str(manifest)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and lines, result.stderr
    assert all(STAMP.match(line) for line in lines), lines
    assert any(STAMP.sub("", line).startswith("error: ") for line in lines), lines
