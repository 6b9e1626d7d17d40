"""Resume: which planned jobs are finished, found by job id wherever their files sit, and moving them to
the names of their current positions.

An image's file name says where its prompt stands in the manifest (`003-s7.png`), its sidecar says which
job it is. When prompts or seeds are inserted, removed or reordered, finished images keep their job ids
but not their positions: they are found by id and renamed to their new position's name, never made
again.

A job is finished when a sidecar in its subject's directory parses, names its job id and records the
PNG's size and sha256, and the PNG beside it (same stem) has exactly that size and hash. Hashing reads
each finished PNG once per resume: about 2 ms per megabyte, against seconds of generation per image.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from squeeze_cli.outputs.files import OutputWriteError, atomic_write_json, fsync_dir
from squeeze_cli.outputs.index import index_entry, own_variant_files, variant_files
from squeeze_cli.outputs.layout import image_stem, safe_join, subject_dir
from squeeze_cli.outputs.records import PNG_FILE_KEY, VARIANTS_KEY, read_sidecar
from squeeze_cli.reading import file_kind

if TYPE_CHECKING:
    from ..plan import Job


# A finished image on its way to its new position's name waits under this stem (which no position
# takes), so that moves that swap or shift names never overwrite one another.
_PARKING_PREFIX = "moving-"


@dataclass(frozen=True, slots=True)
class Finished:
    """A finished job as found on disk: small, so a 100k-image resume keeps little in memory.

    Attributes:
        stem: the file name without extension in the subject's directory (`003-s7`).
        sha256: the PNG's hash, as recorded in the sidecar and verified on disk.
        entry: its `index.jsonl` line.
    """

    stem: str
    sha256: str
    entry: dict[str, Any]


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def png_file_facts(path: str | os.PathLike) -> dict[str, Any]:
    """`{"size": bytes, "sha256": hex}` of a file: what a sidecar records about its PNG."""
    return {"size": os.stat(path).st_size, "sha256": file_sha256(path)}


def png_mismatch(png: str | os.PathLike, record: Mapping[str, Any]) -> str | None:
    """Why the PNG `png` is not the one its sidecar `record` vouches for (its size and sha256); None when
    it is. The definition of a finished image, shared by resume and `squeeze eval`."""
    facts = record.get(PNG_FILE_KEY)
    if not isinstance(facts, dict):
        return "its sidecar records no size and sha256 for it (written by an older squeeze)"
    return file_mismatch(png, facts)


def file_mismatch(path: str | os.PathLike, facts: Mapping[str, Any]) -> str | None:
    """Why the file at `path` is not the one a sidecar's `facts` (`{"size", "sha256"}`) vouch for; None
    when it is."""
    size, sha256 = facts.get("size"), facts.get("sha256")
    if not isinstance(size, int) or not isinstance(sha256, str):
        return "its sidecar's size and sha256 are damaged"
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode):  # not a file squeeze wrote (a link, a FIFO)
            return f"does not match its sidecar: {file_kind(info.st_mode)}, not the file squeeze wrote"
        if info.st_size != size:  # truncated or grown: cheap checks first
            return f"does not match its sidecar: {info.st_size:,} bytes, the sidecar records {size:,}"
        if file_sha256(path) != sha256:
            return "does not match its sidecar: its sha256 differs (edited or replaced)"
    except OSError as error:
        return f"cannot be read: {error.strerror or error}"
    return None


def _verified(directory: Path, stem: str, record: Mapping[str, Any] | None) -> Finished | None:
    """`Finished` when the sidecar `record` and the PNG `<stem>.png` agree: the size and hash match."""
    if record is None or png_mismatch(directory / f"{stem}.png", record) is not None:
        return None  # an old sidecar without the PNG's facts cannot be checked either: made again
    sha256 = record[PNG_FILE_KEY]["sha256"]
    entry = index_entry(record)
    subject = directory.name
    entry["image"], entry["sidecar"] = f"{subject}/{stem}.png", f"{subject}/{stem}.json"
    return Finished(stem, sha256, entry)


def find_finished(
    out_dir: str | os.PathLike, jobs: Iterable[Job], *, anywhere: bool = True
) -> dict[str, Finished]:
    """`{job_id: Finished}` for the planned jobs whose image is finished in `out_dir`.

    Each job is first looked for under its own position's name (one sidecar read, one PNG hash: the
    usual case). With `anywhere`, the jobs not found there are looked for among the other sidecars of
    their subject's directory, each read once; several valid copies of one job: the first found counts.

    Args:
        jobs: the planned jobs (in plan order).
        anywhere: search the whole subject directory for jobs not at their own name (resume); `False`
            only checks the names this run wrote.
    """
    done: dict[str, Finished] = {}
    for subject, group in groupby(jobs, key=lambda job: job.subject):
        directory = subject_dir(out_dir, subject)
        if not directory.is_dir():
            continue
        subject_jobs = list(group)
        other_ids: dict[str, object] = {}  # stem -> the job id its sidecar names, when not that job's
        for job in subject_jobs:
            stem = image_stem(job)
            record = read_sidecar(directory / f"{stem}.json")
            if record is not None and record.get("job_id") != job.job_id:
                other_ids[stem] = _job_id(record)
                continue
            found = _verified(directory, stem, record)
            if found is not None:
                done[job.job_id] = found
        missing = {job.job_id for job in subject_jobs} - done.keys()
        if anywhere and missing:
            done.update(
                _search_directory(directory, missing, {image_stem(job) for job in subject_jobs}, other_ids)
            )
    return done


def _search_directory(
    directory: Path, missing: set[str], read_stems: set[str], other_ids: Mapping[str, object]
) -> dict[str, Finished]:
    found: dict[str, Finished] = {}
    try:
        with os.scandir(directory) as entries:
            names = sorted(entry.name for entry in entries if entry.is_file(follow_symlinks=False))
    except OSError:
        return found
    for name in names:
        if not name.endswith(".json") or name.startswith("."):
            continue
        stem = name[: -len(".json")]
        if stem in read_stems and other_ids.get(stem) not in missing:
            continue  # read already: it is not one of the jobs we are looking for
        record = read_sidecar(directory / name)
        job_id = _job_id(record) if record is not None else None
        if job_id is None or job_id not in missing or job_id in found:
            continue
        verified = _verified(directory, stem, record)
        if verified is not None:
            found[job_id] = verified
    return found


def _job_id(record: Mapping[str, Any]) -> str | None:
    """A sidecar's job id; None when it is not a string (a list or a mapping is a damaged sidecar)."""
    job_id = record.get("job_id")
    return job_id if isinstance(job_id, str) else None


def finished_job_ids(out_dir: str | os.PathLike, jobs: Iterable[Job]) -> set[str]:
    """The ids of the jobs already finished in `out_dir` (see `find_finished`)."""
    return set(find_finished(out_dir, jobs))


# ----------------------------------------------------------------------------------------------------
# Moving finished images to their current names
# ----------------------------------------------------------------------------------------------------


def move_to_positions(
    out_dir: str | os.PathLike, jobs: Sequence[Job], done: Mapping[str, Finished]
) -> dict[str, Finished]:
    """Rename every finished image that sits under another name to its position's name.

    Two passes, so that shifted or swapped names never overwrite a finished image: every image that
    moves first goes to a parking name (`moving-<job id>`), then to its position. Whatever sat under a
    position's name and is not finished work of this plan (an old job's files) is replaced. Each move
    writes the new sidecar (its position fields updated), renames the PNG over the new name, then removes
    the old sidecar: killed at any point, each image is found finished under one of the two names by the
    next resume. Call it while holding the output folder's lock, before any image is generated.

    Returns:
        `dict`: `done` with the moved images' new names.

    Raises:
        `OutputWriteError`: a file could not be renamed or written.
    """
    result = dict(done)
    moving = [job for job in jobs if job.job_id in done and done[job.job_id].stem != image_stem(job)]
    for parking in (True, False):
        for job in moving:
            target = f"{_PARKING_PREFIX}{job.job_id}" if parking else image_stem(job)
            if result[job.job_id].stem != target:
                result[job.job_id] = _move(subject_dir(out_dir, job.subject), job, result[job.job_id], target)
    return result


def _move(directory: Path, job: Job, found: Finished, stem: str) -> Finished:
    old_sidecar, new_sidecar = directory / f"{found.stem}.json", directory / f"{stem}.json"
    old_png, new_png = directory / f"{found.stem}.png", directory / f"{stem}.png"
    record = read_sidecar(old_sidecar)
    if record is None:  # changed under us since the scan: keep it where it is, it is checked next run
        return found
    subject = directory.name
    # Its channel variants move with it (kept, not made again); killed before they do, the sidecar names
    # files that are not there yet, and the variants are made again.
    variant_moves = {
        name: (file, f"{file.rsplit('/', 1)[0]}/{stem}{PurePosixPath(file).suffix}")
        for name, file in own_variant_files(record, subject, found.stem).items()
    }
    for name, (_, new_file) in variant_moves.items():
        record[VARIANTS_KEY][name]["file"] = new_file
    record.update(
        job_index=job.index,
        subject_index=job.subject_index,
        prompt_index=job.prompt_index,
        files={"image": f"{subject}/{stem}.png", "sidecar": f"{subject}/{stem}.json"},
    )
    atomic_write_json(new_sidecar, record)
    try:
        os.replace(old_png, new_png)
    except OSError as error:
        raise OutputWriteError.from_os_error(new_png, error, "rename a finished image to") from error
    fsync_dir(directory)
    for old_file, new_file in variant_moves.values():
        _rename_variant(directory.parent, old_file, new_file)
    try:
        old_sidecar.unlink(missing_ok=True)
    except OSError as error:
        raise OutputWriteError.from_os_error(old_sidecar, error, "remove the moved sidecar") from error
    entry = dict(found.entry, prompt_index=job.prompt_index)
    entry["image"], entry["sidecar"] = record["files"]["image"], record["files"]["sidecar"]
    if variant_moves:
        entry[VARIANTS_KEY] = variant_files(record)
    return Finished(stem, found.sha256, entry)


def _rename_variant(out_dir: Path, old_file: str, new_file: str) -> None:
    old_path, new_path = safe_join(out_dir, *old_file.split("/")), safe_join(out_dir, *new_file.split("/"))
    try:
        if not stat.S_ISREG(os.lstat(old_path).st_mode):
            return  # not the file squeeze wrote: the variant is made again
        os.replace(old_path, new_path)
    except FileNotFoundError:
        return  # gone: made again
    except OSError as error:
        raise OutputWriteError.from_os_error(new_path, error, "rename a channel variant to") from error
    fsync_dir(new_path.parent)
