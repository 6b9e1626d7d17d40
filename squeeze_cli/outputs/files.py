"""Atomic writes: every file appears whole or not at all, and a failed write keeps the previous file."""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from ..errors import EXIT_JOBS_FAILED, SqueezeError
from ..reading import FileTooLargeError, NotARegularFileError
from .layout import VARIANTS_DIR_NAME, UnsafeOutputPathError

# `.<name>.<pid>.tmp`: hidden, recognisable, and tied to the process that wrote it.
_TEMP_FILE_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")


class OutputWriteError(SqueezeError):
    """A file under the output directory could not be written (disk full, permission denied, ...).

    Exit code 1: the input was valid and everything finished before the error is kept; running the
    same command again resumes. ``path`` is the file that failed, ``errno`` the OS error number.
    """

    exit_code = EXIT_JOBS_FAILED

    def __init__(
        self,
        message: str,
        hint: str | None = None,
        *,
        path: Path,
        errno: int | None = None,
        fix: str | None = None,
    ):
        super().__init__(message, hint)
        self.path = path
        self.errno = errno
        # What to fix, without how to go on (the hint's first half): `train` adds `--resume latest`.
        self.fix = fix or write_fix(path, errno)

    @classmethod
    def from_os_error(cls, path: Path, error: OSError, doing: str = "write") -> OutputWriteError:
        """One clear message for an OS error: which file, what the OS said, what to do."""
        code = error.errno
        reason = error.strerror or str(error)
        if isinstance(error, NotARegularFileError):  # a FIFO, a device or a folder in place of a run file
            fix = hint = "remove it: squeeze writes that file itself (a regular file, never through a link)"
        elif isinstance(error, FileTooLargeError):  # squeeze's own limit for a file it reads whole
            fix = hint = "is it the right file? squeeze never writes one this large: move it away"
        else:
            if code == errno.EFBIG:
                limit = file_size_limit()
                reason = (
                    f"file too large (a file-size limit, ulimit -f, of {limit} bytes)"
                    if limit is not None
                    else "file too large for the file system"
                )
            again = "run the same command again: finished images are kept and skipped"
            fix = write_fix(path, code)
            hint = f"{fix} and {again}"
        return cls(f"cannot {doing} {path}: {reason}", hint, path=path, errno=code, fix=fix)


def write_fix(path: Path, code: int | None) -> str:
    """What to fix after the OS error `code` writing `path`: the first half of a write error's hint, the
    command adding how to go on (gen: run the same command again; train: `--resume latest`)."""
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return "free some space (or raise the quota) on the disk that holds the output directory"
    if code in (errno.EACCES, errno.EPERM):
        return f"make {path.parent} writable for this user (or write to another output folder)"
    if code == errno.EROFS:
        return "the output directory is on a read-only file system: write to another output folder"
    if code == errno.EFBIG:
        # A file-size limit (`ulimit -f`): SIGXFSZ is ignored, so the write fails with EFBIG.
        if file_size_limit() is not None:
            return "raise the limit (ulimit -f unlimited)"
        return "move the output directory to a file system that takes larger files"
    return "check the output directory"


def file_size_limit() -> int | None:
    """The process's file-size limit in bytes (`ulimit -f`), or None when there is none."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


# ----------------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------------


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


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
    # squeeze never writes through a symbolic link: a link in place of the folder is refused, one at `path`
    # is replaced by the rename (never followed), and the temporary file is created with O_EXCL|O_NOFOLLOW.
    folder = open_folder(path.parent)
    try:
        temp = _temp_path(path)
        try:
            # A leftover from a dead process that had our pid: O_EXCL below would refuse it.
            temp.unlink(missing_ok=True)
            # 0o666 and the umask, like any other file the user creates (mkstemp would give 0o600).
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | getattr(os, "O_BINARY", 0)
            fd = os.open(temp, flags, 0o666)
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
        try:
            if folder is not None:
                os.fsync(folder)  # the rename survives a power cut; some file systems cannot fsync a folder
        except OSError:
            pass
    finally:
        if folder is not None:
            os.close(folder)
    return path


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def open_folder(directory: Path) -> int | None:
    """A descriptor of `directory` (for fsync), refusing a symbolic link in its place with
    `UnsafeOutputPathError` (exit 2: squeeze never writes through a link). None when the platform or file
    system cannot open a folder: the write goes ahead without the folder's fsync."""
    try:
        return os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW)
    except OSError as error:
        if os.path.islink(directory):
            raise UnsafeOutputPathError(
                f"refusing to write in {directory}: it is a symbolic link",
                "replace the link by a real folder, or choose another --out",
            ) from error
        return None


def fsync_dir(directory: Path) -> None:
    """Make renames in `directory` survive a power cut (refusing a link in its place); a file system that
    cannot fsync a folder is left as it is: the files are already complete and in place."""
    folder = open_folder(directory)
    if folder is None:
        return
    try:
        os.fsync(folder)
    except OSError:
        pass
    finally:
        os.close(folder)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """`atomic_write_bytes` for text (UTF-8 by default, `\\n` line endings on every platform)."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Pretty JSON (indent 2, UTF-8, trailing newline), written atomically."""
    return atomic_write_text(path, strict_json_dumps(obj, indent=2) + "\n")


def remove_stale_temp_files(out_dir: str | os.PathLike, *, only: Collection[str] | None = None) -> list[Path]:
    """Remove temporary files left by killed runs in `out_dir`, its subject directories and their
    variants' folders.

    Only names of the form `.<name>.<pid>.tmp` are touched, and only when `<pid>` is not a live process
    on this machine other than this one (a temporary file of this process is stale at start-up). Call it
    at the start of a run, while holding the output directory's lock and before any worker writes.
    With `only`, just the temporaries of those `<name>`s directly in `out_dir` (eval's own files, which
    it removes without gen's lock).

    Returns:
        `list[Path]`: the files removed.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    removed = []
    directories: list[str | os.PathLike] = [out_dir]
    if only is None:
        subjects = [entry for entry in _scandir(out_dir) if entry.is_dir(follow_symlinks=False)]
        directories += subjects
        for subject in subjects:  # and each channel variant's folder, `<subject>/variants/<name>`
            for entry in _scandir(subject.path):
                if entry.name == VARIANTS_DIR_NAME and entry.is_dir(follow_symlinks=False):
                    directories += [v for v in _scandir(entry.path) if v.is_dir(follow_symlinks=False)]
    for directory in directories:
        for entry in _scandir(directory):
            match = _TEMP_FILE_RE.match(entry.name)
            if match is None or not entry.is_file(follow_symlinks=False):
                continue
            if only is not None and match.group("name") not in only:
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


def _scandir(directory: str | os.PathLike[str]) -> list[os.DirEntry[str]]:
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


def json_default(obj: Any) -> Any:
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


def json_ready(value: Any) -> Any:
    """`value` as plain JSON types, with NaN and infinities as `null`: strict JSON readers (and most
    languages' parsers) refuse them, and a record must stay readable everywhere."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if isinstance(value, Mapping):
        return {key if isinstance(key, str) else str(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", None) == 0:
        return json_ready(value.item())  # a numpy or torch scalar
    return json_ready(json_default(value))


def strict_json_dumps(value: Any, **kwargs: Any) -> str:
    """`json.dumps` of `json_ready(value)` that can never write `NaN` or `Infinity` (UTF-8 kept)."""
    return json.dumps(json_ready(value), ensure_ascii=False, allow_nan=False, **kwargs)
