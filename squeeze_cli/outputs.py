"""Everything about the files a run writes: names, atomic writes, PNG metadata, sidecars, the run index,
grids and contact sheets. Torch-free: PIL, json and os only.

The output directory is a documented contract (docs/outputs.md)::

    OUT/<subject>/<prompt_index:03d>-s<seed>.png   the image; metadata in `parameters` and `squeeze` chunks
    OUT/<subject>/<prompt_index:03d>-s<seed>.json  the sidecar: the full record; written last = "done"
    OUT/<subject>/grid-<prompt_index:03d>.png      references + every seed of one prompt, labelled
    OUT/<subject>/contact-sheet.png                every prompt of one subject
    OUT/index.jsonl                                one line per finished (or failed) job
    OUT/run.json                                   the run summary
    OUT/manifest.resolved.yaml                     the manifest with the preset merged: reproduces the run

Guarantees the runner builds on:
- nothing is written outside OUT (`safe_join` resolves every path, symlinks included);
- every file appears whole or not at all (temporary file in the same directory, fsync, `os.replace`,
  fsync of the directory); a failed write removes its temporary file and keeps the previous file;
- an image is finished exactly when its sidecar parses, carries the job's id, and its PNG exists:
  the PNG is written before the sidecar, so a crash in between leaves an unfinished job, never a
  sidecar without its image;
- `index.jsonl` only ever grows by whole lines (one `write` on an O_APPEND descriptor), and
  `repair_index` rebuilds it from the sidecars at the start of a run.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import ExifTags, Image, ImageDraw, ImageFont, ImageOps, PngImagePlugin

from .errors import EXIT_INVALID, EXIT_JOBS_FAILED, SqueezeError

if TYPE_CHECKING:
    from .plan import Job

INDEX_NAME = "index.jsonl"
RUN_SUMMARY_NAME = "run.json"
RESOLVED_MANIFEST_NAME = "manifest.resolved.yaml"
CONTACT_SHEET_NAME = "contact-sheet.png"
# Names at the top of OUT that a subject directory must not take.
RESERVED_NAMES = frozenset({INDEX_NAME, RUN_SUMMARY_NAME, RESOLVED_MANIFEST_NAME})

PNG_PARAMETERS_KEY = "parameters"  # the chunk A1111, ComfyUI viewers and exiftool show
PNG_RECORD_KEY = "squeeze"  # the full JSON record
RECORD_FORMAT = 1  # bumped when a field changes meaning

# `.<name>.<pid>.tmp`: hidden, recognisable, and tied to the process that wrote it.
_TEMP_FILE_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class OutputWriteError(SqueezeError):
    """A file under the output directory could not be written (disk full, permission denied, ...).

    Exit code 1: the input was valid and everything finished before the error is kept; running the
    same command again resumes. ``path`` is the file that failed, ``errno`` the OS error number.
    """

    exit_code = EXIT_JOBS_FAILED

    def __init__(self, message: str, hint: str | None = None, *, path: Path, errno: int | None = None):
        super().__init__(message, hint)
        self.path = path
        self.errno = errno

    @classmethod
    def from_os_error(cls, path: Path, error: OSError, doing: str = "write") -> OutputWriteError:
        """One clear message for an OS error: which file, what the OS said, what to do."""
        code = error.errno
        reason = error.strerror or str(error)
        if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
            hint = (
                "free some space (or raise the quota) on the disk that holds the output directory and run "
                "the same command again: finished images are kept and skipped"
            )
        elif code in (errno.EACCES, errno.EPERM):
            hint = f"make {path.parent} writable for this user, or choose another --out"
        elif code == errno.EROFS:
            hint = "the output directory is on a read-only file system: choose another --out"
        else:
            hint = "check the output directory and run the same command again: finished images are kept"
        return cls(f"cannot {doing} {path}: {reason}", hint, path=path, errno=code)


class UnsafeOutputPathError(SqueezeError):
    """A path that would land outside the output directory, or on one of its reserved names."""

    exit_code = EXIT_INVALID


# ----------------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------------


def safe_join(out_dir: str | os.PathLike, *parts: str) -> Path:
    """Join `parts` under `out_dir`, refusing anything that resolves outside it.

    Absolute parts, `..` and symlinks (anywhere along the path, including the last component) are all
    caught by resolving the result and comparing it with the resolved `out_dir`.

    Returns:
        `Path`: `out_dir / parts` as given (not resolved), so messages show the user's own path.

    Raises:
        `UnsafeOutputPathError`: when the path escapes `out_dir`.
    """
    base = Path(out_dir)
    for part in parts:
        if not part or "\0" in part or os.path.isabs(part):
            raise UnsafeOutputPathError(
                f"refusing to write {part!r}: not a relative name under the output directory {base}",
                "names under --out must be plain relative names",
            )
    path = base.joinpath(*parts)
    try:
        root = base.resolve()
        resolved = path.resolve()
    except (OSError, RuntimeError) as error:  # a symlink loop
        raise UnsafeOutputPathError(
            f"refusing to write {path}: it cannot be resolved ({error})",
            "remove the looping symlink, or choose another --out",
        ) from error
    if resolved != root and root not in resolved.parents:
        raise UnsafeOutputPathError(
            f"refusing to write {path}: it resolves to {resolved}, outside the output directory {root}",
            "remove the symlink or '..' that leads out, or choose another --out",
        )
    return path


def check_subject_name(subject: str) -> str:
    """`subject`, when it can be a directory directly under OUT: one plain name, not hidden, not a
    run-level file name. The manifest validates names first; this is the last line of defence."""
    if (
        subject in ("", ".", "..")
        or subject.startswith(".")
        or "/" in subject
        or "\\" in subject
        or subject in RESERVED_NAMES
    ):
        raise UnsafeOutputPathError(
            f"subject name {subject!r} cannot be used as a directory under the output directory",
            "use letters, digits, '-' and '_' in subject names",
        )
    return subject


def subject_dir(out_dir: str | os.PathLike, subject: str) -> Path:
    """`OUT/<subject>`."""
    return safe_join(out_dir, check_subject_name(subject))


def image_stem(job: Job) -> str:
    """`<prompt_index:03d>-s<seed>`: never the prompt text, so names stay short, safe and stable."""
    return f"{job.prompt_index:03d}-s{job.seed}"


def image_name(job: Job) -> str:
    """The PNG's name relative to OUT, with `/`: `<subject>/<prompt_index:03d>-s<seed>.png`."""
    return f"{check_subject_name(job.subject)}/{image_stem(job)}.png"


def sidecar_name(job: Job) -> str:
    """The sidecar's name relative to OUT, with `/`: `<subject>/<prompt_index:03d>-s<seed>.json`."""
    return f"{check_subject_name(job.subject)}/{image_stem(job)}.json"


def image_path(out_dir: str | os.PathLike, job: Job) -> Path:
    """`OUT/<subject>/<prompt_index:03d>-s<seed>.png`."""
    return safe_join(out_dir, *image_name(job).split("/"))


def sidecar_path(out_dir: str | os.PathLike, job: Job) -> Path:
    """`OUT/<subject>/<prompt_index:03d>-s<seed>.json`: the per-image record, written after the PNG."""
    return safe_join(out_dir, *sidecar_name(job).split("/"))


def grid_path(out_dir: str | os.PathLike, subject: str, prompt_index: int) -> Path:
    """`OUT/<subject>/grid-<prompt_index:03d>.png`."""
    return safe_join(subject_dir(out_dir, subject), f"grid-{prompt_index:03d}.png")


def contact_sheet_path(out_dir: str | os.PathLike, subject: str) -> Path:
    """`OUT/<subject>/contact-sheet.png`."""
    return safe_join(subject_dir(out_dir, subject), CONTACT_SHEET_NAME)


def index_path(out_dir: str | os.PathLike) -> Path:
    return safe_join(out_dir, INDEX_NAME)


def run_summary_path(out_dir: str | os.PathLike) -> Path:
    return safe_join(out_dir, RUN_SUMMARY_NAME)


def resolved_manifest_path(out_dir: str | os.PathLike) -> Path:
    return safe_join(out_dir, RESOLVED_MANIFEST_NAME)


# ----------------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------------


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable. Some platforms and file systems cannot open or fsync a directory;
    # the file is already complete and in place then, so there is nothing more to do.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def ensure_dir(path: str | os.PathLike) -> Path:
    """`mkdir -p`, with OS errors turned into `OutputWriteError`."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputWriteError.from_os_error(path, error, "create the directory") from error
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` so that `path` holds either its old content or all of `data`, never a part.

    The bytes go to `.<name>.<pid>.tmp` beside `path`, are flushed and fsynced, the temporary file is
    renamed over `path` (`os.replace`, atomic on POSIX and Windows), then the directory is fsynced so
    the rename survives a power cut. The parent directory is created if needed.

    Raises:
        `OutputWriteError`: on any OS error (disk full, permission denied, ...); the temporary file is
        removed and the previous content of `path`, if any, is untouched.
    """
    path = Path(path)
    ensure_dir(path.parent)
    temp = _temp_path(path)
    try:
        # A leftover from a dead process that had our pid: O_EXCL below would refuse it.
        temp.unlink(missing_ok=True)
        # 0o666 and the umask, like any other file the user creates (mkstemp would give 0o600).
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as error:
        raise OutputWriteError.from_os_error(path, error) from error
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException as error:  # OSError, and the stop-at-once exception of a second Ctrl-C
        try:
            temp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(error, OSError):
            raise OutputWriteError.from_os_error(path, error) from error
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """`atomic_write_bytes` for text (UTF-8 by default, `\\n` line endings on every platform)."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Pretty JSON (indent 2, UTF-8, trailing newline), written atomically."""
    return atomic_write_text(
        path, json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default) + "\n"
    )


def remove_stale_temp_files(out_dir: str | os.PathLike) -> list[Path]:
    """Remove temporary files left by killed runs in `out_dir` and its subject directories.

    Only names of the form `.<name>.<pid>.tmp` are touched, and only when `<pid>` is not a live process
    on this machine other than this one (a temporary file of this process is stale at start-up). Call it
    at the start of a run, while holding the output directory's lock and before any worker writes.

    Returns:
        `list[Path]`: the files removed.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    removed = []
    directories = [out_dir] + [entry for entry in _scandir(out_dir) if entry.is_dir(follow_symlinks=False)]
    for directory in directories:
        for entry in _scandir(directory):
            match = _TEMP_FILE_RE.match(entry.name)
            if match is None or not entry.is_file(follow_symlinks=False):
                continue
            pid = int(match.group("pid"))
            if pid != os.getpid() and _process_alive(pid):
                continue
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            except OSError as error:
                raise OutputWriteError.from_os_error(
                    Path(entry.path), error, "remove the stale temporary file"
                ) from error
            removed.append(Path(entry.path))
    return removed


def _scandir(directory: str | os.PathLike) -> list[os.DirEntry]:
    try:
        with os.scandir(directory) as entries:
            return list(entries)
    except OSError:
        return []


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, belongs to someone else
    except (OSError, ValueError, OverflowError):
        return False
    return True


def _json_default(obj: Any) -> Any:
    # Records carry dataclasses (SamplingParams), tuples and paths; make them JSON without surprises.
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


# ----------------------------------------------------------------------------------------------------
# Records, PNG metadata, saving an image
# ----------------------------------------------------------------------------------------------------


def package_versions() -> dict[str, str]:
    """Versions of Python and the packages that determine the pixels, read without importing them."""
    versions = {"python": sys.version.split()[0]}
    for name in ("squeeze_cli", "torch", "diffusers", "transformers", "accelerate", "peft", "pillow"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    if "squeeze_cli" not in versions:
        from . import __version__

        versions["squeeze_cli"] = __version__
    return versions


def _params_dict(params: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        params = dataclasses.asdict(params)
    return json.loads(json.dumps(dict(params), default=_json_default))  # tuples → lists, plain JSON


def _stage_counts(stage_plan: Mapping[str, Any]) -> list[int] | None:
    if "counts" in stage_plan:
        return [int(count) for count in stage_plan["counts"]]
    if "stages" in stage_plan:
        stages = list(stage_plan["stages"])
        return [stages.count(stage) for stage in (1, 2, 3)]
    return None


def _steps_per_stage(counts: list[int] | None) -> dict[str, int] | None:
    if counts is None or len(counts) != 3:
        return None
    return {"mllm_only": counts[0], "mllm_and_reference": counts[1], "reference": counts[2]}


def image_record(
    job: Job,
    *,
    preset_name: str,
    model_info: Mapping[str, Any],
    stage_plan: Mapping[str, Any] | Any,
    timings: Mapping[str, float],
    versions: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The full record of one image: what the sidecar holds and the PNG's `squeeze` chunk embeds.

    Args:
        job (`Job`): the planned job the image was made for.
        preset_name (`str`): the model preset (`tiny`, `paper`, a path).
        model_info (`dict`): model ids and revisions, e.g. `{"transformer": {"id": ..., "revision": ...}}`.
        stage_plan (`dict` or `StagePlan`): the denoising stage schedule (`StagePlan.to_dict()`).
        timings (`dict`): seconds spent, e.g. `{"denoise": 3.1, "decode": 0.2, "total": 3.6}`.
        versions (`dict`, *optional*): package versions; `package_versions()` when not given.
    """
    if not isinstance(stage_plan, Mapping) and hasattr(stage_plan, "to_dict"):
        stage_plan = stage_plan.to_dict()
    stage_plan = dict(stage_plan)
    counts = _stage_counts(stage_plan)
    return {
        "format": RECORD_FORMAT,
        "job_id": job.job_id,
        "job_index": job.index,
        "subject": job.subject,
        "subject_index": job.subject_index,
        "class_noun": job.class_noun,
        "prompt_index": job.prompt_index,
        "prompt": job.prompt,
        "seed": job.seed,
        "params": _params_dict(job.params),
        "stage_plan": stage_plan,
        "steps_per_stage": _steps_per_stage(counts),
        "references": list(job.references),
        "preset": preset_name,
        "model": json.loads(json.dumps(dict(model_info), default=_json_default)),
        "versions": dict(versions) if versions is not None else package_versions(),
        "timings": {name: round(float(seconds), 4) for name, seconds in timings.items()},
        "files": {"image": image_name(job), "sidecar": sidecar_name(job)},  # relative to OUT
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _format_value(value: Any) -> str:
    text = str(value)
    # A1111's parser splits on ", " and ": "; it reads JSON-quoted values back as one value.
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:\n"') else text


def parameters_text(record: Mapping[str, Any]) -> str:
    """The `parameters` chunk, in the A1111 form image viewers and galleries read::

        <prompt>
        Negative prompt: <negative prompt>
        Steps: 28, Sampler: FlowMatchEuler, CFG scale: 2.5, Seed: 123, Size: 512x512, Model: paper, ...

    `CFG scale` is the distilled guidance (`guidance_scale`); true CFG, when on, is `True CFG scale`.
    """
    params = record.get("params", {})
    fields: dict[str, Any] = {
        "Steps": params.get("num_inference_steps"),
        "Sampler": "FlowMatchEuler",
        "CFG scale": params.get("guidance_scale"),
        "Seed": record.get("seed"),
        "Size": f"{params.get('width')}x{params.get('height')}",
        "Model": record.get("preset"),
    }
    if params.get("true_cfg_scale", 1.0) not in (None, 1, 1.0):
        fields["True CFG scale"] = params["true_cfg_scale"]
    thresholds = params.get("stage_thresholds")
    if thresholds is not None:
        fields["Stage thresholds"] = "/".join(str(t) for t in thresholds)
    counts = _stage_counts(record.get("stage_plan") or {})
    if counts:
        fields["Stage steps"] = "/".join(str(c) for c in counts)
    if params.get("keep_mllm_condition"):
        fields["Keep MLLM condition"] = True
    if params.get("reference_size") is not None:
        fields["Reference size"] = params["reference_size"]
    fields["Subject"] = record.get("subject")
    fields["Job id"] = record.get("job_id")
    version = (record.get("versions") or {}).get("squeeze_cli")
    if version:
        fields["Version"] = f"squeeze {version}"
    lines = [str(record.get("prompt", ""))]
    negative = params.get("negative_prompt")
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(
        ", ".join(f"{key}: {_format_value(value)}" for key, value in fields.items() if value is not None)
    )
    return "\n".join(lines)


def encode_png(image: Image.Image, record: Mapping[str, Any]) -> bytes:
    """PNG bytes of `image` with the record embedded in two text chunks.

    - `parameters`: `parameters_text(record)` (tEXt, or iTXt when the prompt is not Latin-1);
    - `squeeze`: the full record as JSON (compressed iTXt, UTF-8).
    """
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_PARAMETERS_KEY, parameters_text(record))
    info.add_itxt(PNG_RECORD_KEY, json.dumps(record, ensure_ascii=False, default=_json_default), zip=True)
    if image.mode not in ("RGB", "RGBA", "L", "LA"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_png_record(path: str | os.PathLike) -> dict[str, Any]:
    """The full record embedded in a PNG written by squeeze (reads the chunks, does not decode pixels).

    Raises:
        `ValueError`: when the file has no `squeeze` chunk or it is not a JSON object.
    """
    with Image.open(path) as image:
        text = image.info.get(PNG_RECORD_KEY)  # chunks before the pixel data; written there by encode_png
    if text is None:
        raise ValueError(f"{path} has no '{PNG_RECORD_KEY}' metadata chunk: it was not written by squeeze")
    record = json.loads(str(text))
    if not isinstance(record, dict):
        raise ValueError(f"{path}: the '{PNG_RECORD_KEY}' metadata chunk is not a JSON object")
    return record


def read_png_parameters(path: str | os.PathLike) -> str | None:
    """The A1111-style `parameters` text of a PNG, or None."""
    with Image.open(path) as image:
        text = image.info.get(PNG_PARAMETERS_KEY)
    return None if text is None else str(text)


def save_image(out_dir: str | os.PathLike, job: Job, image: Image.Image, record: Mapping[str, Any]) -> Path:
    """Write the PNG (atomically) and then its sidecar (atomically); returns the PNG's path.

    The order is the resume guarantee: the sidecar is the "done" marker, so it is written only once the
    PNG is complete and in place.
    """
    png = image_path(out_dir, job)
    atomic_write_bytes(png, encode_png(image, record))
    atomic_write_json(sidecar_path(out_dir, job), record)
    return png


# ----------------------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------------------


def read_sidecar(path: str | os.PathLike) -> dict[str, Any] | None:
    """The sidecar's record, or None when it is missing, unreadable or not a JSON object."""
    try:
        with open(path, encoding="utf-8") as file:
            record = json.load(file)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def finished_records(out_dir: str | os.PathLike, jobs: Iterable[Job]) -> dict[str, dict[str, Any]]:
    """`{job_id: record}` for the jobs already finished in `out_dir`.

    A job is finished when its sidecar parses, carries the same `job_id`, and its PNG exists and is not
    empty. Both were written atomically and the PNG first, so this is enough: no image is decoded. Files
    from a job with another id (the manifest changed its prompt or parameters) do not count; they are
    overwritten when the job runs.
    """
    done = {}
    directories: dict[str, Path] = {}  # one safe_join (a resolve) per subject, not per job: plans are big
    for job in jobs:
        directory = directories.get(job.subject)
        if directory is None:
            directory = directories[job.subject] = subject_dir(out_dir, job.subject)
        stem = image_stem(job)
        record = read_sidecar(directory / f"{stem}.json")
        if record is None or record.get("job_id") != job.job_id:
            continue
        try:
            if (directory / f"{stem}.png").stat().st_size < len(_PNG_SIGNATURE):
                continue
        except OSError:
            continue
        done[job.job_id] = record
    return done


def finished_job_ids(out_dir: str | os.PathLike, jobs: Iterable[Job]) -> set[str]:
    """The ids of the jobs already finished in `out_dir` (see `finished_records`)."""
    return set(finished_records(out_dir, jobs))


# ----------------------------------------------------------------------------------------------------
# The run index
# ----------------------------------------------------------------------------------------------------


def index_entry(record: Mapping[str, Any]) -> dict[str, Any]:
    """The `index.jsonl` line of a finished image, from its record."""
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
    }


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
    return (json.dumps(entry, ensure_ascii=False, default=_json_default) + "\n").encode("utf-8")


def append_index(out_dir: str | os.PathLike, entry: Mapping[str, Any]) -> None:
    """Append one line to `index.jsonl` with a single `write` on an O_APPEND descriptor, then fsync.

    One write of one whole line means a crash leaves the line entirely there or entirely absent, and
    several processes may append to the same index without interleaving. If the file does not end with
    a newline (a write cut short by a full disk), the line starts on a fresh one.

    Raises:
        `OutputWriteError`: on any OS error or a short write.
    """
    path = index_path(out_dir)
    ensure_dir(path.parent)
    data = _index_line(entry)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as error:
        raise OutputWriteError.from_os_error(path, error) from error
    try:
        size = os.fstat(fd).st_size
        if size and _last_byte(path, size) != b"\n":
            data = b"\n" + data
        written = os.write(fd, data)
        if written != len(data):
            _cut_short_append(fd, written)
            reason = f"{os.strerror(errno.ENOSPC)} (only {written} of {len(data)} bytes written)"
            raise OSError(errno.ENOSPC, reason)
        os.fsync(fd)
    except OSError as error:
        raise OutputWriteError.from_os_error(path, error) from error
    finally:
        os.close(fd)


def _cut_short_append(fd: int, written: int) -> None:
    # A full disk can take part of a line. Only the run holding the lock appends to an index, so when the
    # file still ends where our write ended, those bytes are ours to remove; repair_index is the fallback.
    try:
        end = os.lseek(fd, 0, os.SEEK_CUR)
        if written and os.fstat(fd).st_size == end:
            os.ftruncate(fd, end - written)
    except OSError:
        pass


def _last_byte(path: Path, size: int) -> bytes:
    with open(path, "rb") as file:
        file.seek(size - 1)
        return file.read(1)


def _parse_index(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """The valid entries of an index file, and whether any line was invalid."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], False
    except OSError as error:
        raise OutputWriteError.from_os_error(path, error, "read") from error
    entries, invalid = [], False
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            entry = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            invalid = True
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("job_id"), str):
            invalid = True
            continue
        entries.append(entry)
    if data and not data.endswith(b"\n"):
        invalid = True  # a cut-off last line; rewriting ends the file cleanly
    return entries, invalid


def read_index(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The valid lines of `index.jsonl`, in file order (broken lines are skipped)."""
    return _parse_index(index_path(out_dir))[0]


def repair_index(
    out_dir: str | os.PathLike,
    done_records: Mapping[str, Mapping[str, Any]] | Iterable[Mapping[str, Any]],
    *,
    pending_job_ids: Iterable[str] = (),
) -> bool:
    """Make `index.jsonl` agree with the finished images, at the start of a run.

    - invalid or truncated lines are dropped;
    - one line per job id is kept: the last one, except that a finished job always keeps an `ok` line;
    - finished images without a line (a crash between the sidecar and the index append) get one;
    - lines of `pending_job_ids` (jobs about to run again: unfinished, failed, or `--overwrite`) are
      dropped, so the line the new run appends is the only one.

    Lines of jobs not in this run are kept. The file is rewritten atomically, and only when something
    changed. Call it once, before any worker appends.

    Args:
        done_records: `finished_records(...)`, as a `{job_id: record}` mapping or a list of records.

    Returns:
        `bool`: whether the index was rewritten.
    """
    if isinstance(done_records, Mapping):
        done = {job_id: dict(record) for job_id, record in done_records.items()}
    else:
        done = {record["job_id"]: dict(record) for record in done_records}
    pending = set(pending_job_ids) - set(done)
    path = index_path(out_dir)
    entries, changed = _parse_index(path)

    kept: dict[str, dict[str, Any]] = {}  # insertion order = order of each id's kept line
    for entry in entries:
        job_id = entry["job_id"]
        if job_id in pending:
            changed = True
            continue
        if job_id in done and entry.get("status") != "ok":
            changed = True  # an old failure of a job that has finished since
            continue
        if job_id in kept:
            changed = True
            del kept[job_id]  # keep the last line, at its position
        kept[job_id] = entry
    for job_id, record in done.items():
        if job_id not in kept:
            kept[job_id] = index_entry(record)
            changed = True
    if not changed:
        return False
    atomic_write_bytes(path, b"".join(_index_line(entry) for entry in kept.values()))
    return True


# ----------------------------------------------------------------------------------------------------
# Run-level files
# ----------------------------------------------------------------------------------------------------


def write_run_summary(out_dir: str | os.PathLike, summary: Mapping[str, Any]) -> Path:
    """`OUT/run.json`, written atomically (see docs/outputs.md for its fields)."""
    return atomic_write_json(run_summary_path(out_dir), dict(summary))


def write_resolved_manifest(out_dir: str | os.PathLike, text: str) -> Path:
    """`OUT/manifest.resolved.yaml`: the manifest with the preset merged; `squeeze gen` on it reproduces."""
    return atomic_write_text(resolved_manifest_path(out_dir), text if text.endswith("\n") else text + "\n")


# ----------------------------------------------------------------------------------------------------
# Grids and contact sheets
# ----------------------------------------------------------------------------------------------------

GRID_THUMB_HEIGHT = 256
SHEET_THUMB_HEIGHT = 160
GRID_MAX_COLUMNS = 8  # generated images per grid row before wrapping
SHEET_MAX_COLUMNS = 12  # images per contact-sheet row; the rest are counted in the row's caption
_PAD = 8
_GAP = 24  # between the references and the generated images
_BACKGROUND = (255, 255, 255)
_TEXT = (20, 20, 20)
_MUTED = (110, 110, 110)
_PLACEHOLDER = (225, 225, 225)


@dataclasses.dataclass(frozen=True)
class SheetRow:
    """One prompt of a contact sheet: its index, text, and `(seed, image path or None)` entries."""

    prompt_index: int
    prompt: str
    entries: Sequence[tuple[int, str | os.PathLike | None]]


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_width(font: Any, text: str) -> int:
    left, _, right, _ = font.getbbox(text)
    return int(right - left)


def _line_height(font: Any) -> int:
    _, top, _, bottom = font.getbbox("Ag|")
    return int(bottom - min(top, 0)) + 2


def _fit(font: Any, text: str, max_width: int) -> str:
    """`text` on one line, cut with '...' to fit `max_width` pixels."""
    text = " ".join(text.split())
    if _text_width(font, text) <= max_width:
        return text
    low, high = 0, len(text)
    while low < high:  # longest prefix that fits with the ellipsis
        middle = (low + high + 1) // 2
        if _text_width(font, text[:middle].rstrip() + "...") <= max_width:
            low = middle
        else:
            high = middle - 1
    return text[:low].rstrip() + "..."


def upright_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of the image as `load_rgb` returns it, read from the header alone."""
    with Image.open(path) as image:
        try:
            orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        except Exception:  # a malformed EXIF block: `load_rgb` uses the image as stored
            orientation = 1
        width, height = image.size
    # EXIF orientations 5-8 are rotations by 90 degrees: the upright image is the stored one turned.
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def load_rgb(path: str | os.PathLike, max_side: int | None = None) -> Image.Image:
    """An image as 8-bit RGB, upright (EXIF orientation applied), transparency flattened onto white.

    Every mode a photo folder may hold comes out as what a viewer shows: 16-bit grayscale is scaled to 8
    bits rather than clipped, 32-bit integer and float grayscale are scaled by their range, CMYK is
    converted, palette and grayscale transparency (including a PNG's tRNS colour) is composited on white.
    A broken EXIF block is ignored (the image is used as stored) rather than failing the subject.
    `max_side` lets JPEG decode at a reduced size, which is much faster for thumbnails of large photos.
    """
    with Image.open(path) as image:
        if max_side is not None and image.format == "JPEG":
            image.draft("RGB", (max_side, max_side))
        try:
            image = ImageOps.exif_transpose(image)
        except Exception:  # a malformed EXIF block must not cost the subject its reference
            image.load()
        if image.mode.startswith("I;16"):
            # The bit depth is known: 0..65535 maps to 0..255. convert("L") would clip all above 255 to white.
            image = image.convert("I").point(lambda value: value * (255 / 65535)).convert("L")
            image.info.pop("transparency", None)  # a 16-bit tRNS value means nothing at 8 bits
        elif image.mode in ("I", "F"):
            low, high = image.getextrema()
            if image.mode == "F" and 0 <= low and high <= 1.0:
                scale = 255.0  # float images in [0, 1]
            elif high > 65535:
                scale = 255 / high
            elif high > 255:
                scale = 255 / 65535  # 16-bit data widened to 32 bits
            else:
                scale = 1.0
            image = image.point(lambda value: value * scale).convert("L")
            image.info.pop("transparency", None)  # a 16-bit tRNS value means nothing at 8 bits
        if image.mode in ("P", "PA") or "transparency" in image.info:
            image = image.convert("RGBA")
        if image.mode in ("RGBA", "LA", "La", "RGBa"):
            rgba = image.convert("RGBA")
            flat = Image.new("RGB", rgba.size, _BACKGROUND)
            flat.paste(rgba, mask=rgba.getchannel("A"))
            return flat
        return image.convert("RGB")


def _thumbnail(path: str | os.PathLike | None, height: int) -> Image.Image | None:
    """A thumbnail `height` pixels high (at most twice as wide), or None when the image is unreadable."""
    if path is None:
        return None
    try:
        image = load_rgb(path, max_side=2 * height)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None  # a grid is a view of the run; a missing or broken image is shown, not fatal
    return ImageOps.contain(image, (2 * height, height), Image.Resampling.LANCZOS)


def _draw_tile(
    canvas: Image.Image, x: int, y: int, thumb: Image.Image | None, label: str, height: int
) -> int:
    """Paste `thumb` (or a grey placeholder) at (x, y) with `label` under it; returns the tile width."""
    font = _font(14)
    width = thumb.width if thumb is not None else height
    draw = ImageDraw.Draw(canvas)
    if thumb is None:
        draw.rectangle([x, y, x + width - 1, y + height - 1], fill=_PLACEHOLDER)
        note = _fit(font, "missing", width - 4)
        draw.text(
            (x + (width - _text_width(font, note)) // 2, y + height // 2 - 8), note, fill=_MUTED, font=font
        )
    else:
        canvas.paste(thumb, (x, y + (height - thumb.height) // 2))
    label = _fit(font, label, width)
    draw.text((x + (width - _text_width(font, label)) // 2, y + height + 3), label, fill=_TEXT, font=font)
    return width


def _tile_width(thumb: Image.Image | None, height: int) -> int:
    return thumb.width if thumb is not None else height


def _encode_plain_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def write_prompt_grid(
    out_dir: str | os.PathLike,
    subject: str,
    prompt_index: int,
    prompt_text: str,
    reference_paths: Sequence[str | os.PathLike],
    entries: Sequence[tuple[int, str | os.PathLike | None]],
    *,
    thumb_height: int = GRID_THUMB_HEIGHT,
    max_columns: int = GRID_MAX_COLUMNS,
) -> Path:
    """`OUT/<subject>/grid-<prompt_index:03d>.png`: the references, then every seed of one prompt.

    Layout: a caption `#<prompt_index> <prompt>` (cut to the width), then the reference thumbnails
    labelled `ref 1`, `ref 2`, ..., a gap, and the generated thumbnails labelled `seed <seed>`, in rows of
    at most `max_columns`. Thumbnails share one height. Missing or unreadable images are grey tiles.

    Args:
        entries: `(seed, image path)` pairs in the order to show them; the path may be None (failed).
    """
    label_height = _line_height(_font(14)) + 6
    caption_font = _font(18)
    caption_height = _line_height(caption_font) + 2 * _PAD
    row_height = thumb_height + label_height + _PAD

    references = [_thumbnail(path, thumb_height) for path in reference_paths]
    generated = [(seed, _thumbnail(path, thumb_height)) for seed, path in entries]
    rows = [generated[i : i + max_columns] for i in range(0, len(generated), max(1, max_columns))] or [[]]

    references_width = sum(_tile_width(thumb, thumb_height) + _PAD for thumb in references)
    generated_x = _PAD + references_width + (_GAP if references else 0)
    rows_width = max(sum(_tile_width(thumb, thumb_height) + _PAD for _, thumb in row) for row in rows)
    width = max(generated_x + rows_width, 2 * thumb_height)
    height = caption_height + len(rows) * row_height + _PAD

    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    caption = _fit(caption_font, f"#{prompt_index:03d}  {prompt_text}", width - 2 * _PAD)
    draw.text((_PAD, _PAD), caption, fill=_TEXT, font=caption_font)

    x, y = _PAD, caption_height
    for number, thumb in enumerate(references, start=1):
        x += _draw_tile(canvas, x, y, thumb, f"ref {number}", thumb_height) + _PAD
    if references:  # a rule between what was given and what was made
        rule_x = generated_x - _GAP // 2 - _PAD // 2
        draw.line([rule_x, y, rule_x, y + thumb_height], fill=_MUTED, width=2)
    for row in rows:
        x = generated_x
        for seed, thumb in row:
            x += _draw_tile(canvas, x, y, thumb, f"seed {seed}", thumb_height) + _PAD
        y += row_height

    return atomic_write_bytes(grid_path(out_dir, subject, prompt_index), _encode_plain_png(canvas))


def write_contact_sheet(
    out_dir: str | os.PathLike,
    subject: str,
    reference_paths: Sequence[str | os.PathLike],
    rows: Sequence[SheetRow],
    *,
    thumb_height: int = SHEET_THUMB_HEIGHT,
    max_columns: int = SHEET_MAX_COLUMNS,
) -> Path:
    """`OUT/<subject>/contact-sheet.png`: the subject's references once, then one row per prompt.

    Each prompt row has a caption `#<prompt_index> <prompt>` and its images labelled `seed <seed>`; a row
    shows at most `max_columns` images and its caption says how many more there are.
    """
    label_height = _line_height(_font(14)) + 6
    caption_font = _font(16)
    caption_height = _line_height(caption_font) + _PAD
    block_height = caption_height + thumb_height + label_height + _PAD

    references = [_thumbnail(path, thumb_height) for path in reference_paths]
    prompt_rows = [
        (row, [(seed, _thumbnail(path, thumb_height)) for seed, path in list(row.entries)[:max_columns]])
        for row in rows
    ]
    widths = [sum(_tile_width(thumb, thumb_height) + _PAD for thumb in references)]
    widths += [sum(_tile_width(thumb, thumb_height) + _PAD for _, thumb in tiles) for _, tiles in prompt_rows]
    width = max(_PAD + max(widths), 3 * thumb_height)
    height = (1 + len(prompt_rows)) * block_height + _PAD

    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = _PAD
    draw.text(
        (_PAD, y),
        _fit(caption_font, f"{subject}: references", width - 2 * _PAD),
        fill=_TEXT,
        font=caption_font,
    )
    x = _PAD
    for number, thumb in enumerate(references, start=1):
        x += _draw_tile(canvas, x, y + caption_height, thumb, f"ref {number}", thumb_height) + _PAD
    y += block_height
    for row, tiles in prompt_rows:
        draw.line([_PAD, y - _PAD // 2, width - _PAD, y - _PAD // 2], fill=_PLACEHOLDER, width=1)
        more = len(row.entries) - len(tiles)
        suffix = f"  (+{more} more)" if more > 0 else ""
        caption = (
            _fit(caption_font, f"#{row.prompt_index:03d}  {row.prompt}", width - 2 * _PAD - 120) + suffix
        )
        draw.text((_PAD, y), caption, fill=_TEXT, font=caption_font)
        x = _PAD
        for seed, thumb in tiles:
            x += _draw_tile(canvas, x, y + caption_height, thumb, f"seed {seed}", thumb_height) + _PAD
        y += block_height

    return atomic_write_bytes(contact_sheet_path(out_dir, subject), _encode_plain_png(canvas))
