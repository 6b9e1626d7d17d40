"""One `squeeze gen` per output folder: a `filelock` lock that the OS releases when its process dies, even
by kill -9, so a lock left by a dead run is simply taken over."""

from __future__ import annotations

import os
from pathlib import Path

import filelock

from squeeze_cli.errors import SqueezeError
from squeeze_cli.outputs import LOCK_NAME, OutputWriteError, ensure_dir


class OutputInUseError(SqueezeError):
    """Another `squeeze gen` holds the output directory."""


def _record_pid(fd: int) -> None:
    # The pid is for the message a second run prints; the lock itself is the OS lock. A full disk must not
    # keep a run from starting (it may have nothing left to write), so failing to record it is fine.
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
    except OSError:
        pass


class DirectoryLock:
    """The lock of one run folder (`OUT` or a shard's folder). Not re-entrant across instances."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_NAME
        # No soft-lock fallback: a lock file without an OS lock would outlive a killed run.
        self._lock = filelock.FileLock(self.path, fallback_to_soft=False, on_acquired=_record_pid)

    @property
    def held(self) -> bool:
        return self._lock.is_locked

    def acquire(self) -> None:
        ensure_dir(self.path.parent)
        try:
            self._lock.acquire(blocking=False)
        except filelock.Timeout:
            raise OutputInUseError(
                f"{self.path.parent} is in use by another squeeze gen (pid {self._holder()})",
                "wait for it to finish, or choose another --out",
            ) from None
        except OSError as error:  # a symlink in its place, no permission, no lock support
            raise OutputWriteError.from_os_error(self.path, error, "create the lock file") from error

    def _holder(self) -> str:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return "unknown"
        try:
            return os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        except OSError:
            return "unknown"
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release()
