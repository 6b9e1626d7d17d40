"""The identity gate of `squeeze gen` (`quality:` in the manifest) on the tiny preset and tiny DINO."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from squeeze_cli.gen.gate import SEED_STRIDE, IdentityGate, QualityGate, attempt_seed

REPO = Path(__file__).resolve().parents[1]

MANIFEST = """\
version: 1
recipe: tiny
quality: {quality}
defaults:
  height: 32
  width: 32
  num_inference_steps: 2
  reference_size: 32
  seeds: {seeds}
subjects:
  - name: dog
    class: dog
    references: [images/dog/00.jpg]
    prompts:
      - a {{class}} in the snow
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "examples" / "images", tmp_path / "images")
    return tmp_path


def gen(squeeze, project: Path, quality: str, seeds: str = "[0, 1]", out: str = "out") -> Path:
    (project / f"{out}.yaml").write_text(MANIFEST.format(quality=quality, seeds=seeds))
    result = squeeze("gen", str(project / f"{out}.yaml"), "--out", str(project / out), "--quiet")
    assert result.code == 0, result.err
    return project / out


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_the_seed_sequence():
    assert [attempt_seed(7, k) for k in range(3)] == [7, 7 + SEED_STRIDE, 7 + 2 * SEED_STRIDE]


def test_a_threshold_never_met_keeps_every_attempt_and_the_best_image(squeeze, project: Path):
    out = gen(squeeze, project, "{min_dino: 0.9999, max_attempts: 3}")
    records = [json.loads(p.read_text()) for p in sorted((out / "dog").glob("000-s*.json"))]
    gate = IdentityGate(QualityGate(min_dino=0.9999), "tiny")
    reference = str(project / "images" / "dog" / "00.jpg")
    for record in records:
        quality = record["quality"]
        seeds = [attempt["seed"] for attempt in quality["history"]]
        assert seeds == [attempt_seed(record["seed"], k) for k in range(3)]
        best = max(quality["history"], key=lambda attempt: attempt["dino"])
        assert quality["passed"] is False and quality["attempts"] == 3
        assert (quality["seed"], quality["dino"]) == (best["seed"], best["dino"])
        # The image on disk is the best attempt: its score is the best score.
        on_disk = gate.score(Image.open(out / record["files"]["image"]).convert("RGB"), [reference])
        assert on_disk == pytest.approx(best["dino"], abs=1e-4)
    summary = json.loads((out / "run.json").read_text())
    assert summary["quality"] == {
        "min_dino": 0.9999,
        "max_attempts": 3,
        "gated": 2,
        "regenerated": 2,
        "passed": 0,
        "still_failing": 2,
    }
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [line["quality"]["passed"] for line in index] == [False, False]
    assert "quality" in (out / "manifest.resolved.yaml").read_text()

    # The attempt kept is the image the plain job with that seed makes: the sequence is reproducible.
    chosen = records[0]["quality"]["seed"]
    plain = gen(squeeze, project, "null", seeds=f"[{chosen}]", out="plain")
    assert (
        np.abs(
            pixels(plain / "dog" / f"000-s{chosen}.png") - pixels(out / records[0]["files"]["image"])
        ).max()
        <= 1
    )

    # Resume: nothing is made again and the verdicts stay.
    again = squeeze("gen", str(project / "out.yaml"), "--out", str(out))
    assert again.code == 0
    assert "0 generated, 2 already done" in again.out
    assert "quality: 2 images gated (DINO >= 0.9999), 2 remade, 2 still below" in again.out
    assert [json.loads(p.read_text()) for p in sorted((out / "dog").glob("000-s*.json"))] == records


def test_a_threshold_met_at_once_makes_one_image(squeeze, project: Path):
    out = gen(squeeze, project, "{min_dino: -1.0}")
    for sidecar in (out / "dog").glob("000-s*.json"):
        quality = json.loads(sidecar.read_text())["quality"]
        assert (
            quality["attempts"] == 1
            and quality["passed"] is True
            and quality["seed"] == quality["history"][0]["seed"]
        )
    summary = json.loads((out / "run.json").read_text())["quality"]
    assert (summary["gated"], summary["regenerated"], summary["still_failing"]) == (2, 0, 0)


@pytest.mark.parametrize(
    "quality, message",
    [
        ("{min_dino: 2}", "quality.min_dino"),
        ("{min_dino: 0.5, max_attempts: 0}", "quality.max_attempts"),
        ("{max_attempts: 3}", "missing required key `min_dino`"),
        ("{min_dino: 0.5, tries: 3}", "quality.tries"),
    ],
)
def test_bad_quality_sections_are_located_errors(squeeze, project: Path, quality: str, message: str):
    (project / "m.yaml").write_text(MANIFEST.format(quality=quality, seeds="[0]"))
    result = squeeze("validate", str(project / "m.yaml"))
    assert result.code == 2 and message in result.err and "m.yaml:3" in result.err, result.err


def test_shards_with_the_gate_merge_their_verdicts(squeeze, project: Path):
    (project / "m.yaml").write_text(
        MANIFEST.format(quality="{min_dino: 0.9999, max_attempts: 2}", seeds="[0, 1, 2]")
    )
    for shard in ("0/2", "1/2", None):
        args = ["gen", str(project / "m.yaml"), "--out", str(project / "out"), "--quiet"]
        result = squeeze(*args, *(["--shard", shard] if shard else []))
        assert result.code == 0, result.err
    summary = json.loads((project / "out" / "run.json").read_text())
    assert summary["jobs"]["skipped"] == 3
    assert summary["quality"]["gated"] == 3 and summary["quality"]["regenerated"] == 3
    index = [json.loads(line) for line in (project / "out" / "index.jsonl").read_text().splitlines()]
    assert sorted(line["quality"]["attempts"] for line in index) == [2, 2, 2]
