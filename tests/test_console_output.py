"""What `squeeze gen` prints: the plan first, then a progress bar naming the subject and the failures, the
summary on stdout; with `--json`, the problems (found before or after loading) as one JSON document on
stdout; and usage lines that show `MANIFEST` plainly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from support import ONE_IMAGE, unstamped


@pytest.fixture
def project(make_project) -> Path:
    return make_project(m=ONE_IMAGE)


def test_the_text_summary_of_gen_goes_to_stdout(project: Path, squeeze) -> None:
    result = squeeze("gen", str(project / "m.yaml"), "--out", str(project / "out"))
    assert result.code == 0
    assert result.out.startswith("completed: 1 generated, 0 already done, 0 failed")
    assert "completed:" not in result.err
    # The plan comes before the progress.
    logged = result.err.splitlines()  # (the fixture takes off the UTC time stamps; a library may warn first)
    plan = logged.index(
        f"1 job, 0 already done, 1 to generate, 1 thread (OMP_NUM_THREADS) → {project / 'out'}"
    )
    assert not any(re.match(r"\[\d+/\d+\]", line) for line in logged[:plan])


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
    logged = [line.split(" ", 1)[1] for line in stream.getvalue().splitlines()]  # after the UTC time
    progress = [line for line in logged if line.startswith("[")]
    assert progress[-1].startswith("[6/6] 0 failed")
    assert unstamped(capsys.readouterr().out).startswith("completed: 6 generated")


def test_gen_json_prints_the_problems_of_an_invalid_manifest(project: Path, squeeze) -> None:
    manifest = project / "m.yaml"
    manifest.write_text(ONE_IMAGE.replace("height: 32", "height: 30"))
    result = squeeze("gen", str(manifest), "--json")
    assert result.code == 2
    document = json.loads(result.out)
    assert document["ok"] is False and document["problems"][0]["field"] == "defaults.height"
    assert document == json.loads(squeeze("validate", str(manifest), "--json").out)
    manifest.write_text(ONE_IMAGE)
    bad_flag = json.loads(squeeze("gen", str(manifest), "--json", "--shard", "3/2").out)
    assert bad_flag["ok"] is False and "--shard 3/2" in bad_flag["problems"][0]["message"]


def test_gen_json_reports_problems_found_after_loading(project: Path, squeeze) -> None:
    manifest = project / "m.yaml"
    long_prompt = "a {class} " + "with a very long story " * 200
    manifest.write_text(
        ONE_IMAGE.replace('prompts: ["a {class} in the snow"]', f'prompts: ["{long_prompt}"]')
    )
    result = squeeze("gen", str(manifest), "--out", str(project / "out"), "--json")
    assert result.code == 2
    document = json.loads(result.out)
    assert document["ok"] is False and "limit of 512 tokens" in document["problems"][0]["message"]


def test_gen_json_failure_is_one_line_of_its_event_stream(project: Path, squeeze) -> None:
    manifest = project / "m.yaml"
    manifest.write_text(ONE_IMAGE.replace("height: 32", "height: 30"))
    lines = squeeze("gen", str(manifest), "--json").out.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["ok"] is False
    assert squeeze("gen", str(manifest), "--json").err.startswith(f"error: {manifest}:4:11: defaults.height")


def test_usage_lines_show_manifest_plainly(squeeze) -> None:
    for command in ("gen", "validate"):
        text = squeeze(command, "--help").out
        assert f"Usage: squeeze {command} [OPTIONS] MANIFEST\n" in text
        assert "{MANIFEST}" not in text and "MANIFEST <str>" not in text


def test_help_names_every_value_not_its_python_type(squeeze) -> None:
    from squeeze_cli.cli import app

    # `--device <str>` says nothing; `--device DEVICE` (as gen has it) says what to give.
    for command in app.registered_commands:
        text = squeeze(command.name, "--help").out
        assert not re.search(r"<(str|int|float|path)>", text), text


def test_loading_a_pipeline_prints_no_library_notes_about_backends_squeeze_does_not_use() -> None:
    """transformers 5 says, on the import of diffusers' FLUX pipelines, that CLIP's and SigLIP's image
    processors fall back to PIL without torchvision: two lines of noise at the top of every `gen` and
    `train` on a CPU install (and an order-dependent extra line in tests that read stderr)."""
    import subprocess
    import sys

    code = (
        "import squeeze_cli.train.loop, squeeze_cli.metrics.encoders\n"  # train reaches diffusers its own way
        "from squeeze_cli.pipelines.registry import PIPELINES\n"
        "for spec in PIPELINES.values(): spec.load_class()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "requires torchvision" not in result.stderr, result.stderr
