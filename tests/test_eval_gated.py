"""Runs made with gen's identity gate (`quality:`) are marked as gated in every record, table and report,
and are not presented as DreamBench protocol numbers unless `--allow-gated` (tiny preset, tiny metrics)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

MANIFEST = """\
version: 1
recipe: tiny
{quality}
defaults:
  height: 32
  width: 32
  num_inference_steps: 2
  reference_size: 32
  seeds: [0, 1]
subjects:
  - name: dog
    class: dog
    references: [images/dog/00.jpg]
    prompts:
      - a {{class}} in the snow
"""
GATE = "quality: {min_dino: 0.9999, max_attempts: 2}"  # never met: every image is the better of two


@pytest.fixture(scope="module")
def made_runs(tmp_path_factory, squeeze) -> dict[str, Path]:
    """A gated and an ungated tiny run of the same manifest, made once; tests work on copies."""
    project = tmp_path_factory.mktemp("project")
    shutil.copytree(REPO / "examples" / "images", project / "images")
    runs = {}
    for name, quality in (("gated", GATE), ("plain", "")):
        (project / f"{name}.yaml").write_text(MANIFEST.format(quality=quality))
        result = squeeze("gen", str(project / f"{name}.yaml"), "--out", str(project / name), "--quiet")
        assert result.code == 0, result.err
        runs[name] = project / name
    return runs


@pytest.fixture
def runs(made_runs: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    copies = {}
    for name, path in made_runs.items():
        copies[name] = tmp_path / name
        shutil.copytree(path, copies[name])
    return copies


def sidecars(run: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run / "dog").glob("*.json"))]


def test_every_sidecar_and_run_json_record_the_gate(runs):
    for record in sidecars(runs["gated"]):
        quality = record["quality"]
        assert (quality["min_dino"], quality["max_attempts"], quality["attempts"]) == (0.9999, 2, 2)
    assert json.loads((runs["gated"] / "run.json").read_text())["quality"]["gated"] == 2
    # Without a gate the sidecars and run.json say so, rather than leaving the field out.
    assert [record["quality"] for record in sidecars(runs["plain"])] == [None, None]
    assert json.loads((runs["plain"] / "run.json").read_text())["quality"] is None


def test_eval_marks_a_gated_run_in_metrics_json_the_rows_the_table_and_the_report(squeeze, runs):
    result = squeeze("eval", str(runs["gated"]), "--metrics", "tiny")
    assert result.code == 0, result.err
    assert "gated: 2 of 2 images are the best DINO of up to 2 seeds" in result.out
    assert "DINO and CLIP-I are inflated" in result.out
    assert "overall (gated)" in result.out
    summary = json.loads((runs["gated"] / "metrics.json").read_text())
    assert summary["gate"] == {
        "images": 2,
        "of": 2,
        "regenerated": 2,
        "min_dino": [0.9999],
        "max_attempts": [2],
        "warning": "DINO and CLIP-I are inflated, not DreamBench's protocol (one image per seed)",
    }
    rows = [json.loads(line) for line in (runs["gated"] / "metrics.jsonl").read_text().splitlines()]
    assert [(row["gated"], row["gate_attempts"]) for row in rows] == [(True, 2), (True, 2)]
    report = (runs["gated"] / "report.html").read_text()
    assert "gated: 2 of 2 images" in report and report.count("gated: best DINO of 2 seeds") == 2


def test_an_ungated_run_is_not_marked(squeeze, runs):
    result = squeeze("eval", str(runs["plain"]), "--metrics", "tiny")
    assert result.code == 0, result.err
    assert "gated:" not in result.out and "(gated)" not in result.out
    assert json.loads((runs["plain"] / "metrics.json").read_text())["gate"] is None
    rows = (runs["plain"] / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["gated"] for line in rows] == [False, False]
    assert "gated:" not in (runs["plain"] / "report.html").read_text()


def test_runs_side_by_side_name_the_gated_one(squeeze, runs):
    result = squeeze("eval", str(runs["plain"]), str(runs["gated"]), "--metrics", "tiny")
    assert result.code == 0, result.err
    table = result.out.split("\n\n")[-2]  # the comparison, before the cache line
    assert "gated (gated)" in table and "plain (gated)" not in table
    assert "gated: gated: 2 of 2 images" in table


def test_dreambench_numbers_of_a_gated_run_are_refused_before_any_work(squeeze, runs):
    result = squeeze("eval", str(runs["plain"]), str(runs["gated"]))  # --metrics dreambench
    assert result.code == 2
    line = result.err.strip().splitlines()[-1]
    assert line.startswith(f"error: {runs['gated']}: 2 of 2 images were chosen by gen's identity gate")
    assert "not DreamBench protocol numbers" in line and "--allow-gated" in line
    for run in runs.values():  # refused before a model loads or anything is written
        assert not (run / "metrics.json").exists() and not (run / "metrics-cache.json").exists()


def test_allow_gated_scores_it_under_dreambench_marked_as_gated(squeeze, runs, monkeypatch):
    from squeeze_cli.eval import scoring
    from squeeze_cli.metrics.encoders import Encoder
    from squeeze_cli.metrics.protocol import make_protocol

    tiny = make_protocol("tiny")  # the DreamBench models are not downloaded here: tiny ones stand in
    monkeypatch.setattr(scoring, "_load_encoder", lambda spec, device: Encoder(tiny.encoder(spec.role)))
    result = squeeze("eval", str(runs["gated"]), "--allow-gated", "--json")
    assert result.code == 0, result.err
    summary = json.loads(result.out)["runs"][0]
    assert summary["protocol"]["metric_set"] == "dreambench"
    assert summary["gate"]["images"] == 2 and summary["gate"]["warning"].startswith("DINO and CLIP-I")


def test_a_sidecar_quality_of_the_wrong_type_lists_the_image_as_damaged(squeeze, runs):
    sidecar = runs["gated"] / "dog" / "000-s0.json"
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "quality": [1]}))
    result = squeeze("eval", str(runs["gated"]), "--metrics", "tiny", "--json")
    assert result.code == 0, result.err
    summary = json.loads(result.out)["runs"][0]
    assert summary["images"] == 1 and summary["gate"]["images"] == 1
    assert any("`quality` is a list, not an object" in item for item in summary["missing"])
