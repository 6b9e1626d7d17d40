"""Reading input and run files safely: regular files only, never blocking, never unbounded.

A manifest named `/dev/zero`, a FIFO where a sidecar should be, or a reference swapped for one while the
model loads must give a one-line error (or count as a damaged file), not hang or fill the memory. So every
file squeeze reads is opened with `O_NONBLOCK` (opening a FIFO does not wait for a writer), checked with
`fstat` to be a regular file, and read whole only up to a size limit. Shared by every layer; imports
nothing of squeeze's.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO

MiB = 1024 * 1024
MANIFEST_MAX_BYTES = 64 * MiB  # manifests and recipes: 100000 jobs of prompts fit many times over
SIDECAR_MAX_BYTES = 16 * MiB  # one image's record is a few kB
INDEX_MAX_BYTES = 1024 * MiB  # one line per image: millions of images

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def file_kind(mode: int) -> str:
    """What a `st_mode` describes, in words: `a regular file`, `a FIFO (named pipe)`, ..."""
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return next((name for test, name in _KINDS if test(mode)), "a regular file")


class NotARegularFileError(OSError):
    """The path names a folder, a device, a FIFO or a socket; `strerror` says which."""


class FileTooLargeError(OSError):
    """A file read whole is larger than its limit."""


def open_regular(path: str | os.PathLike, *, follow_symlinks: bool = True) -> int:
    """A read-only descriptor of `path`, which must be a regular file (a symbolic link is refused too
    when `follow_symlinks` is false).

    The open never blocks (`O_NONBLOCK`: a FIFO without a writer opens at once and is then refused).

    Raises:
        `NotARegularFileError`: `path` is a folder, a FIFO, a device or a socket.
        `OSError`: the open failed (`ELOOP` for a refused symbolic link).
    """
    fd, _ = _open_regular(path, follow_symlinks)
    if hasattr(os, "set_blocking"):
        try:
            os.set_blocking(fd, True)  # no effect on a regular file's reads; plain blocking from here on
        except BaseException:
            os.close(fd)
            raise
    return fd


def _open_regular(path: str | os.PathLike, follow_symlinks: bool) -> tuple[int, os.stat_result]:
    """`open_regular`'s descriptor, left non-blocking (a regular file's reads never wait), and its stat."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except IsADirectoryError:
        raise NotARegularFileError(errno.EISDIR, "not a regular file (a folder)", os.fspath(path)) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotARegularFileError(
                errno.EINVAL, f"not a regular file ({file_kind(info.st_mode)})", os.fspath(path)
            )
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def open_regular_file(path: str | os.PathLike, *, follow_symlinks: bool = True) -> BinaryIO:
    """`open_regular` as a binary file object (for PIL and other readers that take one)."""
    return os.fdopen(open_regular(path, follow_symlinks=follow_symlinks), "rb")


def read_regular_file(path: str | os.PathLike, max_bytes: int, *, follow_symlinks: bool = True) -> bytes:
    """The whole content of the regular file `path`, refusing more than `max_bytes`.

    Raises:
        `NotARegularFileError`, `FileTooLargeError`, `OSError`.
    """
    # Plain `os.read` on the descriptor: no file object around it (a no-op rerun reads 100,000 sidecars).
    fd, info = _open_regular(path, follow_symlinks)
    try:
        # The size may change under us: the reads themselves are bounded. Each read is sized by the file,
        # not the limit (a 1 GiB limit is no 1 GiB allocation).
        size = info.st_size
        parts: list[bytes] = []
        left = max_bytes + 1 if size <= max_bytes else 0  # too large already: nothing to read
        chunk = min(size, max_bytes) + 1
        while left > 0:
            part = os.read(fd, min(chunk, left))
            if not part:
                break
            parts.append(part)
            left -= len(part)
            chunk = max(chunk, MiB)  # grown since fstat, or a /proc file that says 0 bytes
    finally:
        os.close(fd)
    data = b"".join(parts) if len(parts) != 1 else parts[0]
    if len(data) > max_bytes or size > max_bytes:
        raise FileTooLargeError(
            errno.EFBIG,
            f"larger than the {size_text(max_bytes)} limit for this kind of file",
            os.fspath(path),
        )
    return data


def size_text(size: int) -> str:
    """A size limit as people write it: `16 MiB`, `1 GiB` (not `1024 MiB`)."""
    if size >= 1024 * MiB and size % (1024 * MiB) == 0:
        return f"{size // (1024 * MiB)} GiB"
    return f"{size // MiB} MiB" if size % MiB == 0 else f"{size:,} bytes"
