"""`squeeze eval --rules NAME [--variant NAME]`: each image's marketplace check (measured as `squeeze check`
measures it) in metrics.jsonl, the counts in metrics.json and the text, pass or fail in report.html."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from support import FOUR_SEEDS, one_error_line
from test_checks import product_shot

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, squeeze) -> Path:
    """A tiny run of four images (32 px: every master fails amazon-main's 1000 px), each job given an
    `amazon` variant in the index as `gen` records one: two pass, one is too small a product, one has none."""
    project = tmp_path_factory.mktemp("checks")
    shutil.copytree(REPO / "examples" / "images", project / "images")
    (project / "m.yaml").write_text(FOUR_SEEDS)
    run = project / "run"
    assert squeeze("gen", str(project / "m.yaml"), "--out", str(run), "--quiet").code == 0
    shots = {
        "dog/000-s0.png": product_shot((1000, 1000), (50, 50, 950, 950)),
        "dog/000-s1.png": product_shot((1000, 1000), (400, 40, 600, 960)),
        "dog/000-s2.png": product_shot((1000, 1000), (250, 250, 750, 750)),  # fill 0.5: fails min_fill
    }
    (run / "dog" / "variants" / "amazon").mkdir(parents=True)
    lines = [json.loads(line) for line in (run / "index.jsonl").read_text().splitlines()]
    for line in lines:
        if line["image"] in shots:
            variant = f"dog/variants/amazon/{Path(line['image']).stem}.png"
            shots[line["image"]].save(run / variant)
            line["variants"] = {"amazon": variant}
    (run / "index.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run


def evaluate(squeeze, run: Path, *flags: str) -> tuple[str, dict, dict[str, dict]]:
    result = squeeze("eval", str(run), "--metrics", "tiny", *flags)
    assert result.code == 0, result.err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return result.out, json.loads((run / "metrics.json").read_text()), {row["image"]: row for row in rows}


def test_each_variant_passes_or_fails_with_its_numbers(squeeze, finished_run: Path):
    out, summary, rows = evaluate(squeeze, finished_run, "--rules", "amazon-main", "--variant", "amazon")

    assert summary["checks"] == {"rules": "amazon-main", "variant": "amazon", "passed": 2, "failed": 2}
    assert "checks: amazon-main on variant 'amazon': 2 passed, 2 failed" in out
    assert [rows[f"dog/000-s{seed}.png"]["check"]["passed"] for seed in range(4)] == [
        True,
        True,
        False,
        False,
    ]
    small = rows["dog/000-s2.png"]["check"]
    assert small["failed"] == ["min_fill"]
    assert small["measured"] == {"longest_side": 1000, "border_background": 1.0, "fill": 0.5}
    assert rows["dog/000-s3.png"]["check"]["error"] == "missing: it has no variant 'amazon'"

    report = (finished_run / "report.html").read_text()
    assert report.count("<figure class='fails'") == 2
    assert "fails min_fill (fill 0.5)" in report
    assert "amazon-main on variant &#x27;amazon&#x27;: 2 passed, 2 failed" in report
    assert "<th>failed checks</th>" in report


def test_the_masters_are_checked_without_a_variant(squeeze, finished_run: Path, tmp_path: Path):
    _, summary, rows = evaluate(squeeze, finished_run, "--rules", "amazon-main")
    assert summary["checks"] == {"rules": "amazon-main", "variant": None, "passed": 0, "failed": 4}
    assert all(row["check"]["measured"]["longest_side"] == 32 for row in rows.values())

    own = tmp_path / "small.yaml"  # a user's own rules file: 32 px is enough
    own.write_text("name: small\nmin_longest_side: 32\n")
    _, summary, _ = evaluate(squeeze, finished_run, "--rules", str(own))
    assert summary["checks"] == {"rules": "small", "variant": None, "passed": 4, "failed": 0}

    _, summary, rows = evaluate(squeeze, finished_run)  # without --rules: no checks anywhere
    assert "checks" not in summary and all("check" not in row for row in rows.values())
    assert "failed checks" not in (finished_run / "report.html").read_text()


def test_bad_rules_stop_before_any_work(squeeze, finished_run: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    for name in ("metrics.json", "metrics.jsonl", "report.html"):
        (run / name).unlink(missing_ok=True)
    result = squeeze("eval", str(run), "--metrics", "tiny", "--rules", "no-such-market")
    assert result.code == 2 and "unknown rule set 'no-such-market'" in one_error_line(result.err)
    assert squeeze("eval", str(run), "--metrics", "tiny", "--variant", "amazon").code == 2
    assert not (run / "metrics.json").exists() and not (run / "report.html").exists()


@pytest.mark.parametrize("command", [["eval", "--metrics", "tiny"], ["status"]])
def test_a_variant_without_rules_is_refused_alike(squeeze, finished_run: Path, command: list[str]):
    """`eval` and `status` share `--variant` and its refusal without `--rules` (cli/options.py)."""
    result = squeeze(command[0], str(finished_run), *command[1:], "--variant", "amazon")
    assert result.code == 2
    assert "--variant says which images --rules checks: give --rules too" in result.err
