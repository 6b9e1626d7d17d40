"""Resume: which planned jobs are finished, found by job id wherever their files sit, and moving them to
the names of their current positions.

An image's file name says where its prompt stands in the manifest (`003-s7.png`), its sidecar says which
job it is. When prompts or seeds are inserted, removed or reordered, finished images keep their job ids
but not their positions: they are found by id and renamed to their new position's name, never made
again.

A job is finished when a sidecar in its subject's directory parses, names its job id and records the
PNG's size and sha256, and the PNG beside it (same stem) has exactly that size and hash. The hash is
taken only when the PNG's stat differs from the size, mtime and inode its sidecar records (as git trusts
its index): a nightly no-op rerun of 100k images reads no image, where hashing read ~40 GB at 512². With
`verify` (`gen --verify`, `status --verify`, `eval --verify`) every PNG is hashed, which also catches
bytes changed in place with the mtime put back. A PNG whose hash matches a stat that does not (an older
squeeze's sidecar, a copied folder) is hashed once: `gen` then records its stat (`record_stamps`). The
channel variants' files are trusted the same way (`VariantStamp`, `variants.make_variants`).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, NamedTuple

from squeeze_cli.outputs.files import OutputWriteError, atomic_write_json, fsync_dir
from squeeze_cli.outputs.index import index_entry, own_variant_files, variant_files
from squeeze_cli.outputs.layout import image_stem, safe_join, subject_dir
from squeeze_cli.outputs.records import PNG_FILE_KEY, VARIANTS_KEY, png_stamp, read_sidecar
from squeeze_cli.reading import file_kind

if TYPE_CHECKING:
    from ..plan import Job


# A finished image on its way to its new position's name waits under this stem (which no position
# takes), so that moves that swap or shift names never overwrite one another.
_PARKING_PREFIX = "moving-"


class VariantStamp(NamedTuple):
    """What a rerun needs of a sidecar's `variants.<name>` entry to trust the variant's file unread: its
    name, spec, and the size and stat (`records.png_stamp`) the file had when written. No hash: a file
    whose stat differs is checked against the sidecar itself, read again (`variants.make_variants`)."""

    name: str
    file: str
    spec: frozenset[tuple[str, Any]]  # `frozen_spec`, one shared object per distinct spec
    size: int
    mtime_ns: int
    inode: int

    def matches(self, info: os.stat_result) -> bool:
        """Whether `info` (an `lstat`) is the regular file squeeze wrote, untouched since (as `file_check`
        trusts a matching stat)."""
        return (
            stat.S_ISREG(info.st_mode)
            and info.st_size == self.size
            and info.st_mtime_ns == self.mtime_ns
            and info.st_ino == self.inode
        )


def frozen_spec(spec: Any) -> frozenset[tuple[str, Any]] | None:
    """A variant's spec (`variants.variant_spec`, a flat mapping of JSON scalars) as a hashable value to
    compare; None for a damaged one (not a mapping, a list among its values)."""
    if not isinstance(spec, Mapping):
        return None
    try:
        return frozenset(spec.items())
    except TypeError:  # an unhashable value: not a spec squeeze wrote, so the variant is made again
        return None


# `variant_stamps`' interned specs, `{spec: the same spec}`: one dict per `find_finished` call.
_Specs = dict[frozenset[tuple[str, Any]], frozenset[tuple[str, Any]]]


def variant_stamps(record: Mapping[str, Any], specs: _Specs) -> tuple[VariantStamp, ...]:
    """The `VariantStamp`s of the variants a sidecar records with a stat (an entry of an older squeeze,
    without one, or a damaged one is left out: checked against the sidecar). `specs` interns the specs,
    so 100k images of 3 variants hold 3 of them."""
    recorded = record.get(VARIANTS_KEY)
    if not isinstance(recorded, Mapping):
        return ()
    stamps = []
    for name, entry in recorded.items():
        if not isinstance(entry, Mapping):
            continue
        spec = frozen_spec(entry.get("spec"))
        file, size, mtime_ns, inode = (entry.get(key) for key in ("file", "size", "mtime_ns", "inode"))
        if (
            spec is not None
            and isinstance(file, str)
            and isinstance(size, int)
            and isinstance(mtime_ns, int)
            and isinstance(inode, int)
        ):
            stamps.append(VariantStamp(name, file, specs.setdefault(spec, spec), size, mtime_ns, inode))
    return tuple(stamps)


@dataclass(frozen=True, slots=True)
class Finished:
    """A finished job as found on disk: small, so a 100k-image resume keeps little in memory.

    Attributes:
        stem: the file name without extension in the subject's directory (`003-s7`).
        sha256: the PNG's hash, as recorded in the sidecar and verified on disk.
        entry: its `index.jsonl` line.
        new_stamp: the PNG's stat (`records.png_stamp`) when its sidecar records another one and the hash
            matched; `record_stamps` writes it, so the next resume need not read the PNG again.
        variants: its channel variants as the sidecar records them, so that a rerun with every variant
            up to date reads no sidecar twice (`variants.make_variants`).
    """

    stem: str
    sha256: str
    entry: dict[str, Any]
    new_stamp: dict[str, int] | None = None
    variants: tuple[VariantStamp, ...] = ()


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def png_file_facts(path: str | os.PathLike) -> dict[str, Any]:
    """What a sidecar records about its PNG: `{"size", "sha256", "mtime_ns", "inode"}`."""
    info = os.stat(path)
    return {"size": info.st_size, "sha256": file_sha256(path), **png_stamp(info)}


def png_check(
    png: str | os.PathLike, record: Mapping[str, Any], *, verify: bool = False
) -> tuple[str | None, dict[str, int] | None]:
    """`(why png does not match its sidecar or None, its stat to record or None)`: the definition of a
    finished image, shared by resume, `status`, `squeeze eval` and `squeeze export`.

    The PNG matches when it is a regular file of the recorded size whose stat is the recorded mtime and
    inode, or whose sha256 is the recorded one (always hashed with `verify`). The second value is the
    PNG's stamp when it matched by hash but its stat differs from the recorded one.
    """
    facts = record.get(PNG_FILE_KEY)
    if not isinstance(facts, dict):
        return "its sidecar records no size and sha256 for it (written by an older squeeze)", None
    return file_check(png, facts, verify=verify)


def file_check(
    path: str | os.PathLike, facts: Mapping[str, Any], *, verify: bool = False
) -> tuple[str | None, dict[str, int] | None]:
    """`(why the file does not match facts or None, its stat to record or None)`: a regular file of the
    recorded size whose stat is the recorded one is trusted unread (unless `verify`); otherwise its sha256
    decides, and a match whose stat differs returns the new stat to record."""
    size, sha256 = facts.get("size"), facts.get("sha256")
    if not isinstance(size, int) or not isinstance(sha256, str):
        return "its sidecar's size and sha256 are damaged", None
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode):  # not a file squeeze wrote (a link, a FIFO)
            return f"does not match its sidecar: {file_kind(info.st_mode)}, not the file squeeze wrote", None
        if info.st_size != size:  # truncated or grown: cheap checks first
            return f"does not match its sidecar: {info.st_size:,} bytes, the sidecar records {size:,}", None
        stamp = png_stamp(info)
        stamped = all(facts.get(key) == value for key, value in stamp.items())
        if stamped and not verify:
            return None, None  # the file squeeze wrote, untouched since: not read
        if file_sha256(path) != sha256:
            return "does not match its sidecar: its sha256 differs (edited or replaced)", None
    except OSError as error:
        return f"cannot be read: {error.strerror or error}", None
    return None, None if stamped else stamp


def _verified(
    folder: str, subject: str, stem: str, record: Mapping[str, Any] | None, verify: bool, specs: _Specs
) -> Finished | None:
    """`Finished` when the sidecar `record` and the PNG `<stem>.png` in `folder` (`subject`'s) agree
    (`png_check`)."""
    if record is None:
        return None
    mismatch, new_stamp = png_check(f"{folder}/{stem}.png", record, verify=verify)
    if mismatch is not None:
        return None  # an old sidecar without the PNG's facts cannot be checked either: made again
    sha256 = record[PNG_FILE_KEY]["sha256"]
    entry = index_entry(record)
    entry["image"], entry["sidecar"] = f"{subject}/{stem}.png", f"{subject}/{stem}.json"
    return Finished(stem, sha256, entry, new_stamp, variant_stamps(record, specs))


def find_finished(
    out_dir: str | os.PathLike, jobs: Iterable[Job], *, anywhere: bool = True, verify: bool = False
) -> dict[str, Finished]:
    """`{job_id: Finished}` for the planned jobs whose image is finished in `out_dir`.

    Each job is first looked for under its own position's name (one sidecar read, one PNG stat: the
    usual case). With `anywhere`, the jobs not found there are looked for among the other sidecars of
    their subject's directory, each read once; several valid copies of one job: the first found counts.

    Args:
        jobs: the planned jobs (in plan order).
        anywhere: search the whole subject directory for jobs not at their own name (resume); `False`
            only checks the names this run wrote.
        verify: hash every PNG, even those whose stat matches their sidecar's.
    """
    done: dict[str, Finished] = {}
    specs: _Specs = {}
    for subject, group in groupby(jobs, key=lambda job: job.subject):
        directory = subject_dir(out_dir, subject)
        if not directory.is_dir():
            continue
        subject_jobs = list(group)
        # Plain strings for the paths: 100,000 `Path`s made and turned back into strings cost ~1 s.
        folder = os.fspath(directory)
        other_ids: dict[str, object] = {}  # stem -> the job id its sidecar names, when not that job's
        for job in subject_jobs:
            stem = image_stem(job)
            record = read_sidecar(f"{folder}/{stem}.json")
            if record is not None and record.get("job_id") != job.job_id:
                other_ids[stem] = _job_id(record)
                continue
            found = _verified(folder, subject, stem, record, verify, specs)
            if found is not None:
                done[job.job_id] = found
        # Not `{...} - done.keys()`: a set minus a dict view walks the whole view, every finished job
        # of the run so far, once per subject (quadratic: 8 s at 10,000 subjects).
        missing = {job.job_id for job in subject_jobs if job.job_id not in done}
        if anywhere and missing:
            done.update(
                _search_directory(
                    folder,
                    subject,
                    missing,
                    {image_stem(job) for job in subject_jobs},
                    other_ids,
                    verify,
                    specs,
                )
            )
    return done


def _search_directory(
    folder: str,
    subject: str,
    missing: set[str],
    read_stems: set[str],
    other_ids: Mapping[str, object],
    verify: bool,
    specs: _Specs,
) -> dict[str, Finished]:
    found: dict[str, Finished] = {}
    try:
        with os.scandir(folder) as entries:
            names = sorted(entry.name for entry in entries if entry.is_file(follow_symlinks=False))
    except OSError:
        return found
    for name in names:
        if not name.endswith(".json") or name.startswith("."):
            continue
        stem = name[: -len(".json")]
        if stem in read_stems and other_ids.get(stem) not in missing:
            continue  # read already: it is not one of the jobs we are looking for
        record = read_sidecar(f"{folder}/{name}")
        job_id = _job_id(record) if record is not None else None
        if job_id is None or job_id not in missing or job_id in found:
            continue
        verified = _verified(folder, subject, stem, record, verify, specs)
        if verified is not None:
            found[job_id] = verified
    return found


def _job_id(record: Mapping[str, Any]) -> str | None:
    """A sidecar's job id; None when it is not a string (a list or a mapping is a damaged sidecar)."""
    job_id = record.get("job_id")
    return job_id if isinstance(job_id, str) else None


def finished_job_ids(out_dir: str | os.PathLike, jobs: Iterable[Job], *, verify: bool = False) -> set[str]:
    """The ids of the jobs already finished in `out_dir` (see `find_finished`)."""
    return set(find_finished(out_dir, jobs, verify=verify))


def record_stamps(out_dir: str | os.PathLike, jobs: Sequence[Job], done: Mapping[str, Finished]) -> int:
    """Write the PNG's current stat into the sidecar of each finished image that matched by hash alone
    (`Finished.new_stamp`), so that the next resume trusts the stat instead of reading the PNG. Only the
    `png` field's `mtime_ns` and `inode` change; a sidecar changed since the scan is left as it is. Call it
    while holding the output folder's lock, after `move_to_positions`. Returns how many were written.

    Raises:
        `OutputWriteError`: a sidecar could not be written.
    """
    written = 0
    for job in jobs:
        found = done.get(job.job_id)
        if found is None or found.new_stamp is None:
            continue
        sidecar = subject_dir(out_dir, job.subject) / f"{found.stem}.json"
        record = read_sidecar(sidecar)
        facts = record.get(PNG_FILE_KEY) if record is not None else None
        if record is None or _job_id(record) != job.job_id or not isinstance(facts, dict):
            continue
        if facts.get("sha256") != found.sha256:
            continue
        record[PNG_FILE_KEY] = {**facts, **found.new_stamp}
        atomic_write_json(sidecar, record)
        written += 1
    return written


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
    # A rename keeps the mtime and inode: the PNG's and the variants' stamps still hold, under new names.
    moved = {file: new_file for file, new_file in variant_moves.values()}
    variants = tuple(stamp._replace(file=moved.get(stamp.file, stamp.file)) for stamp in found.variants)
    return Finished(stem, found.sha256, entry, found.new_stamp, variants)


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
