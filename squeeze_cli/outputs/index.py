"""The run index (`index.jsonl`: append-only whole lines, repaired from the sidecars) and the other
run-level files."""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from squeeze_cli.errors import SqueezeError
from squeeze_cli.outputs.files import (
    OutputWriteError,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    ensure_dir,
    file_size_limit,
    strict_json_dumps,
)
from squeeze_cli.outputs.layout import (
    INDEX_NAME,
    RECIPES_NAME,
    VARIANT_EXTENSIONS,
    image_name,
    index_path,
    is_run_folder,
    position_stem,
    resolved_manifest_path,
    run_summary_path,
    variant_name,
)
from squeeze_cli.outputs.records import VARIANTS_KEY
from squeeze_cli.reading import (
    INDEX_MAX_BYTES,
    NotARegularFileError,
    file_kind,
    open_regular_file,
    read_regular_file,
    size_text,
)

if TYPE_CHECKING:
    from ..plan import Job


# ----------------------------------------------------------------------------------------------------
# The run index
# ----------------------------------------------------------------------------------------------------


def index_entry(record: Mapping[str, Any]) -> dict[str, Any]:
    """The `index.jsonl` line of a finished image, from its record."""
    quality = record.get("quality")  # the identity gate's verdict: passed, attempts, dino
    return {
        "job_id": record["job_id"],
        "status": "ok",
        "subject": record.get("subject"),
        "prompt_index": record.get("prompt_index"),
        "seed": record.get("seed"),
        "prompt": record.get("prompt"),
        "image": (record.get("files") or {}).get("image"),
        "sidecar": (record.get("files") or {}).get("sidecar"),
        "seconds": (record.get("timings") or {}).get("total"),
        "created_at": record.get("created_at"),
        **({"quality": {k: quality[k] for k in ("passed", "attempts", "dino")}} if quality else {}),
        **({VARIANTS_KEY: variants} if (variants := variant_files(record)) else {}),
    }


def variant_files(record: Mapping[str, Any]) -> dict[str, str]:
    """`{variant: file relative to OUT}` of the channel variants a sidecar records (a damaged entry is
    left out: the variant is made again)."""
    recorded = record.get(VARIANTS_KEY)
    if not isinstance(recorded, Mapping):
        return {}
    return {
        name: entry["file"]
        for name, entry in recorded.items()
        if isinstance(entry, Mapping) and isinstance(entry.get("file"), str)
    }


def own_variant_files(record: Mapping[str, Any], folder: str, stem: str) -> dict[str, str]:
    """`{variant: file}` of the variants a sidecar records under the names its own image (`<folder>/<stem>`)
    gives them. One made under an older name may since hold another image's variant, and a damaged sidecar
    may name anything: those are left out, so moving an image's variants moves nothing else."""
    return {
        name: file
        for name, file in variant_files(record).items()
        if "/" not in name
        and name not in (".", "..")
        and file in {variant_name(folder, stem, name, image_format) for image_format in VARIANT_EXTENSIONS}
    }


def planned_images(jobs: Iterable[Job]) -> dict[str, str]:
    """`{image name: job id}`: the names a plan's jobs own; other jobs' index lines for them go."""
    return {image_name(job): job.job_id for job in jobs}


def failed_index_entry(job: Job, error: str) -> dict[str, Any]:
    """The `index.jsonl` line of a job that failed (`error` is the one-line reason)."""
    return {
        "job_id": job.job_id,
        "status": "failed",
        "subject": job.subject,
        "prompt_index": job.prompt_index,
        "seed": job.seed,
        "prompt": job.prompt,
        "error": error,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _index_line(entry: Mapping[str, Any]) -> bytes:
    if "job_id" not in entry:
        raise ValueError("an index entry needs a `job_id`")
    # One physical line: json.dumps escapes newlines inside strings.
    return (strict_json_dumps(entry) + "\n").encode("utf-8")


def append_index(out_dir: str | os.PathLike, entry: Mapping[str, Any]) -> None:
    """Append one line to `index.jsonl` (`append_line`).

    Raises:
        `OutputWriteError`: on any OS error or a short write.
    """
    append_line(index_path(out_dir), _index_line(entry))


def append_line(path: Path, data: bytes) -> None:
    """Append `data`, one whole line ending in a newline, to the file `path` (created if missing) with a
    single `write` on an O_APPEND descriptor, then fsync: the index, training's `log.jsonl`.

    One write of one whole line means a crash leaves the line entirely there or entirely absent, and
    several processes may append to the same file without interleaving. If the file does not end with
    a newline (a write cut short by a full disk), the line starts on a fresh one. Never through a
    symbolic link, and a FIFO or a device in the file's place is refused without blocking.

    Raises:
        `OutputWriteError`: on any OS error, a short write, or a path that is not a regular file.
    """
    ensure_dir(path.parent)
    try:
        # Never through a symbolic link, never blocking on a FIFO put in its place.
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(path, flags | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as error:
        raise OutputWriteError.from_os_error(path, error) from error
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotARegularFileError(errno.EINVAL, f"not a regular file ({file_kind(info.st_mode)})")
        size = info.st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        written = os.write(fd, data)
        if written != len(data):
            _cut_short_append(fd, written)
            # A short write is a full disk, or the file-size limit (`ulimit -f`) reached mid-line.
            limit = file_size_limit()
            code = errno.EFBIG if limit is not None and size + len(data) > limit else errno.ENOSPC
            reason = f"{os.strerror(code)} (only {written} of {len(data)} bytes written)"
            raise OSError(code, reason)
        os.fsync(fd)
    except OSError as error:
        raise OutputWriteError.from_os_error(path, error) from error
    finally:
        os.close(fd)


def _cut_short_append(fd: int, written: int) -> None:
    # A full disk can take part of a line. Only the run holding the lock appends to an index (only the main
    # process to a training log), so when the file still ends where our write ended, those bytes are ours
    # to remove; repair_index (or the cut line's being skipped when read) is the fallback.
    try:
        end = os.lseek(fd, 0, os.SEEK_CUR)
        if written and os.fstat(fd).st_size == end:
            os.ftruncate(fd, end - written)
    except OSError:
        pass


def _index_lines(path: Path) -> Iterator[bytes]:
    """The lines of the index file `path`, one at a time, each with its newline (a cut-off last line
    without); none when there is no file. A 100,000-line index is never held whole: read whole and split,
    it took twice its size (~90 MB with channel variants), the peak of a catalog's no-op rerun.

    Raises:
        `OutputWriteError`: the file cannot be read, is not a regular file, or is over `INDEX_MAX_BYTES`.
    """
    try:
        file = open_regular_file(path, follow_symlinks=False)
    except FileNotFoundError:
        return
    except OSError as error:
        raise OutputWriteError.from_os_error(path, error, "read") from error
    with file:
        left = INDEX_MAX_BYTES  # bounds the reads, not only the size at open: the file may grow
        try:
            too_large = os.fstat(file.fileno()).st_size > left
            for line in () if too_large else file:
                left -= len(line)
                if left < 0:
                    too_large = True
                    break
                yield line
        except OSError as error:
            raise OutputWriteError.from_os_error(path, error, "read") from error
    if too_large:  # the limit, not a full file system: say which
        limit = size_text(INDEX_MAX_BYTES)
        raise OutputWriteError(
            f"cannot read {path}: larger than the {limit} limit for this kind of file",
            f"move it away: `squeeze status OUT --merge` or the run's `squeeze gen` rebuilds {INDEX_NAME} "
            "from the sidecars",
            path=path,
            errno=errno.EFBIG,
        )


def _cut_off(line: bytes) -> bool:
    return not line.endswith(b"\n")  # only the last line can be: rewriting ends the file cleanly


def _parse_line(line: bytes) -> dict[str, Any] | None:
    """An index line's entry; None for an invalid line (or a blank one)."""
    if not line.strip():
        return None
    try:
        entry = json.loads(line.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: '[' * 100000
        return None
    return entry if isinstance(entry, dict) and isinstance(entry.get("job_id"), str) else None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN/Infinity: a line strict readers refuse is a broken line


def read_index(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The valid lines of `index.jsonl`, in file order (broken lines are skipped)."""
    return list(iter_index(out_dir))


def iter_index(out_dir: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """`read_index`, one line at a time: a reader that keeps few lines does not hold 100,000 dicts (~140 MB).

    Raises:
        `OutputWriteError`: the index cannot be read (while iterating: the file is opened at the first line).
    """
    return (entry for line in _index_lines(index_path(out_dir)) if (entry := _parse_line(line)) is not None)


def repair_index(
    out_dir: str | os.PathLike,
    done_entries: Mapping[str, Mapping[str, Any]],
    *,
    pending_job_ids: Iterable[str] = (),
    planned_images: Mapping[str, str] | None = None,
    keep_job_ids: Iterable[str] | None = None,
) -> bool:
    """Make `index.jsonl` describe what is on disk, at the start and the end of a run.

    - invalid or truncated lines (and lines with `NaN` or `Infinity`) are dropped;
    - one line per job id is kept: the last one, except that a finished job always keeps an `ok` line,
      and that line is its current one (where its image sits now);
    - finished images without a line (a crash between the sidecar and the index append) get one;
    - lines of `pending_job_ids` (jobs about to run again: unfinished, failed, or `--overwrite`) are
      dropped, so the line the new run appends is the only one;
    - a line of another job for an image name a planned job now owns (the prompt, a reference or the
      model changed; prompts moved) is dropped: one line per image path, the current job's.

    Lines of other jobs whose image names no planned job owns (a subject or prompt since removed) are
    kept, unless `keep_job_ids` is given (`gen --prune`): then only those jobs' lines are kept. The file
    is rewritten atomically, and only when something changed. Call it before any worker
    appends.

    Args:
        done_entries: `{job_id: index line}` of the finished images (`resume.find_finished` entries).
        planned_images: `{image name relative to OUT: job_id}` of every planned job.
        keep_job_ids: when given, every line of another job is dropped (its stale files were moved).

    Returns:
        `bool`: whether the index was rewritten.
    """
    done = done_entries  # read, never changed: at 100k finished images a copy would be ~0.1 GB
    pending = set(pending_job_ids) - set(done)
    owners = planned_images or {}
    keep = None if keep_job_ids is None else set(keep_job_ids)
    path = index_path(out_dir)
    changed = False

    # Lines are read and parsed one at a time, and a finished job's parsed line is dropped for its `done`
    # entry, so the index is never held twice.
    kept: dict[str, Mapping[str, Any]] = {}  # insertion order = order of each id's kept line
    entry: Mapping[str, Any] | None
    for line in _index_lines(path):
        entry = _parse_line(line)
        if _cut_off(line) or (entry is None and line.strip()):
            changed = True
        if entry is None:
            continue
        job_id = entry["job_id"]
        if job_id in pending:
            changed = True
            continue
        if job_id in done:
            if entry != done[job_id]:
                changed = True  # an old failure, or the image moved to its new position's name
            entry = done[job_id]
        elif keep is not None and job_id not in keep:
            changed = True  # `--prune`: a job the plan does not have
            continue
        else:
            image = _line_image(entry)
            owner = owners.get(image) if image is not None else None
            if owner is not None and owner != job_id:
                changed = True  # an old job's line for a name a current job owns
                continue
        if job_id in kept:
            changed = True
            del kept[job_id]  # keep the last line, at its position
        kept[job_id] = entry
    for job_id, entry in done.items():
        if job_id not in kept:
            kept[job_id] = entry
            changed = True
    if not changed:
        return False
    atomic_write_bytes(path, b"".join(_index_line(entry) for entry in kept.values()))
    return True


def _line_image(entry: Mapping[str, Any]) -> str | None:
    """The image name a line is about: its `image`, or for a failed line the name its position gives."""
    image = entry.get("image")
    if isinstance(image, str):
        return image
    subject, prompt_index, seed = entry.get("subject"), entry.get("prompt_index"), entry.get("seed")
    if isinstance(subject, str) and isinstance(prompt_index, int) and isinstance(seed, int):
        return f"{subject}/{position_stem(prompt_index, seed)}.png"
    return None


# ----------------------------------------------------------------------------------------------------
# Run-level files
# ----------------------------------------------------------------------------------------------------


def write_run_summary(out_dir: str | os.PathLike, summary: Mapping[str, Any]) -> Path:
    """`OUT/run.json`, written atomically (see docs/outputs.md for its fields)."""
    return atomic_write_json(run_summary_path(out_dir), dict(summary))


def write_resolved_manifest(out_dir: str | os.PathLike, text: str) -> Path:
    """`OUT/manifest.resolved.yaml`: the manifest with the preset merged; `squeeze gen` on it reproduces."""
    return atomic_write_text(resolved_manifest_path(out_dir), text if text.endswith("\n") else text + "\n")


RECIPES_MAX_BYTES = 1024 * 1024  # a few names


def write_recipes(out_dir: str | os.PathLike, folders: list[str]) -> Path:
    """`OUT/.squeeze-recipes.json`: the recipe folders of the last `gen --recipe A,B` into `out_dir`."""
    return atomic_write_json(Path(out_dir) / RECIPES_NAME, {"recipes": folders})


def read_recipes(out_dir: str | os.PathLike) -> list[str]:
    """The recipe folders `OUT/.squeeze-recipes.json` names (none without it).

    Raises:
        `SqueezeError`: the file is not one `write_recipes` writes (a link, a FIFO, not that JSON).
    """
    path = Path(out_dir) / RECIPES_NAME
    if not os.path.lexists(path):
        return []
    try:
        folders = json.loads(read_regular_file(path, RECIPES_MAX_BYTES, follow_symlinks=False))["recipes"]
        # Plain names only: a name is joined to OUT and read.
        if (
            not isinstance(folders, list)
            or not folders
            or not all(
                isinstance(name, str) and name and name == Path(name).name and name not in (".", "..")
                for name in folders
            )
        ):
            raise ValueError("`recipes` is not a list of folder names")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise SqueezeError(
            f"{path} is not the list of recipes `squeeze gen --recipe A,B` writes ({reason})",
            "delete it: the next `squeeze gen --recipe A,B` into this folder writes it again",
        ) from error
    return folders


def missing_recipes(out: Path) -> list[tuple[str, str]]:
    """The recipes `OUT/.squeeze-recipes.json` names whose folder in `out` is not a run folder, each with
    what is there instead: a recipe that never ran (stopped before it), or a folder replaced since."""
    missing = []
    for name in read_recipes(out):
        folder = out / name
        if not os.path.lexists(folder):
            problem = "missing (its recipe has not run: run the same `squeeze gen --recipe` again)"
        elif not folder.exists():
            problem = "a broken symbolic link"
        elif not folder.is_dir():
            problem = f"not a folder ({file_kind(folder.stat().st_mode)})"
        elif not is_run_folder(folder):
            problem = "not a run folder (its recipe stopped before its run began)"
        else:
            continue
        missing.append((name, problem))
    return missing
