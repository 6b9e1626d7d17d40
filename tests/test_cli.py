from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from support import signal_and_wait
from typer.testing import CliRunner

from squeeze_cli import __version__
from squeeze_cli.cli import app, main

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO = str(REPO_ROOT / "examples" / "demo.yaml")
runner = CliRunner()

BROKEN = """
version: 1
recipe: tiny
defaults:
  height: 100
subjects:
  - name: dog
    references: [refs/missing.png]
    prompts: ["a {class}"]
"""


def test_help_lists_commands_and_exit_codes():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for text in (
        "validate",
        "recipes",
        "Exit codes:",
        "2    invalid input or usage",
        "for check (and status --rules), an image fails",
    ):
        assert text in result.stdout


@pytest.mark.parametrize("command", sorted(command.name for command in app.registered_commands))
def test_every_commands_help_lists_its_exit_codes(command: str) -> None:
    """A script branches on them: validate, eval, dreambench and recipes said none."""
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    codes = result.stdout.split("Exit codes:", 1)[1]
    assert all(f"  {code}  " in codes for code in ("0", "2", "141")), result.stdout


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"squeeze {__version__}"


def test_validate_prints_the_plan_summary():
    result = runner.invoke(app, ["validate", DEMO])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "recipe    tiny (model" in out
    assert "dog       class dog: 2 references, 2 prompts, 4 jobs" in out
    assert "jobs      8 (limit 100,000)" in out
    assert "images    64x64: 8" in out
    # One of each is not "1 references, 1 prompts, 1 jobs".
    photo = REPO_ROOT / "examples" / "images" / "dog" / "00.jpg"
    one_of_each = [f"subjects.0.references=[{photo}]", "subjects.0.prompts=[a dog]", "defaults.seeds=[0]"]
    one = runner.invoke(app, ["validate", DEMO, *(arg for s in one_of_each for arg in ("--set", s))])
    assert "dog       class dog: 1 reference, 1 prompt, 1 job" in one.stdout, one.output


@pytest.mark.parametrize("command", ["squeeze validate examples/demo.yaml", "squeeze recipes"])
def test_the_outputs_shown_in_docs_cli_are_the_real_ones(command: str) -> None:
    """docs/cli.md shows what these print, as a new user sees it (the clone's path as /path/to)."""
    doc = (REPO_ROOT / "docs" / "cli.md").read_text()
    start = doc.index(f"```\n$ {command}\n") + len(f"```\n$ {command}\n")
    shown = doc[start : doc.index("```", start)]
    args = command.split()[1:]
    result = runner.invoke(app, [DEMO if arg == "examples/demo.yaml" else arg for arg in args])
    assert result.exit_code == 0, result.output
    assert result.stdout.replace(str(REPO_ROOT), "/path/to") == shown


@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["eval", "--metrics", "tiny"],
        ["export", "-o", "{tmp}/export"],
        ["check", "--rules", "amazon-main"],
    ],
)
def test_a_manifest_given_for_a_run_folder_says_so(squeeze, tmp_path: Path, command: list[str]) -> None:
    """`squeeze status examples/demo.yaml` said "no such folder" of a file that exists (check: "has no
    index.jsonl"), and none said what to give instead."""
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in command]
    result = squeeze(args[0], DEMO, *args[1:])
    assert result.code == 2 and "Traceback" not in result.err, result.err
    last = result.err.strip().splitlines()[-1]  # (eval may build its tiny metric models first)
    assert last.startswith("error: ") and last.endswith(
        "demo.yaml: not a folder (hint: give the output folder of a `squeeze gen` run, not its manifest: "
        "the folder its `output.dir` names, or gen's --out)"
    ), result.err
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("lost", [False, True])
def test_ctrl_c_outside_a_run_says_it_stopped(squeeze, monkeypatch, lost: bool) -> None:
    """Ctrl-C while `train` loaded its config and imports: typer made it a silent exit 130, and an import
    cut short that lost it (diffusers, numpy) ended in a RecursionError traceback and exit code 1."""
    import signal

    import squeeze_cli.train.config

    def interrupted(*args, **kwargs):
        try:
            signal_and_wait(signal.SIGINT)
        except KeyboardInterrupt:
            if not lost:
                raise
        raise RuntimeError("Failed to import diffusers.loaders.lora_pipeline")

    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    monkeypatch.setattr(squeeze_cli.train.config, "load_config", interrupted)
    result = squeeze("train", "tiny")
    assert (result.code, result.err) == (130, "stopped by SIGINT (Ctrl-C)\n")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    # With SQUEEZE_DEBUG=1, the error an import cut short ended in is shown too.
    monkeypatch.setenv("SQUEEZE_DEBUG", "1")
    result = squeeze("train", "tiny")
    assert result.code == 130 and result.err.endswith("stopped by SIGINT (Ctrl-C)\n")
    assert ("RuntimeError: Failed to import diffusers" in result.err) == lost, result.err


def test_validate_json():
    result = runner.invoke(app, ["validate", DEMO, "--json"])
    assert result.exit_code == 0
    summary = json.loads(result.stdout)
    assert summary["ok"] is True and summary["jobs"] == 8
    assert [s["name"] for s in summary["subjects"]] == ["dog", "backpack"]
    assert summary["images_per_size"] == {"64x64": 8}
    assert summary["output_dir"] == str(REPO_ROOT / "examples" / "squeeze-out")


def test_validate_flags(tmp_path):
    result = runner.invoke(
        app, ["validate", DEMO, "--json", "--set", "defaults.seeds={count: 5}", "--set", "defaults.width=32"]
    )
    summary = json.loads(result.stdout)
    assert summary["jobs"] == 5 + 2 + 2 * 5  # the prompt with its own seeds keeps them
    assert summary["images_per_size"] == {"32x64": 17}
    result = runner.invoke(app, ["validate", DEMO, "--json", "--max-jobs", "3"])
    assert result.exit_code == 2
    assert "more than the limit of 3" in json.loads(result.stdout)["problems"][0]["message"]


def test_validate_writes_nothing(tmp_path, squeeze):
    manifest = tmp_path / "demo.yaml"
    manifest.write_text(Path(DEMO).read_text().replace("images/", str(REPO_ROOT / "examples/images") + "/"))
    before = sorted(tmp_path.rglob("*"))
    run = squeeze("validate", str(manifest))
    assert run.code == 0 and "ok: the manifest is valid" in run.out
    assert sorted(tmp_path.rglob("*")) == before


def test_invalid_manifest_reports_every_problem_and_exits_2(tmp_path, squeeze):
    manifest = tmp_path / "broken.yaml"
    manifest.write_text(textwrap.dedent(BROKEN).lstrip())
    run = squeeze("validate", str(manifest))
    assert run.code == 2 and run.out == ""
    lines = run.err.splitlines()
    assert lines[0].startswith(f"error: {manifest}:4:11: defaults.height: must be a multiple of 16")
    assert lines[1].startswith(
        f"error: {manifest}:7:18: subjects[0].references[0]: no such file: 'refs/missing.png'"
    )
    assert lines[2].startswith(
        f"error: {manifest}:8:15: subjects[0].prompts[0]: uses {{class}} but the subject"
    )
    assert lines[3] == f"error: 3 problems in {manifest}"
    assert len(lines) == 4


def test_invalid_manifest_json(tmp_path, squeeze):
    manifest = tmp_path / "broken.yaml"
    manifest.write_text(textwrap.dedent(BROKEN).lstrip())
    run = squeeze("validate", str(manifest), "--json")
    assert run.code == 2 and run.err == ""
    document = json.loads(run.out)
    assert document["ok"] is False
    assert [(p["line"], p["column"], p["field"]) for p in document["problems"]] == [
        (4, 11, "defaults.height"),
        (7, 18, "subjects[0].references[0]"),
        (8, 15, "subjects[0].prompts[0]"),
    ]
    assert document["problems"][0]["hint"] == "use 96"


def test_bad_set_flag_is_reported_at_the_flag(squeeze):
    run = squeeze("validate", DEMO, "--set", "defaults.height=33")
    assert run.code == 2
    assert run.err.splitlines() == [run.err.splitlines()[0]]  # one problem, one line
    assert run.err.startswith("error: --set defaults.height=33: defaults.height: must be a multiple of 16")


def test_missing_manifest(squeeze):
    run = squeeze("validate", "no/such/manifest.yaml")
    assert run.code == 2
    assert run.err.splitlines() == [
        "error: no/such/manifest.yaml: cannot read the manifest: No such file or directory"
    ]


def test_recipes_list_and_show():
    result = runner.invoke(app, ["recipes"])
    assert result.exit_code == 0
    lines = [line for line in result.stdout.splitlines() if line and not line.startswith(" ")]
    names = [line.split()[0] for line in lines[:15]]
    assert names == [
        "flux2-dev",
        "flux2-klein-4b",
        "flux2-klein-9b-kv",
        "kontext-dev",
        "paper-internvl3-flux",
        "qwen-image-edit-2511",
        "qwen-image-edit-plus",
        "qwen2.5vl-flux",
        "tiny",
        "tiny-flux2-dev",
        "tiny-flux2-klein",
        "tiny-flux2-klein-kv",
        "tiny-kontext",
        "tiny-qwen-image-edit",
        "tiny-qwen-image-edit-2511",
    ]
    shown = runner.invoke(app, ["recipes", "tiny"])
    assert shown.exit_code == 0
    assert shown.stdout == (REPO_ROOT / "recipes" / "tiny.yaml").read_text()


def test_known_errors_become_one_line_with_a_hint(squeeze):
    run = squeeze("recipes", "nope")
    assert run.code == 2 and run.out == ""
    assert run.err.splitlines() == [
        "error: unknown recipe 'nope' (hint: known recipes: flux2-dev, flux2-klein-4b, flux2-klein-9b-kv, "
        "kontext-dev, paper-internvl3-flux, qwen-image-edit-2511, qwen-image-edit-plus, qwen2.5vl-flux, "
        "tiny, tiny-flux2-dev, tiny-flux2-klein, tiny-flux2-klein-kv, tiny-kontext, tiny-qwen-image-edit, "
        "tiny-qwen-image-edit-2511; or give the path of a .yaml file)"
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bogus"], "No such command 'bogus'"),
        (["validate"], "Missing argument"),
        (["validate", DEMO, "--max-jobs", "0"], "--max-jobs"),
        (["validate", DEMO, "--frobnicate"], "No such option"),
    ],
)
def test_usage_errors_exit_2(squeeze, argv, message):
    run = squeeze(*argv)
    assert run.code == 2 and message in run.err


def test_help_and_version_through_main(squeeze):
    run = squeeze("--help")
    assert run.code == 0 and "Exit codes:" in run.out
    run = squeeze("--version")
    assert run.code == 0 and run.out.strip() == f"squeeze {__version__}"


def test_unknown_errors_keep_their_traceback(monkeypatch):
    import squeeze_cli.plan

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(squeeze_cli.plan, "plan_jobs", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["validate", DEMO])


def test_no_heavy_imports_on_help_validate_and_recipes():
    script = textwrap.dedent(
        f"""
        import sys
        from squeeze_cli.cli import main
        for argv in (["--help"], ["validate", {DEMO!r}], ["recipes"], ["recipes", "tiny"], ["--version"]):
            try:
                main(argv)
            except SystemExit as exit:
                assert exit.code == 0, (argv, exit.code)
        heavy = sorted(m for m in ("torch", "diffusers", "transformers", "accelerate") if m in sys.modules)
        print("HEAVY", heavy)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines()[-1] == "HEAVY []"


def test_python_dash_m_runs_the_cli():
    result = subprocess.run(
        [sys.executable, "-m", "squeeze_cli", "--version"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and result.stdout.strip() == f"squeeze {__version__}"
