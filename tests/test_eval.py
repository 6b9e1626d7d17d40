"""`squeeze eval` end to end on a tiny run with the tiny metric models: scores, summaries, cache, errors."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from support import EXAMPLE_IMAGES, gen_example_run, in_two_threads, threads_as_processes

from squeeze_cli.eval.rundir import RunImage
from squeeze_cli.eval.scoring import clip_t_text
from squeeze_cli.outputs.resume import png_file_facts

MANIFEST = """\
version: 1
recipe: tiny
defaults:
  height: 32
  width: 32
  num_inference_steps: 2
  reference_size: 32
  seeds: [0, 1]
subjects:
  - name: dog
    class: dog
    references: [images/dog/*.jpg]
    prompts:
      - a {class} in the snow
      - a {class} on the beach
  - name: backpack
    class: backpack
    references: [images/backpack/00.jpg]
    prompts:
      - a {class} on a table
"""
NUM_IMAGES = 6
METRICS = ["dino", "clip_i", "clip_t", "copy"]


@pytest.fixture(scope="module")
def made_run(tmp_path_factory, squeeze) -> Path:
    """One tiny `squeeze gen` run, made once; tests work on copies (`run`)."""
    return gen_example_run(tmp_path_factory.mktemp("project"), squeeze, MANIFEST)


@pytest.fixture
def run(made_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "runs" / "run"
    shutil.copytree(made_run, copy)
    return copy


def evaluate(squeeze, *args: str, expect: int = 0) -> dict:
    result = squeeze("eval", *args, "--metrics", "tiny", "--json")
    assert result.code == expect, (result.out[-2000:], result.err[-2000:])
    return json.loads(result.out)


def read_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_eval_writes_every_image_and_the_protocol(squeeze, run: Path):
    summary = evaluate(squeeze, str(run))["runs"][0]
    rows = read_rows(run)
    assert len(rows) == summary["images"] == NUM_IMAGES
    assert summary["metrics"] == METRICS
    for row in rows:
        assert all(isinstance(row[m], float) for m in METRICS), row
        assert -1.0 <= row["dino"] <= 1.0 and row["clip_t"] >= 0.0
        assert len(row["dino_per_reference"]) == len(row["references"])
    protocol = summary["protocol"]
    assert protocol["metric_set"] == "tiny" and "RANDOM" in protocol["notes"]["warning"]
    assert [e["role"] for e in protocol["encoders"]] == ["dino", "clip"]
    assert protocol["encoders"][0]["preprocessing"]["interpolation"] == "bicubic"
    assert protocol["clip_t"]["weight"] == 1.0 and protocol["references"] == "conditioning"
    assert json.loads((run / "metrics.json").read_text())["overall"] == summary["overall"]
    assert (run / "report.html").is_file()


def test_an_image_against_itself_scores_one(squeeze, run: Path, tmp_path: Path):
    references = tmp_path / "refs"
    (references / "dog").mkdir(parents=True)
    shutil.copy(run / "dog" / "000-s0.png", references / "dog" / "same.png")
    evaluate(squeeze, str(run), "--references", str(references))
    rows = {row["image"]: row for row in read_rows(run)}
    itself = rows["dog/000-s0.png"]
    assert itself["dino"] == pytest.approx(1.0, abs=1e-5)
    assert itself["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert itself["copy"] == pytest.approx(1.0, abs=1e-5)
    assert rows["dog/000-s1.png"]["dino"] < 1.0 - 1e-5  # another image is not itself
    # No folder for `backpack`: its images get no identity score, and that is said.
    assert rows["backpack/000-s0.png"]["dino"] is None and rows["backpack/000-s0.png"]["clip_t"] is not None
    summary = json.loads((run / "metrics.json").read_text())
    assert any("backpack/000-s0.png" in note for note in summary["notes"])


def test_images_left_out_of_a_metrics_means_are_said_under_the_table(squeeze, run: Path, tmp_path: Path):
    """A subject without references (here: no folder for `backpack` in --references) has no DINO: the
    overall DINO is over the other images while the row says 6 images, which the table must say."""
    references = tmp_path / "refs"
    shutil.copytree(EXAMPLE_IMAGES / "dog", references / "dog")
    result = squeeze("eval", str(run), "--metrics", "tiny", "--references", str(references))
    assert result.code == 0, result.err
    line = "not scored: DINO, CLIP-I, copy of 2 image(s) (null in metrics.jsonl; see metrics.json's notes)"
    assert line in result.out
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["unscored"] == {"dino": 2, "clip_i": 2, "copy": 2}
    assert "not scored: DINO, CLIP-I, copy of 2 image(s)" in read_report(run)
    assert "not scored" not in squeeze("eval", str(run), "--metrics", "tiny").out  # conditioning: all scored


def test_the_means_are_the_means_of_the_images(squeeze, run: Path):
    summary = evaluate(squeeze, str(run), "--clip-t-weight", "2.5")["runs"][0]
    rows = read_rows(run)
    for metric in METRICS:
        assert summary["overall"][metric] == pytest.approx(
            statistics.fmean(r[metric] for r in rows), abs=1e-12
        )
        for subject, block in summary["subjects"].items():
            values = [r[metric] for r in rows if r["subject"] == subject]
            assert block[metric] == pytest.approx(statistics.fmean(values), abs=1e-12)
    for prompt in summary["prompts"]:
        group = [
            r
            for r in rows
            if (r["subject"], r["prompt_index"]) == (prompt["subject"], prompt["prompt_index"])
        ]
        assert prompt["images"] == len(group) == {"dog": 2, "backpack": 2}[prompt["subject"]]
    assert summary["protocol"]["clip_t"]["weight"] == 2.5


def test_a_rerun_computes_nothing_and_a_grown_run_only_what_is_new(squeeze, run: Path):
    first = evaluate(squeeze, str(run))["runs"][0]
    assert first["cache"] == {"computed": 2 * NUM_IMAGES, "reused": 0}  # two models
    second = evaluate(squeeze, str(run))["runs"][0]
    assert second["cache"] == {"computed": 0, "reused": 2 * NUM_IMAGES}
    assert second["overall"] == first["overall"]
    # CLIP-T's weight is applied after the cache: changing it recomputes nothing either.
    assert evaluate(squeeze, str(run), "--clip-t-weight", "2.5")["runs"][0]["cache"]["computed"] == 0

    manifest = run.parent.parent / "m.yaml"
    shutil.copytree(EXAMPLE_IMAGES, run.parent.parent / "images")
    manifest.write_text(MANIFEST)
    grown = squeeze("gen", str(manifest), "--out", str(run), "--set", "defaults.seeds=[0,1,2]", "--quiet")
    assert grown.code == 0, grown.err
    third = evaluate(squeeze, str(run))["runs"][0]
    assert third["images"] == NUM_IMAGES + 3
    assert third["cache"] == {"computed": 2 * 3, "reused": 2 * NUM_IMAGES}


def test_scores_cached_by_an_older_squeeze_are_recomputed(squeeze, run: Path):
    # Format 1 scored DINO with a crop one pixel off for some aspect ratios and LayerNorm epsilon 1e-12.
    first = evaluate(squeeze, str(run))["runs"][0]
    cache = run / "metrics-cache.json"
    data = json.loads(cache.read_text())
    assert data["format"] == 2
    cache.write_text(json.dumps({**data, "format": 1}))
    again = evaluate(squeeze, str(run))["runs"][0]
    assert again["cache"] == {"computed": 2 * NUM_IMAGES, "reused": 0}
    assert again["overall"] == first["overall"]


def test_a_changed_image_is_scored_again(squeeze, run: Path):
    evaluate(squeeze, str(run))
    Image.new("RGB", (32, 32), (0, 0, 255)).save(run / "dog" / "000-s0.png")
    # A PNG its sidecar does not vouch for is not finished (listed missing): the sidecar follows it here.
    sidecar = run / "dog" / "000-s0.json"
    record = json.loads(sidecar.read_text())
    record["png"] = png_file_facts(run / "dog" / "000-s0.png")
    sidecar.write_text(json.dumps(record))
    assert evaluate(squeeze, str(run))["runs"][0]["cache"]["computed"] == 2


def test_failed_jobs_and_missing_files_are_reported_and_the_rest_is_scored(squeeze, run: Path):
    (run / "dog" / "001-s1.png").unlink()
    with open(run / "index.jsonl", "a") as index:
        failed = {  # a planned job (only those count) whose last line says it failed
            "job_id": json.loads((run / "backpack" / "000-s0.json").read_text())["job_id"],
            "status": "failed",
            "subject": "backpack",
            "prompt_index": 0,
            "seed": 0,
            "prompt": "a backpack on a table",
            "error": "out of memory",
        }
        index.write(json.dumps(failed) + "\n")
    result = squeeze("eval", str(run), "--metrics", "tiny")
    assert result.code == 0, result.err
    assert "missing: dog/001-s1.png: the image is missing" in result.out
    assert "1 failed job(s)" in result.out
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["images"] == NUM_IMAGES - 2
    assert summary["failed"][0]["error"] == "out of memory"
    assert summary["missing"] == ["dog/001-s1.png: the image is missing"]


def test_sharded_run_indexes_are_read(squeeze, run: Path):
    shard = run / "shards" / "1-of-2"
    shard.mkdir(parents=True)
    (run / "index.jsonl").rename(shard / "index.jsonl")
    assert evaluate(squeeze, str(run))["runs"][0]["images"] == NUM_IMAGES


def test_jobs_of_the_plan_not_made_yet_are_said(squeeze, run: Path):
    """A sharded run with one shard done, or a gen still running: the means cover part of the plan, and a
    researcher reading `overall` must be told so, not left to think the run is complete."""
    index = run / "index.jsonl"
    lines = index.read_text().splitlines(keepends=True)
    index.write_text("".join(lines[:-2]))  # the last two jobs have not been made yet
    result = squeeze("eval", str(run), "--metrics", "tiny")
    assert result.code == 0, result.err
    assert "not evaluated: 2 job(s) of the run's plan not made yet" in result.out
    summary = json.loads((run / "metrics.json").read_text())
    assert (summary["images"], summary["pending"]) == (NUM_IMAGES - 2, 2)
    assert "2 not made yet" in read_report(run)
    index.write_text("".join(lines))
    assert evaluate(squeeze, str(run))["runs"][0]["pending"] == 0


def test_two_runs_side_by_side(squeeze, run: Path, tmp_path: Path):
    other = tmp_path / "runs" / "other"
    shutil.copytree(run, other)
    (other / "dog" / "000-s0.png").unlink()
    result = squeeze("eval", str(run), str(other), "--metrics", "tiny")
    assert result.code == 0, result.err
    table = [line.split() for line in result.out.splitlines()]
    assert ["subject", "run", "images", "DINO", "CLIP-I", "CLIP-T", "copy"] in table
    side_by_side = [
        cells[:3]
        for cells in table[table.index(["subject", "run", "images", "DINO", "CLIP-I", "CLIP-T", "copy"]) :]
    ]
    for expected in (
        ["backpack", "run", "2"],
        ["backpack", "other", "2"],
        ["dog", "other", "3"],
        ["overall", "other", "5"],
    ):
        assert expected in side_by_side, expected
    for folder in (run, other):
        page = (folder / "report.html").read_text()
        assert "../other/dog/000-s1.png" in page or "../run/dog/000-s1.png" in page


def test_runs_side_by_side_that_do_not_hold_the_same_images_are_said_to(squeeze, run: Path, tmp_path: Path):
    """Each run's means are over its own images: when the other run lacks some (fewer seeds, a prompt
    less, a failed job), the difference between the rows is partly one of images, which must be said."""
    same = tmp_path / "runs" / "same"
    shutil.copytree(run, same)
    result = squeeze("eval", str(run), str(same), "--metrics", "tiny")
    assert result.code == 0, result.err
    assert "do not hold the same images" not in result.out + read_report(run)
    (same / "dog" / "000-s0.png").unlink()
    result = squeeze("eval", str(run), str(same), "--metrics", "tiny")
    assert result.code == 0, result.err
    warning = (
        "warning: the runs do not hold the same images (subject, prompt, seed): 5 in every run, besides "
        "them run 1, same 0: each run's means are over its own images, not over pairs"
    )
    assert warning in result.out
    for folder in (run, same):
        assert html.escape(warning) in read_report(folder)


def test_nothing_is_written_outside_the_run(squeeze, run: Path):
    before = sorted(p.name for p in run.parent.iterdir())
    evaluate(squeeze, str(run))
    assert sorted(p.name for p in run.parent.iterdir()) == before
    assert not list(run.rglob(".*.tmp"))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: tmp / "nope", "no such folder"),
        (lambda tmp: (tmp / "file.txt").write_text("x") and tmp / "file.txt", "not a folder"),
        (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "not a squeeze run"),
    ],
)
def test_bad_run_directories_are_one_line_errors(squeeze, tmp_path: Path, make, message):
    path = make(tmp_path)
    result = squeeze("eval", str(path), "--metrics", "tiny")
    assert result.code == 2
    assert result.err.count("\n") == 1 and result.err.startswith("error: ") and message in result.err
    assert str(path) in result.err


def test_a_bad_run_among_good_ones_stops_before_any_work(squeeze, run: Path, tmp_path: Path):
    result = squeeze("eval", str(run), str(tmp_path / "nope"), "--metrics", "tiny")
    assert result.code == 2 and not (run / "metrics.json").exists()


def test_a_metric_model_not_in_the_cache_is_a_one_line_error(squeeze, run: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    result = squeeze("eval", str(run), "--metrics", "dreambench")
    assert result.code == 2, result.err
    assert (
        result.err.count("\n") == 1
        and "facebook/dino-vits16" in result.err
        and "--metrics tiny" in result.err
    )
    assert not (run / "metrics.json").exists()


def test_bad_flags(squeeze, run: Path):
    assert squeeze("eval", str(run), "--metrics", "huge").code == 2
    assert squeeze("eval", str(run), "--metrics", "tiny", "--references", str(run / "nope")).code == 2
    assert squeeze("eval", str(run), "--metrics", "tiny", "--clip-t-weight", "0").code == 2
    bad_device = squeeze("eval", str(run), "--metrics", "tiny", "--device", "warp-drive")
    assert bad_device.code == 2 and "--device 'warp-drive': not a device" in bad_device.err
    # The tiny metrics have their own CLIP: --clip gave the same numbers, without a word.
    clip = squeeze("eval", str(run), "--metrics", "tiny", "--clip", "l14")
    assert clip.code == 2 and "--clip l14 has no effect with --metrics tiny" in clip.err
    assert not (run / "metrics.json").exists()


def test_clip_t_text_names_the_class_not_the_subject():
    image = RunImage("0" * 16, "dog8", 0, 0, "a dog8 on the beach, dog8-like", "dog", "dog8/000-s0.png", ())
    assert clip_t_text(image) == "a dog on the beach, dog8-like"
    same = RunImage("0" * 16, "dog", 0, 0, "a dog in the snow", "dog", "dog/000-s0.png", ())
    assert clip_t_text(same) == "a dog in the snow"
    # A class noun is text, never a regular expression's replacement template (a feed's `AC\DC`, `\1`).
    for noun in ("AC\\DC adapter", "mug \\1", "jar \\g<0>"):
        odd = RunImage("0" * 16, "sku-1", 0, 0, "a sku-1 on a shelf", noun, "sku-1/000-s0.png", ())
        assert clip_t_text(odd) == f"a {noun} on a shelf"


@pytest.mark.slow
def test_two_processes_split_the_images_and_match_one_process(squeeze, run: Path, tmp_path: Path):
    import os
    import socket
    import subprocess
    import sys

    single = tmp_path / "single"
    shutil.copytree(run, single)
    evaluate(squeeze, str(single))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
        "--dynamo_backend", "no", "-m", "squeeze_cli", "eval", str(run), "--metrics", "tiny", "--json",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)["runs"][0]  # one document: only the main process prints
    assert summary["cache"] == {"computed": 2 * NUM_IMAGES, "reused": 0}
    two, one = read_rows(run), read_rows(single)
    assert [r["image"] for r in two] == [r["image"] for r in one]
    for a, b in zip(two, one, strict=True):
        for metric in METRICS:
            assert a[metric] == pytest.approx(b[metric], abs=1e-5)


def test_a_refusal_of_the_main_process_ends_every_process(run: Path, monkeypatch):
    """Under `accelerate launch`, the main process alone writes a run's scores: when that failed (a full
    disk), the others went on to the next run and waited for the main one in its collective, until the
    launcher ended them by SIGTERM. Now every process ends with the error's exit code."""
    import threading

    from squeeze_cli import processes
    from squeeze_cli.errors import OtherProcessError
    from squeeze_cli.eval import scoring
    from squeeze_cli.metrics.protocol import make_protocol
    from squeeze_cli.outputs import OutputWriteError

    second = run.parent / "second"
    shutil.copytree(run, second)
    monkeypatch.setattr(processes, "Processes", threads_as_processes(monkeypatch))
    write_metrics = scoring.write_metrics

    def full_disk(evaluation) -> None:
        if threading.current_thread().name == "0":
            path = evaluation.contents.path / "metrics.json"
            raise OutputWriteError(f"{path}: no space left on device", "free some space", path=path)
        write_metrics(evaluation)

    monkeypatch.setattr(scoring, "write_metrics", full_disk)
    runs = scoring.read_runs([run, second], report=False)
    protocol = make_protocol("tiny")
    ended = in_two_threads(
        lambda: scoring.evaluate_runs(runs, protocol, device="cpu", report=False, progress=False)
    )
    assert {rank: type(end) for rank, end in ended.items()} == {0: OutputWriteError, 1: OtherProcessError}
    assert isinstance(ended[1], OtherProcessError) and ended[1].exit_code == 1


def test_report_links_are_relative_and_percent_encoded(tmp_path: Path):
    from squeeze_cli.eval.report import _link

    (tmp_path / "run").mkdir()
    assert _link(tmp_path / "my refs" / "#1 dog.jpg", tmp_path / "run") == "../my%20refs/%231%20dog.jpg"
    assert _link(tmp_path / "run" / "dog" / "000-s0.png", tmp_path / "run") == "dog/000-s0.png"


def test_the_merged_index_has_the_final_word_over_a_shards(squeeze, run: Path):
    shard = run / "shards" / "0-of-2"
    shard.mkdir(parents=True)
    first = json.loads((run / "index.jsonl").read_text().splitlines()[0])
    failed = {**first, "status": "failed", "error": "out of memory"}  # the shard failed it; the merge retried
    (shard / "index.jsonl").write_text(json.dumps(failed) + "\n")
    summary = evaluate(squeeze, str(run))["runs"][0]
    assert summary["images"] == NUM_IMAGES and summary["failed"] == []


def test_a_cached_eval_and_status_import_no_model_library(squeeze, run: Path) -> None:
    """Scores all cached: `eval` reads sidecars and the cache, `status` the run's files; neither imports
    torch, diffusers or transformers (they were ~75 % of a cached eval's time)."""
    evaluate(squeeze, str(run))  # fills the cache (and the tiny metric models) in this process
    script = (
        "import sys\n"
        "from squeeze_cli.cli import main\n"
        "for argv in (['eval', sys.argv[1], '--metrics', 'tiny', '--no-report'], ['status', sys.argv[1]]):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code in (0, None), (argv, exit.code)\n"
        "print('HEAVY', sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(run)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "0 computed" in result.stdout and result.stdout.splitlines()[-1] == "HEAVY []", result.stdout


@pytest.mark.parametrize("folder", ["nope", "not-a-run"])
def test_a_bad_run_folder_is_said_before_any_metric_model_is_built(tmp_path: Path, folder: str) -> None:
    """`eval /nope --metrics tiny` built its tiny metric models first (~22 s on a fresh cache) before
    saying "/nope: no such folder"."""
    (tmp_path / "not-a-run").mkdir()
    cache = tmp_path / "cache"
    script = (
        "import sys\n"
        "from squeeze_cli.cli import main\n"
        "try:\n"
        "    main(['eval', sys.argv[1], '--metrics', 'tiny'])\n"
        "except SystemExit as exit:\n"
        "    print('EXIT', exit.code)\n"
        "print('HEAVY', sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / folder)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "SQUEEZE_CACHE": str(cache)},
        timeout=300,
    )
    assert result.stdout.splitlines() == ["EXIT 2", "HEAVY []"], result.stdout + result.stderr[-3000:]
    assert f"{tmp_path / folder}: no" in result.stderr  # "no such folder", "not a squeeze run"
    assert not cache.exists() or not any(cache.iterdir())  # no metric model built


def test_side_by_side_rows_compare_the_same_prompt(squeeze, run: Path, tmp_path: Path):
    """A row is a prompt, not a prompt number: the other run's manifest puts its prompts in another order
    and adds one, so `#0` is "in the snow" in one run and "on the beach" in the other."""
    reordered = MANIFEST.replace(
        "      - a {class} in the snow\n      - a {class} on the beach\n",
        "      - a {class} on the beach\n      - a {class} in the snow\n      - a {class} in a bucket\n",
    )
    other = gen_example_run(tmp_path / "project", squeeze, reordered)
    assert squeeze("eval", str(run), str(other), "--metrics", "tiny").code == 0
    prompt_of = {
        (folder, row["image"]): row["prompt"] for folder in (run, other) for row in read_rows(folder)
    }
    rows = {}
    for cells in re.findall(r"<tr data-key='[^']*' data-text='[^']*'>(.*?)</tr>", read_report(run)):
        shots = re.findall(r"<td class='shots'>.*?</td>|<td>missing</td>", cells)
        images = [re.findall(r"data-image='([^']*)'", cell) for cell in shots]
        prompts = {
            prompt_of[folder, image]
            for folder, found in zip((run, other), images, strict=True)
            for image in found
        }
        assert len(prompts) == 1, prompts  # one prompt per row, in every run
        rows[prompts.pop()] = [len(found) for found in images]
    assert rows == {
        "a backpack on a table": [2, 2],
        "a dog in the snow": [2, 2],
        "a dog on the beach": [2, 2],
        "a dog in a bucket": [0, 2],  # only the other run has it: an empty cell for the first
    }
    assert list(rows)[-1] == "a dog in a bucket"  # after the first run's prompts


def read_report(run: Path) -> str:
    return (run / "report.html").read_text()
