"""Resume follows the job id and trusts only what it can check (docs/outputs.md, "What counts as
finished"; docs/reliability.md): identical subjects keep every image, a truncated or edited image or grid
is made again, prompts and seeds may be inserted, removed and reordered without anything finished being
generated again, and the index holds one line per image path, in strict JSON."""

from __future__ import annotations

import errno
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support import flip_byte_in_place
from test_outputs import make_job, make_record, solid

from squeeze_cli import outputs
from squeeze_cli.errors import EXIT_OK
from squeeze_cli.outputs import grids, layout, records
from squeeze_cli.outputs.resume import find_finished, move_to_positions

HEAD = """\
version: 1
recipe: tiny
defaults:
  height: 32
  width: 32
  num_inference_steps: 2
  reference_size: 32
  seeds: {seeds}
subjects:
"""


def subject(name: str, prompts: list[str], references: str = "images/dog/*.jpg") -> str:
    lines = [f"  - name: {name}", "    class: dog", f"    references: [{references}]", "    prompts:"]
    return "\n".join(lines + [f"      - {prompt}" for prompt in prompts]) + "\n"


def strict_loads(text: str):
    def refuse(name: str):
        raise ValueError(f"{name} in strict JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def run(make_project, squeeze):
    """`run(manifest text)`: writes it as m.yaml, runs `squeeze gen` into OUT; returns OUT's run.json."""
    project = make_project()

    def go(text: str, *flags: str) -> dict:
        (project / "m.yaml").write_text(text)
        result = squeeze("gen", str(project / "m.yaml"), "--out", str(project / "out"), "--quiet", *flags)
        assert result.code == EXIT_OK, result.err
        return json.loads((project / "out" / "run.json").read_text())

    def dry_run(text: str) -> str:
        (project / "m.yaml").write_text(text)
        result = squeeze("gen", str(project / "m.yaml"), "--out", str(project / "out"), "--dry-run")
        assert result.code == EXIT_OK, result.err
        return result.out

    go.dry_run = dry_run  # type: ignore[attr-defined]
    go.out = project / "out"  # type: ignore[attr-defined]
    go.project = project  # type: ignore[attr-defined]
    return go


def assert_consistent(out: Path, jobs) -> None:
    """Disk, index and grids agree: every planned job's image is under its position's name with a
    sidecar naming its id, the index has one line per image path and that image's job id, nothing is left
    parked, and every grid decodes and records the inputs its images give."""
    for job in jobs:
        sidecar = strict_loads(layout.sidecar_path(out, job).read_text())
        assert sidecar["job_id"] == job.job_id and sidecar["prompt"] == job.prompt
        assert sidecar["prompt_index"] == job.prompt_index
        assert sidecar["files"]["image"] == layout.image_name(job)
        with Image.open(layout.image_path(out, job)) as image:
            image.load()
    lines = [strict_loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    images = [line["image"] for line in lines]
    assert len(images) == len(set(images)), "one line per image path"
    for line in lines:
        on_disk = strict_loads((out / line["sidecar"]).read_text())
        assert on_disk["job_id"] == line["job_id"] and on_disk["prompt"] == line["prompt"]
    assert {line["job_id"] for line in lines} >= {job.job_id for job in jobs}
    assert not list(out.glob("*/moving-*")) and not list(out.glob("*/.*.tmp"))
    finished = find_finished(out, jobs)
    assert set(finished) == {job.job_id for job in jobs}
    for job in jobs:
        grid = layout.grid_path(out, job.subject, job.prompt_index)
        prompt_jobs = [j for j in jobs if j.subject == job.subject and j.prompt_index == job.prompt_index]
        rows = [
            (
                job.prompt_index,
                job.prompt,
                [(j.seed, j.job_id, finished[j.job_id].sha256) for j in prompt_jobs],
            )
        ]
        assert grids.view_inputs(grid) == grids.views_inputs("grid", job.references, rows)
        with Image.open(grid) as image:
            image.load()  # whole


# 9.1: identical jobs in two subjects -------------------------------------------------------------------


def test_identical_subjects_keep_every_image_and_a_lost_one_is_made_again(run, plan_of) -> None:
    text = HEAD.format(seeds="[0, 1]") + subject("a", ["a {class}"]) + subject("b", ["a {class}"])
    summary = run(text)
    jobs = plan_of(run.project / "m.yaml")
    assert len({job.job_id for job in jobs}) == 4
    assert summary["jobs"]["succeeded"] == 4 and len(list(run.out.glob("*/0*.png"))) == 4
    assert len((run.out / "index.jsonl").read_text().splitlines()) == 4
    (run.out / "b" / "000-s1.png").unlink()
    summary = run(text)
    assert summary["jobs"]["succeeded"] == 1 and summary["jobs"]["skipped"] == 3
    assert_consistent(run.out, jobs)


# 9.2: resume checks what it trusts --------------------------------------------------------------------


def test_truncated_and_edited_images_are_made_again_with_the_same_pixels(run, plan_of) -> None:
    text = HEAD.format(seeds="[0, 1, 2]") + subject("dog", ["a {class}", "a {class} on a rug"])
    run(text)
    jobs = plan_of(run.project / "m.yaml")
    truncated, edited = run.out / "dog" / "000-s1.png", run.out / "dog" / "001-s2.png"
    originals = {path: path.read_bytes() for path in (truncated, edited)}
    truncated.write_bytes(originals[truncated][: len(originals[truncated]) // 2])
    data = bytearray(originals[edited])
    data[-30] ^= 0xFF  # same size, other bytes: only the hash tells
    edited.write_bytes(bytes(data))
    summary = run(text)
    assert summary["jobs"]["succeeded"] == 2 and summary["jobs"]["skipped"] == 4
    for path, original in originals.items():
        with Image.open(path) as now, Image.open(io.BytesIO(original)) as before:
            difference = np.asarray(now, dtype=int) - np.asarray(before, dtype=int)
            assert np.abs(difference).max() <= 1  # docs/reliability.md: same machine, same pixels
    assert_consistent(run.out, jobs)


def test_a_sidecar_that_does_not_vouch_for_its_png_is_not_finished(tmp_path) -> None:
    jobs = [make_job(seed=seed) for seed in range(3)]
    for job in jobs:
        outputs.save_image(tmp_path, job, solid((30, 60, 90)), make_record(job))
    sidecar = layout.sidecar_path(tmp_path, jobs[0])
    record = json.loads(sidecar.read_text())
    facts = record.pop(records.PNG_FILE_KEY)
    sidecar.write_text(json.dumps(record))  # an older sidecar, without the PNG's size and hash
    assert facts["size"] == layout.image_path(tmp_path, jobs[0]).stat().st_size
    other = layout.sidecar_path(tmp_path, jobs[1])
    record = json.loads(other.read_text())
    record[records.PNG_FILE_KEY]["sha256"] = "0" * 64
    other.write_text(json.dumps(record))
    assert set(find_finished(tmp_path, jobs, verify=True)) == {jobs[2].job_id}
    # Without --verify an untouched PNG's stat vouches for it; a sidecar whose stat is not the PNG's
    # (a copied folder) falls back on the hash, which this one fails.
    assert set(find_finished(tmp_path, jobs)) == {jobs[1].job_id, jobs[2].job_id}
    record[records.PNG_FILE_KEY]["mtime_ns"] += 1
    other.write_text(json.dumps(record))
    assert set(find_finished(tmp_path, jobs)) == {jobs[2].job_id}
    # The PNG's own chunk carries the record without the sidecar-only facts about the file.
    assert records.PNG_FILE_KEY not in records.read_png_record(layout.image_path(tmp_path, jobs[2]))


def _count_hashes(monkeypatch) -> list[str]:
    from squeeze_cli.outputs import resume

    hashed: list[str] = []
    real = resume.file_sha256
    monkeypatch.setattr(resume, "file_sha256", lambda path: hashed.append(str(path)) or real(path))
    return hashed


def test_a_no_op_resume_trusts_a_matching_stat_and_reads_no_image(tmp_path, monkeypatch) -> None:
    jobs = [make_job(seed=seed) for seed in range(4)]
    for job in jobs:
        outputs.save_image(tmp_path, job, solid((30, 60, 90)), make_record(job))
    hashed = _count_hashes(monkeypatch)
    assert set(find_finished(tmp_path, jobs)) == {job.job_id for job in jobs}
    assert hashed == []
    assert set(find_finished(tmp_path, jobs, verify=True)) == {job.job_id for job in jobs}
    assert len(hashed) == len(jobs)
    # A stat that differs (here the mtime) is checked by hash: a touched file is still finished.
    png = layout.image_path(tmp_path, jobs[1])
    os.utime(png, ns=(1, 1))
    hashed.clear()
    assert set(find_finished(tmp_path, jobs)) == {job.job_id for job in jobs}
    assert hashed == [str(png)]


def test_a_rerun_of_the_same_plan_does_not_write_the_resolved_manifest_again(run, monkeypatch) -> None:
    """Its YAML is most of a no-op rerun at 100,000 jobs: the header's fingerprint says it is current."""
    from squeeze_cli.manifest.loaded import LoadedManifest

    text = HEAD.format(seeds="[0, 1]") + subject("dog", ["a {class}"])
    run(text)
    resolved = run.project / "out" / "manifest.resolved.yaml"
    written = []
    real_yaml = LoadedManifest.resolved_yaml
    monkeypatch.setattr(
        LoadedManifest, "resolved_yaml", lambda self, *a: written.append(1) or real_yaml(self, *a)
    )
    before = resolved.read_text()
    run(text)
    assert written == [] and resolved.read_text() == before
    run(HEAD.format(seeds="[0, 1]") + subject("dog", ["a {class}", "a {class} on a rug"]))  # a new plan
    assert written == [1] and "a {class} on a rug" in resolved.read_text()
    resolved.write_text(before.replace("# fingerprint: ", "# (edited) "))  # no fingerprint: written again
    run(text)
    assert len(written) == 2 and "# fingerprint: " in resolved.read_text()


def test_a_no_op_rerun_reads_each_record_once_and_checks_no_image_path(run, monkeypatch) -> None:
    """A rerun with every image and view current: the index is repaired once (not again at the end), and
    no image path is checked for drawing (`safe_join` resolves every part: minutes at 100k images)."""
    from squeeze_cli.outputs import index, views

    text = HEAD.format(seeds="[0, 1]") + subject("dog", ["a {class}", "a {class} on a rug"])
    run(text)
    repairs, paths = [], []
    real_repair, real_path = index.repair_index, views.image_path
    monkeypatch.setattr(outputs, "repair_index", lambda *a, **k: repairs.append(1) or real_repair(*a, **k))
    monkeypatch.setattr(views, "image_path", lambda *a: paths.append(a) or real_path(*a))
    summary = run(text)
    assert summary["jobs"]["skipped"] == 4 and summary["jobs"]["succeeded"] == 0
    assert len(repairs) == 1 and paths == []


def test_an_image_edited_with_its_mtime_put_back_is_caught_by_verify(run, squeeze) -> None:
    text = HEAD.format(seeds="[0, 1]") + subject("dog", ["a {class}"])
    run(text)
    out = run.out
    flip_byte_in_place(out / "dog" / "000-s1.png", -30)
    assert squeeze("status", str(out)).code == EXIT_OK  # trusted by its stat, as documented
    status = squeeze("status", str(out), "--verify", "--json")
    assert status.code == 1 and json.loads(status.out)["jobs"]["done"] == 1, status.out
    # The other image's sidecar as an older squeeze wrote it: gen checks it by hash and records its stat.
    old = out / "dog" / "000-s0.json"
    record = json.loads(old.read_text())
    stamp = {key: record[records.PNG_FILE_KEY].pop(key) for key in ("mtime_ns", "inode")}
    old.write_text(json.dumps(record))
    summary = run(text, "--verify")
    assert summary["jobs"]["succeeded"] == 1 and summary["jobs"]["skipped"] == 1
    assert squeeze("status", str(out), "--verify").code == EXIT_OK
    assert json.loads(old.read_text())[records.PNG_FILE_KEY] == {**record[records.PNG_FILE_KEY], **stamp}


def test_an_old_sidecar_without_the_stat_is_hashed_once_then_stamped(tmp_path, monkeypatch) -> None:
    jobs = [make_job(seed=seed) for seed in range(3)]
    for job in jobs:
        outputs.save_image(tmp_path, job, solid((30, 60, 90)), make_record(job))
    old_records = {}
    for job in jobs:  # as an older squeeze wrote them: size and sha256 only
        sidecar = layout.sidecar_path(tmp_path, job)
        record = json.loads(sidecar.read_text())
        record[records.PNG_FILE_KEY] = {key: record[records.PNG_FILE_KEY][key] for key in ("size", "sha256")}
        sidecar.write_text(json.dumps(record))
        old_records[job.job_id] = record
    hashed = _count_hashes(monkeypatch)
    done = find_finished(tmp_path, jobs)
    assert set(done) == {job.job_id for job in jobs} and len(hashed) == len(jobs)
    assert outputs.record_stamps(tmp_path, jobs, done) == len(jobs)
    for job in jobs:  # only the stamp was added: nothing the sidecar held is lost
        record = json.loads(layout.sidecar_path(tmp_path, job).read_text())
        facts = record[records.PNG_FILE_KEY]
        assert {key: facts[key] for key in ("size", "sha256")} == old_records[job.job_id][
            records.PNG_FILE_KEY
        ]
        assert {**record, records.PNG_FILE_KEY: old_records[job.job_id][records.PNG_FILE_KEY]} == old_records[
            job.job_id
        ]
    hashed.clear()
    done = find_finished(tmp_path, jobs)
    assert set(done) == {job.job_id for job in jobs} and hashed == []
    assert outputs.record_stamps(tmp_path, jobs, done) == 0


def test_grids_not_drawn_from_the_images_on_disk_are_redrawn(run, plan_of) -> None:
    text = HEAD.format(seeds="[0, 1]") + subject("dog", ["a {class}", "a {class} on a rug"])
    run(text)
    jobs = plan_of(run.project / "m.yaml")
    out = run.out
    grid, other, sheet = (
        out / "dog" / "grid-000.png",
        out / "dog" / "grid-001.png",
        out / "dog" / "contact-sheet.png",
    )
    untouched = other.stat().st_mtime_ns
    grid.write_bytes(grid.read_bytes()[:-100])  # cut short: never redrawn when judged by mtime
    Image.new("RGB", (8, 8)).save(sheet)  # a whole PNG, but not drawn from these images
    later = os.stat(out / "dog" / "001-s0.png").st_mtime_ns + 10**9
    os.utime(out / "dog" / "001-s0.png", ns=(later, later))  # a newer mtime alone changes nothing
    summary = run(text)
    assert summary["jobs"]["succeeded"] == 0
    assert other.stat().st_mtime_ns == untouched
    assert_consistent(out, jobs)
    with Image.open(sheet) as image:
        assert image.size != (8, 8) and image.info[grids.VIEW_INPUTS_KEY]


def test_a_grid_drawn_around_a_missing_image_is_redrawn_when_it_is_made(tmp_path) -> None:
    jobs = [make_job(seed=seed) for seed in range(2)]
    outputs.save_image(tmp_path, jobs[0], solid((200, 0, 0)), make_record(jobs[0]))
    outputs.update_views(tmp_path, jobs, find_finished(tmp_path, jobs), lambda: False)  # a failed job
    grid = layout.grid_path(tmp_path, "dog", 0)
    first = grids.view_inputs(grid)
    outputs.update_views(tmp_path, jobs, find_finished(tmp_path, jobs), lambda: False)
    assert grids.view_inputs(grid) == first  # nothing changed: not redrawn
    outputs.save_image(tmp_path, jobs[1], solid((0, 200, 0)), make_record(jobs[1]))
    outputs.update_views(tmp_path, jobs, find_finished(tmp_path, jobs), lambda: False)
    assert grids.view_inputs(grid) not in (None, first)


# 9.3: the index describes the disk, in strict JSON ------------------------------------------------------


def test_the_index_keeps_one_line_per_image_after_prompts_and_references_change(run, plan_of) -> None:
    text = HEAD.format(seeds="[0, 1, 2]") + subject("dog", ["a {class}", "a {class} on a rug"])
    run(text)
    changed = HEAD.format(seeds="[0, 1, 2]") + subject(
        "dog", ["a {class} in the rain", "a {class} on a rug"], references="images/dog/00.jpg"
    )
    summary = run(changed)
    assert summary["jobs"]["succeeded"] == 6  # the references changed: every job is new
    jobs = plan_of(run.project / "m.yaml")
    lines = (run.out / "index.jsonl").read_text().splitlines()
    assert len(lines) == 6
    assert {strict_loads(line)["prompt"] for line in lines} == {"a dog in the rain", "a dog on a rug"}
    assert_consistent(run.out, jobs)


def test_nan_and_infinity_never_reach_a_sidecar_or_the_index(tmp_path) -> None:
    job = make_job()
    record = make_record(job, timings={"total": float("nan"), "batch": float("inf"), "batch_size": 1})
    outputs.save_image(tmp_path, job, solid((1, 2, 3)), record)
    outputs.append_index(tmp_path, outputs.index_entry(record))
    sidecar = strict_loads(layout.sidecar_path(tmp_path, job).read_text())
    assert sidecar["timings"] == {"total": None, "batch": None, "batch_size": 1}
    assert strict_loads((tmp_path / "index.jsonl").read_text())["seconds"] is None
    assert records.read_png_record(layout.image_path(tmp_path, job))["timings"]["batch"] is None
    outputs.write_run_summary(tmp_path, {"images_per_second": float("-inf")})
    assert strict_loads((tmp_path / "run.json").read_text()) == {"images_per_second": None}
    # A line an older version wrote with NaN is a broken line: the repair rewrites it from the sidecar.
    (tmp_path / "index.jsonl").write_text(f'{{"job_id": "{job.job_id}", "status": "ok", "seconds": NaN}}\n')
    assert outputs.read_index(tmp_path) == []
    found = find_finished(tmp_path, [job])
    assert outputs.repair_index(tmp_path, {job.job_id: found[job.job_id].entry})
    assert strict_loads((tmp_path / "index.jsonl").read_text())["job_id"] == job.job_id


# 10.1: resume by job id ---------------------------------------------------------------------------------


def test_inserting_removing_and_reordering_prompts_and_seeds_never_redoes_finished_work(run, plan_of) -> None:
    first = HEAD.format(seeds="[0, 1]") + subject("dog", ["a {class} on a rug", "a {class} in a box"])
    assert run(first)["jobs"]["succeeded"] == 4
    made = {path.name: path.read_bytes() for path in run.out.glob("dog/00*.png")}
    rug, box = made["000-s0.png"], made["001-s1.png"]

    # A prompt inserted at the top, the seeds reordered and one added: only the new jobs run.
    second = HEAD.format(seeds="[1, 0, 2]") + subject(
        "dog", ["a {class} at the beach", "a {class} on a rug", "a {class} in a box"]
    )
    assert "9 jobs over 1 subject, 4 already done, 5 to generate" in run.dry_run(second)
    summary = run(second)
    assert summary["jobs"] == {**summary["jobs"], "skipped": 4, "succeeded": 5}
    assert (run.out / "dog" / "001-s0.png").read_bytes() == rug  # moved, not remade
    assert (run.out / "dog" / "002-s1.png").read_bytes() == box
    assert_consistent(run.out, plan_of(run.project / "m.yaml"))

    # The new prompt removed, the other two swapped, a seed dropped: nothing to generate at all.
    third = HEAD.format(seeds="[2, 1]") + subject("dog", ["a {class} in a box", "a {class} on a rug"])
    summary = run(third)
    assert summary["jobs"]["succeeded"] == 0 and summary["jobs"]["skipped"] == 4
    assert (run.out / "dog" / "001-s1.png").read_bytes() == made["000-s1.png"]
    assert (run.out / "dog" / "000-s1.png").read_bytes() == box
    jobs = plan_of(run.project / "m.yaml")
    assert_consistent(run.out, jobs)
    # The removed prompt's images had names the moved ones took; seed 0's files are an earlier plan's.
    index = [strict_loads(line) for line in (run.out / "index.jsonl").read_text().splitlines()]
    assert all("beach" not in line["prompt"] for line in index if line["image"].split("-s")[1] != "0.png")


def test_a_move_cut_short_is_finished_by_the_next_resume(tmp_path, monkeypatch) -> None:
    before = [make_job(prompt_index=p, seed=0, job_id=f"{p:016x}") for p in range(3)]
    for job in before:
        outputs.save_image(tmp_path, job, solid((40 * job.prompt_index, 0, 0)), make_record(job))
    pixels = {job.job_id: layout.image_path(tmp_path, job).read_bytes() for job in before}
    # The prompts rotated: 0 -> 1 -> 2 -> 0.
    after = [make_job(prompt_index=(job.prompt_index + 1) % 3, seed=0, job_id=job.job_id) for job in before]
    after.sort(key=lambda job: job.prompt_index)
    done = find_finished(tmp_path, after)
    assert set(done) == set(pixels) and all(done[j.job_id].stem != layout.image_stem(j) for j in after)

    real_replace, calls = os.replace, []

    def dies_on_the_fourth_rename(source, destination):
        calls.append(destination)
        if len(calls) == 4:
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(source, destination)

    monkeypatch.setattr(os, "replace", dies_on_the_fourth_rename)
    with pytest.raises(outputs.OutputWriteError):
        move_to_positions(tmp_path, after, done)
    monkeypatch.undo()
    done = find_finished(tmp_path, after)  # each image still found once, under one name or another
    assert set(done) == set(pixels)
    done = move_to_positions(tmp_path, after, done)
    for job in after:
        assert layout.image_path(tmp_path, job).read_bytes() == pixels[job.job_id]
        assert json.loads(layout.sidecar_path(tmp_path, job).read_text())["prompt_index"] == job.prompt_index
    assert set(find_finished(tmp_path, after, anywhere=False)) == set(pixels)


def test_a_folder_made_under_another_job_id_scheme_is_made_again_and_its_index_replaced(
    run, plan_of, monkeypatch
) -> None:
    from squeeze_cli import plan

    text = HEAD.format(seeds="[0, 1]") + subject("dog", ["a {class}"])
    monkeypatch.setattr(plan, "JOB_ID_SCHEME", b"squeeze-job-v1\n")  # as an older squeeze named its jobs
    run(text)
    old_ids = {
        line["job_id"] for line in map(strict_loads, (run.out / "index.jsonl").read_text().splitlines())
    }
    monkeypatch.undo()
    jobs = plan_of(run.project / "m.yaml")
    assert not old_ids & {job.job_id for job in jobs}
    summary = run(text)
    assert summary["jobs"]["succeeded"] == 2 and summary["jobs"]["skipped"] == 0
    lines = [strict_loads(line) for line in (run.out / "index.jsonl").read_text().splitlines()]
    assert {line["job_id"] for line in lines} == {job.job_id for job in jobs} and len(lines) == 2
    assert_consistent(run.out, jobs)
