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
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except IsADirectoryError:
        raise NotARegularFileError(errno.EISDIR, "not a regular file (a folder)", os.fspath(path)) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotARegularFileError(
                errno.EINVAL, f"not a regular file ({file_kind(mode)})", os.fspath(path)
            )
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)  # no effect on a regular file's reads; plain blocking from here on
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular_file(path: str | os.PathLike, *, follow_symlinks: bool = True) -> BinaryIO:
    """`open_regular` as a binary file object (for PIL and other readers that take one)."""
    return os.fdopen(open_regular(path, follow_symlinks=follow_symlinks), "rb")


def read_regular_file(path: str | os.PathLike, max_bytes: int, *, follow_symlinks: bool = True) -> bytes:
    """The whole content of the regular file `path`, refusing more than `max_bytes`.

    Raises:
        `NotARegularFileError`, `FileTooLargeError`, `OSError`.
    """
    fd = open_regular(path, follow_symlinks=follow_symlinks)
    with os.fdopen(fd, "rb") as file:
        data = file.read(max_bytes + 1)  # the size may change under us: the read itself is bounded
    if len(data) > max_bytes:
        raise FileTooLargeError(
            errno.EFBIG,
            f"larger than the {max_bytes // MiB} MiB limit for this kind of file",
            os.fspath(path),
        )
    return data
