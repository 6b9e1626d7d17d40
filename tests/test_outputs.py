"""The output directory contract: names, atomic writes, PNG metadata, resume, the run index (grids and
contact sheets: test_grids.py and test_views.py)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from squeeze_cli import images, outputs
from squeeze_cli.errors import EXIT_INVALID, EXIT_JOBS_FAILED, SqueezeError
from squeeze_cli.outputs.files import (
    OutputWriteError,
    atomic_write_bytes,
    atomic_write_text,
    remove_stale_temp_files,
)
from squeeze_cli.outputs.index import (
    append_index,
    failed_index_entry,
    index_entry,
    read_index,
    repair_index,
    write_resolved_manifest,
    write_run_summary,
)
from squeeze_cli.outputs.layout import (
    UnsafeOutputPathError,
    contact_sheet_path,
    grid_path,
    image_path,
    index_path,
    resolved_manifest_path,
    run_summary_path,
    safe_join,
    sidecar_path,
    subject_dir,
)
from squeeze_cli.outputs.records import (
    encode_png,
    image_record,
    parameters_text,
    read_png_parameters,
    read_png_record,
    save_image,
)
from squeeze_cli.outputs.resume import find_finished, finished_job_ids
from squeeze_cli.params import SamplingParams
from squeeze_cli.plan import Job

STAGE_PLAN = {"num_inference_steps": 4, "stages": [1, 2, 3, 3], "counts": [1, 1, 2]}
VERSIONS = {"python": "3.12", "squeeze_cli": "0.1.0"}


def make_job(
    subject: str = "dog", prompt_index: int = 0, seed: int = 7, job_id: str | None = None, **params
) -> Job:
    return Job(
        index=0,
        job_id=job_id or f"{prompt_index:04x}{seed:012x}",
        subject=subject,
        subject_index=0,
        class_noun="dog",
        prompt_index=prompt_index,
        prompt=f"a photo of dog number {prompt_index}, on a beach",
        seed=seed,
        params=SamplingParams(**params),
        references=("/data/dog/00.jpg",),
        cost=1.0,
    )


def make_record(job: Job, **overrides) -> dict:
    record = image_record(
        job,
        preset_name="tiny",
        model_info={"transformer": {"id": "tiny/flux", "revision": "abc123"}},
        stage_plan=STAGE_PLAN,
        timings={"denoise": 1.23456, "total": 2.0},
        versions=VERSIONS,
    )
    record.update(overrides)
    return record


def solid(color: tuple[int, int, int], size: tuple[int, int] = (64, 64)) -> Image.Image:
    return Image.new("RGB", size, color)


def temp_files(directory: Path) -> list[Path]:
    return [path for path in directory.rglob("*") if path.name.endswith(".tmp")]


# The package ----------------------------------------------------------------------------------------------


def test_code_outside_the_package_uses_its_facade_which_holds_what_it_uses():
    """Production code outside `squeeze_cli.outputs` imports the package, never its modules, and the package
    re-exports exactly the names that code uses (`outputs.X`, `from squeeze_cli.outputs import X`)."""
    import ast
    import types

    package = Path(outputs.__file__).parent
    modules = {path.stem for path in package.glob("*.py")}
    used, bypassing = set(), []
    for path in package.parent.rglob("*.py"):
        if package in path.parents:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "squeeze_cli":
                aliases.update(alias.asname or alias.name for alias in node.names if alias.name == "outputs")
            elif isinstance(node, ast.ImportFrom) and node.module == "squeeze_cli.outputs":
                used.update(alias.name for alias in node.names)
                bypassing += [f"{path.name}: {alias.name}" for alias in node.names if alias.name in modules]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("squeeze_cli.outputs."):
                bypassing.append(f"{path.name}: {node.module}")
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names if alias.name.startswith("squeeze_cli.outputs.")]
                bypassing += [f"{path.name}: {name}" for name in names]
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and getattr(node.value, "id", None) in aliases:
                used.add(node.attr)  # outputs.X
    assert bypassing == []
    exported = {
        name
        for name, value in vars(outputs).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert exported == used


# Names ------------------------------------------------------------------------------------------------


def test_names_come_from_subject_prompt_index_and_seed_never_prompt_text(tmp_path):
    job = make_job(prompt_index=3, seed=123)
    assert image_path(tmp_path, job) == tmp_path / "dog" / "003-s123.png"
    assert sidecar_path(tmp_path, job) == tmp_path / "dog" / "003-s123.json"
    assert grid_path(tmp_path, "dog", 3) == tmp_path / "dog" / "grid-003.png"
    assert contact_sheet_path(tmp_path, "dog") == tmp_path / "dog" / "contact-sheet.png"
    assert index_path(tmp_path) == tmp_path / "index.jsonl"
    assert run_summary_path(tmp_path) == tmp_path / "run.json"
    assert resolved_manifest_path(tmp_path) == tmp_path / "manifest.resolved.yaml"


@pytest.mark.parametrize("parts", [("../x",), ("dog", "..", "..", "x"), ("/etc/passwd",), ("",), ("a\0b",)])
def test_safe_join_refuses_paths_that_leave_the_output_directory(tmp_path, parts):
    with pytest.raises(UnsafeOutputPathError) as caught:
        safe_join(tmp_path / "out", *parts)
    assert caught.value.exit_code == EXIT_INVALID


def test_safe_join_refuses_a_symlink_that_leads_out(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "dog").symlink_to(elsewhere, target_is_directory=True)
    (out / "link.png").symlink_to(elsewhere / "file.png")
    with pytest.raises(UnsafeOutputPathError, match="outside the output directory"):
        safe_join(out, "dog", "000-s1.png")
    with pytest.raises(UnsafeOutputPathError):
        safe_join(out, "link.png")
    with pytest.raises(UnsafeOutputPathError):
        save_image(out, make_job(), solid((1, 2, 3)), make_record(make_job()))
    assert list(elsewhere.iterdir()) == []
    (out / "loop").symlink_to(out / "loop")
    with pytest.raises(SqueezeError):  # refused by safe_join, or (Python ≥ 3.13) by the OS at write time
        atomic_write_bytes(safe_join(out, "loop", "x.png"), b"x")


def test_subject_dir_resolves_only_a_link_and_refuses_one_that_leads_out(tmp_path):
    """`subject_dir` takes one plain name: only a link there can lead out of OUT, so only a link is
    resolved (a no-op rerun of 10,000 subjects resolved 20,000 paths), and one that leads out is refused."""
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    (out / "cat").mkdir(parents=True)
    elsewhere.mkdir()
    (out / "dog").symlink_to(elsewhere, target_is_directory=True)
    (out / "kitten").symlink_to(out / "cat", target_is_directory=True)
    with pytest.raises(UnsafeOutputPathError, match="outside the output directory"):
        subject_dir(out, "dog")
    assert subject_dir(out, "kitten") == out / "kitten"  # a link that stays inside: allowed, as safe_join
    assert subject_dir(out, "cat") == out / "cat"
    assert subject_dir(out, "new") == out / "new"


def test_safe_join_allows_paths_inside_even_through_a_symlinked_out_dir(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real, target_is_directory=True)
    assert safe_join(tmp_path / "alias", "dog", "a.png") == tmp_path / "alias" / "dog" / "a.png"
    assert safe_join(tmp_path / "alias", "dog", "..", "cat") == tmp_path / "alias" / "dog" / ".." / "cat"


@pytest.mark.parametrize("subject", ["..", ".hidden", "a/b", "index.jsonl", "run.json", ""])
def test_subject_names_that_cannot_be_a_directory_are_refused(tmp_path, subject):
    with pytest.raises(UnsafeOutputPathError):
        image_path(tmp_path, make_job(subject=subject))


# Atomic writes ------------------------------------------------------------------------------------------


def test_atomic_write_replaces_content_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new ✓")
    assert target.read_text(encoding="utf-8") == "new ✓"
    assert temp_files(tmp_path) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
@pytest.mark.parametrize("failing", ["write", "replace"])
def test_failed_atomic_write_keeps_the_old_file_and_removes_the_temporary_one(
    tmp_path, monkeypatch, code, failing
):
    target = tmp_path / "dog" / "000-s1.png"
    atomic_write_bytes(target, b"old content")

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, failing, fail)
    with pytest.raises(OutputWriteError) as caught:
        atomic_write_bytes(target, b"new content that will not fit")
    monkeypatch.undo()

    error = caught.value
    assert isinstance(error, SqueezeError) and error.exit_code == EXIT_JOBS_FAILED
    assert str(target) in error.one_line()
    assert os.strerror(code) in error.one_line()
    assert error.path == target and error.errno == code
    if code == errno.ENOSPC:
        assert "free some space" in error.hint
    else:
        assert "writable" in error.hint
    assert target.read_bytes() == b"old content"
    assert temp_files(tmp_path) == []


def test_permission_denied_on_the_directory_names_the_file(tmp_path, monkeypatch):
    real_open = os.open

    def deny(path, *args, **kwargs):
        if str(path).endswith(".tmp"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(OutputWriteError, match="cannot write .*run.json: Permission denied"):
        write_run_summary(tmp_path, {"status": "ok"})
    assert list(tmp_path.iterdir()) == []


def test_save_image_failing_on_the_sidecar_leaves_the_job_unfinished(tmp_path, monkeypatch):
    job = make_job()
    real_replace = os.replace

    def replace(source, destination):
        if str(destination).endswith(".json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(source, destination)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OutputWriteError, match="No space left on device"):
        save_image(tmp_path, job, solid((9, 9, 9)), make_record(job))
    assert image_path(tmp_path, job).exists() and not sidecar_path(tmp_path, job).exists()
    assert finished_job_ids(tmp_path, [job]) == set()
    assert temp_files(tmp_path) == []


def test_remove_stale_temp_files_removes_dead_processes_leftovers_only(tmp_path):
    (tmp_path / "dog").mkdir()
    dead = tmp_path / "dog" / f".000-s1.png.{2**22 + 12345}.tmp"  # above any pid_max
    mine = tmp_path / f".run.json.{os.getpid()}.tmp"
    alive = tmp_path / f".index.jsonl.{os.getppid()}.tmp"  # another live process may still be writing
    user_file = tmp_path / "dog" / "notes.tmp"
    for path in (dead, mine, alive, user_file):
        path.write_bytes(b"partial")
    removed = remove_stale_temp_files(tmp_path)
    assert sorted(removed) == sorted([dead, mine])
    assert alive.exists() and user_file.exists()
    assert remove_stale_temp_files(tmp_path / "missing") == []


# PNG metadata and records --------------------------------------------------------------------------------


def test_png_carries_a_parameters_chunk_and_the_full_record(tmp_path):
    job = make_job(prompt_index=2, seed=123, negative_prompt="blurry, low quality", guidance_scale=3.0)
    record = make_record(job)
    path = save_image(tmp_path, job, solid((200, 10, 10)), record)

    assert read_png_record(path) == record
    parameters = read_png_parameters(path)
    # true_cfg_scale is 1: the pipeline ignores the negative prompt, so the chunk does not claim it.
    prompt_line, settings = parameters.split("\n")
    assert prompt_line == job.prompt
    assert settings.startswith(
        "Steps: 28, Sampler: FlowMatchEuler, CFG scale: 1, Distilled CFG Scale: 3.0, Seed: 123, Size: 512x512"
    )
    assert "Model: tiny" in settings and f"Job id: {job.job_id}" in settings
    assert "Stage thresholds: 0.95/0.85" in settings and "Stage steps: 1/1/2" in settings
    with Image.open(path) as image:
        assert image.size == (64, 64) and image.getpixel((0, 0)) == (200, 10, 10)


def test_parameters_without_negative_prompt_and_non_latin_prompt(tmp_path):
    job = make_job()
    record = make_record(job, prompt="一只狗 on the moon")
    path = tmp_path / "x.png"
    atomic_write_bytes(path, encode_png(solid((0, 0, 0)), record))
    lines = read_png_parameters(path).split("\n")
    assert lines[0] == "一只狗 on the moon" and len(lines) == 2 and lines[1].startswith("Steps: 28")
    assert read_png_record(path)["prompt"] == "一只狗 on the moon"


def test_read_png_record_refuses_a_foreign_png(tmp_path):
    path = tmp_path / "plain.png"
    solid((1, 1, 1)).save(path)
    with pytest.raises(ValueError, match="not written by squeeze"):
        read_png_record(path)


def test_image_record_holds_everything_needed_to_reproduce(tmp_path):
    job = make_job(prompt_index=1, seed=42, true_cfg_scale=4.0, negative_prompt="x")
    record = make_record(job)
    assert record["job_id"] == job.job_id and record["seed"] == 42 and record["prompt"] == job.prompt
    assert record["subject"] == "dog" and record["class_noun"] == "dog" and record["prompt_index"] == 1
    assert record["params"] == {**SamplingParams(true_cfg_scale=4.0, negative_prompt="x").to_dict()}
    assert record["stage_plan"] == STAGE_PLAN
    assert record["steps_per_stage"] == {"mllm_only": 1, "mllm_and_reference": 1, "reference": 2}
    assert record["model"]["transformer"]["revision"] == "abc123" and record["preset"] == "tiny"
    assert record["versions"] == VERSIONS and record["timings"]["denoise"] == 1.2346
    assert record["files"] == {"image": "dog/001-s42.png", "sidecar": "dog/001-s42.json"}
    assert record["created_at"].endswith("+00:00")
    json.dumps(record)  # plain JSON
    prompt_line, negative_line, settings = parameters_text(record).split("\n")
    assert negative_line == "Negative prompt: x"  # used: true CFG is on
    assert "CFG scale: 4.0, Distilled CFG Scale: 2.5," in settings


def test_sidecar_timings_keep_counts_as_integers():
    record = image_record(
        make_job(),
        preset_name="tiny",
        model_info={},
        stage_plan=None,
        timings={"total": 1.23456, "batch": 2.46912, "batch_size": 2},
    )
    assert record["timings"] == {"total": 1.2346, "batch": 2.4691, "batch_size": 2}
    assert isinstance(record["timings"]["batch_size"], int)


def test_image_record_of_a_real_stage_plan():
    from squeeze_cli.pipelines.stages import stage_plan

    plan = stage_plan(28, 512, 512).to_dict()
    record = image_record(make_job(), preset_name="paper", model_info={}, stage_plan=plan, timings={})
    assert record["steps_per_stage"] == {"mllm_only": 3, "mllm_and_reference": 4, "reference": 21}
    assert len(record["stage_plan"]["stages"]) == 28 and record["versions"]["squeeze_cli"]
    assert "Stage steps: 3/4/21" in parameters_text(record)


def test_package_versions_without_importing_torch():
    versions = outputs.package_versions()
    assert versions["squeeze_cli"] and versions["python"] and "pillow" in versions


def test_package_versions_of_a_squeeze_run_from_its_source_tree(monkeypatch):
    from importlib import metadata

    import squeeze_cli

    real = metadata.version

    def not_installed(name: str) -> str:
        if name == "squeeze_cli":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    assert outputs.package_versions()["squeeze_cli"] == squeeze_cli.__version__


# Resume -------------------------------------------------------------------------------------------------


def test_finished_jobs_need_a_matching_sidecar_and_the_png(tmp_path):
    done, no_png, other_id, no_sidecar, broken_sidecar = (make_job(seed=seed) for seed in range(5))
    for job in (done, no_png, other_id, no_sidecar, broken_sidecar):
        save_image(tmp_path, job, solid((5, 5, 5)), make_record(job))
    image_path(tmp_path, no_png).unlink()
    sidecar_path(tmp_path, no_sidecar).unlink()
    sidecar_path(tmp_path, broken_sidecar).write_text('{"job_id": "trunc')
    # The manifest changed this job (new prompt → new id): the old files do not count.
    changed = make_job(seed=other_id.seed, job_id="ffffffffffffffff")
    planned = [done, no_png, changed, no_sidecar, broken_sidecar]

    assert finished_job_ids(tmp_path, planned) == {done.job_id}
    assert find_finished(tmp_path, planned)[done.job_id].entry["seed"] == done.seed
    assert finished_job_ids(tmp_path / "empty", planned) == set()


# Run index ----------------------------------------------------------------------------------------------


def test_append_index_writes_whole_lines_with_one_write(tmp_path, monkeypatch):
    writes = []
    real_write = os.write

    def counting_write(fd, data):
        writes.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", counting_write)
    job = make_job()
    append_index(tmp_path, index_entry(make_record(job, prompt="line one\nline two")))
    append_index(tmp_path, failed_index_entry(make_job(seed=8), "CUDA out of memory"))
    assert len(writes) == 2 and all(data.endswith(b"\n") and data.count(b"\n") == 1 for data in writes)
    entries = read_index(tmp_path)
    assert [entry["status"] for entry in entries] == ["ok", "failed"]
    assert entries[0]["image"] == "dog/000-s7.png" and entries[0]["prompt"] == "line one\nline two"
    assert entries[1]["error"] == "CUDA out of memory"


def test_append_index_after_a_cut_off_line_starts_a_new_line(tmp_path):
    (tmp_path / "index.jsonl").write_bytes(b'{"job_id": "a", "status": "ok"}\n{"job_id": "b", "sta')
    append_index(tmp_path, {"job_id": "c", "status": "ok"})
    assert [entry["job_id"] for entry in read_index(tmp_path)] == ["a", "c"]


def test_the_index_is_read_a_line_at_a_time(tmp_path):
    """A catalog's index is ~45 MB: read whole and split it took twice that, the peak of a no-op rerun.
    Memory, not time: tracemalloc counts allocations exactly, whatever the machine's load."""
    import tracemalloc

    done = {f"{i:08d}": {"job_id": f"{i:08d}", "status": "ok", "prompt": "x" * 2000} for i in range(10_000)}
    (tmp_path / "index.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in done.values()))
    size = (tmp_path / "index.jsonl").stat().st_size  # 20 MB
    tracemalloc.start()
    try:
        lines = sum(1 for _ in outputs.iter_index(tmp_path))
        assert not repair_index(tmp_path, done)  # every line is its finished job's: not rewritten
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert lines == len(done)
    assert peak < size / 4, (peak, size)


def test_append_index_short_write_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "write", lambda fd, data: len(data) // 2)
    with pytest.raises(OutputWriteError, match="index.jsonl") as caught:
        append_index(tmp_path, {"job_id": "a", "status": "ok"})
    assert caught.value.errno == errno.ENOSPC


def test_repair_index_drops_broken_and_duplicate_lines_and_adds_missing_ones(tmp_path):
    jobs = [make_job(seed=seed) for seed in range(5)]
    records = {job.job_id: make_record(job) for job in jobs[:4]}
    done = {job_id: index_entry(record) for job_id, record in records.items()}
    lines = [
        index_entry(records[jobs[0].job_id]),
        failed_index_entry(jobs[1], "out of memory"),  # failed once, finished since
        index_entry(records[jobs[1].job_id]),
        index_entry(records[jobs[0].job_id]),  # duplicate
        {"job_id": "from-an-older-manifest", "status": "ok"},  # not in this run: kept
        failed_index_entry(jobs[4], "out of memory"),  # runs again now: its new line will be the one
    ]
    text = (
        "".join(json.dumps(line) + "\n" for line in lines)
        + "not json\n"
        + '{"job_id": "'
        + jobs[2].job_id[:5]
    )
    (tmp_path / "index.jsonl").write_text(text)

    assert repair_index(tmp_path, done, pending_job_ids=[jobs[4].job_id]) is True
    entries = read_index(tmp_path)
    raw_lines = (tmp_path / "index.jsonl").read_text().splitlines()
    assert len(raw_lines) == len(entries)  # every line is valid now
    ids = [entry["job_id"] for entry in entries]
    assert sorted(ids) == sorted([*records, "from-an-older-manifest"])  # one line per job
    assert all(entry["status"] == "ok" for entry in entries)
    # jobs[2] and jobs[3] finished but the run died before their index line: added from the sidecar data.
    assert {entry["image"] for entry in entries if entry["job_id"] in (jobs[2].job_id, jobs[3].job_id)} == {
        "dog/000-s2.png",
        "dog/000-s3.png",
    }
    assert temp_files(tmp_path) == []

    mtime = (tmp_path / "index.jsonl").stat().st_mtime_ns
    assert repair_index(tmp_path, done, pending_job_ids=[jobs[4].job_id]) is False
    assert (tmp_path / "index.jsonl").stat().st_mtime_ns == mtime


def test_repair_index_without_an_index(tmp_path):
    assert repair_index(tmp_path, {}) is False and not (tmp_path / "index.jsonl").exists()
    job = make_job()
    assert repair_index(tmp_path, {job.job_id: index_entry(make_record(job))}) is True
    assert [entry["job_id"] for entry in read_index(tmp_path)] == [job.job_id]


def test_crash_between_sidecar_and_index_is_repaired_on_resume(tmp_path):
    jobs = [make_job(seed=seed) for seed in range(3)]
    for job in jobs:
        record = make_record(job)
        save_image(tmp_path, job, solid((1, 1, 1)), record)
        if job.seed != 2:  # "killed" after the sidecar of the last job, before its index line
            append_index(tmp_path, index_entry(record))
    done = find_finished(tmp_path, jobs)
    pending = [job.job_id for job in jobs if job.job_id not in done]
    entries = {job_id: found.entry for job_id, found in done.items()}
    assert pending == [] and repair_index(tmp_path, entries, pending_job_ids=pending)
    assert sorted(entry["job_id"] for entry in read_index(tmp_path)) == sorted(job.job_id for job in jobs)


# Run-level files ----------------------------------------------------------------------------------------


def test_run_summary_and_resolved_manifest(tmp_path):
    write_run_summary(tmp_path, {"jobs": {"planned": 2, "succeeded": 2}, "command": ["squeeze", "gen"]})
    write_resolved_manifest(tmp_path, "subjects: []")
    assert json.loads((tmp_path / "run.json").read_text())["jobs"]["succeeded"] == 2
    assert (tmp_path / "manifest.resolved.yaml").read_text() == "subjects: []\n"
    assert temp_files(tmp_path) == []


# Reference images ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_upright_size_reads_the_header_and_agrees_with_load_rgb(tmp_path, orientation):
    path = tmp_path / f"photo-{orientation}.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.new("RGB", (48, 32), (10, 120, 200)).save(path, exif=exif)
    expected = (32, 48) if orientation in (6, 8) else (48, 32)
    assert images.upright_size(path) == expected == images.load_rgb(path).size
