"""Slicing the plan to try a feed (`--only PATTERN[,PATTERN]`, `--limit N`): the jobs keep their ids, so a
sliced run and the whole run share their finished images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from squeeze_cli.errors import UsageError
from squeeze_cli.plan import select_jobs

MANIFEST = """\
version: 1
recipe: tiny
defaults: {height: 32, width: 32, num_inference_steps: 2, reference_size: 32, seeds: [0]}
subjects:
  - {name: TP-1, class: teapot, references: [images/teapot/00.jpg], prompts: ['a {class}']}
  - {name: BP-2, class: backpack, references: [images/backpack/00.jpg], prompts: ['a {class}']}
  - name: BP-3
    class: backpack
    references: [images/backpack/02.jpg]
    prompts: ['a {class}', 'a red {class}']
"""


def test_a_slice_keeps_the_ids_of_the_whole_plan(make_project, plan_of) -> None:
    jobs = plan_of(make_project(m=MANIFEST) / "m.yaml")
    ids = {job.job_id: job.subject for job in jobs}
    for only, limit, subjects in [
        (("bp-*",), None, ["BP-2", "BP-3", "BP-3"]),  # any case
        (("TP-1", "BP-3"), 1, ["TP-1"]),  # the first N of those matched, in plan order
        ((), 2, ["TP-1", "BP-2"]),
    ]:
        sliced = select_jobs(jobs, only, limit)
        assert [job.subject for job in sliced] == subjects
        assert all(ids[job.job_id] == job.subject for job in sliced)
    with pytest.raises(UsageError, match=r"--only SKU-\*: no subject matches it"):
        select_jobs(jobs, ["BP-2", "SKU-*"])


def test_validate_prints_the_slice_and_refuses_a_pattern_that_matches_nothing(make_project, squeeze) -> None:
    manifest = str(make_project(m=MANIFEST) / "m.yaml")
    result = squeeze("validate", manifest, "--only", "BP-*", "--limit", "1")
    assert result.code == 0, result.err
    assert "  BP-2  class backpack: 1 reference, 1 prompt, 1 job" in result.out
    assert "TP-1" not in result.out and "BP-3" not in result.out
    assert "jobs      1 (a slice of the 4 planned: --only, --limit)" in result.out
    plan = json.loads(squeeze("validate", manifest, "--only", "BP-*", "--limit", "1", "--json").out)
    assert (plan["jobs"], plan["jobs_in_the_whole_plan"], [s["name"] for s in plan["subjects"]]) == (
        1,
        4,
        ["BP-2"],
    )
    result = squeeze("validate", manifest, "--only", "TP-1,nothing*")
    assert result.code == 2
    assert result.err.strip() == (
        "error: --only nothing*: no subject matches it (hint: the subjects: TP-1, BP-2, BP-3)"
    )


def _images(out: Path) -> dict[str, int]:
    """Each image's inode and modification time: a rewritten image changes them."""
    return {
        str(path.relative_to(out)): path.stat().st_mtime_ns ^ path.stat().st_ino
        for path in sorted(out.glob("*/0*.png"))
    }


@pytest.mark.slow  # three runs of gen
def test_a_sliced_run_and_the_whole_run_share_their_images(make_project, squeeze) -> None:
    project = make_project(m=MANIFEST)
    manifest, out = str(project / "m.yaml"), project / "squeeze-out"
    assert squeeze("gen", manifest, "--only", "BP-*", "--limit", "1", "--quiet").code == 0
    sliced = _images(out)
    assert list(sliced) == ["BP-2/000-s0.png"]
    status = json.loads(squeeze("status", str(out), "--json").out)
    assert (status["jobs"]["done"], status["jobs"]["pending"], status["complete"]) == (1, 3, False)

    assert squeeze("gen", manifest, "--quiet").code == 0
    whole = _images(out)
    assert len(whole) == 4 and whole["BP-2/000-s0.png"] == sliced["BP-2/000-s0.png"]  # not redone
    run = json.loads((out / "run.json").read_text())
    assert (run["jobs"]["skipped"], run["jobs"]["succeeded"]) == (1, 3)
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert sorted(line["image"] for line in index) == sorted(whole)

    # The other way round: everything is done, so the slice has nothing to do and leaves the rest alone.
    assert squeeze("gen", manifest, "--only", "TP-1", "--quiet").code == 0
    assert _images(out) == whole
    run = json.loads((out / "run.json").read_text())
    assert (run["jobs"]["planned"], run["jobs"]["skipped"], run["jobs"]["succeeded"]) == (1, 1, 0)
    assert len((out / "index.jsonl").read_text().splitlines()) == 4
