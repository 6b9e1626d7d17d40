"""What squeeze learns of each reference photo by reading it whole: that it passes `check_image`, and its
sha256 (job ids hash the references' bytes). A nightly rerun of a 10,000-product catalog would otherwise
read its 30,000 photos every night to find that nothing changed.

`gen` keeps these facts in the output folder (`.squeeze-references.json`), each with the photo's stat
when it was read: size, mtime_ns, ctime_ns, inode and device. A later load trusts an entry while the
stat is the same (the trust git gives its index) and reads the photo again when anything differs. The
ctime is in the stat because no user command can set it back: a photo copied over another with its
mtime kept (`cp -p`, `rsync -t` in place) is read again. The file is a cache: a missing, damaged or
foreign one only means the photos are read, and it holds the references of the last plain run only.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from squeeze_cli.images import check_image
from squeeze_cli.reading import SIDECAR_MAX_BYTES, open_regular_file, read_regular_file

REFERENCE_CACHE_NAME = ".squeeze-references.json"  # in OUT
_FORMAT = 1  # bumped when `check_image` grows stricter: an entry vouches for its verdict
_MAX_BYTES = 64 * SIDECAR_MAX_BYTES  # ~150 bytes per photo: millions of photos

Stamp = tuple[int, int, int, int, int]  # size, mtime_ns, ctime_ns, inode, device


def file_digest(path: str) -> bytes:
    """sha256 of a regular file's bytes, read in 1 MiB chunks (a FIFO swapped in is refused, not read).

    Raises:
        `OSError`: the file cannot be read.
    """
    digest = hashlib.sha256()
    with open_regular_file(path) as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.digest()


def _stamp(path: str) -> Stamp | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino, info.st_dev)


class ReferenceFacts:
    """The references' checks and digests for one manifest load: trusted from `folder`'s cache file while
    a photo's stat is unchanged, read (once) otherwise. `cache_json` is what `gen` saves back."""

    def __init__(self, folder: str | os.PathLike | None = None):
        self._cached = _read_cache(Path(folder) / REFERENCE_CACHE_NAME) if folder is not None else {}
        self._known: dict[str, tuple[Stamp, bytes]] = {}  # this load's references that passed, by path

    def check(self, path: str) -> str | None:
        """`check_image(path)`: why the photo is not a usable reference, or None. A photo whose stat
        matches its cache entry is not read; one that passes is hashed at once, while the page cache
        still holds it."""
        if path in self._known:  # one photo in several subjects: checked once
            return None
        stamp = _stamp(path)
        cached = self._cached.get(path)
        if stamp is not None and cached is not None and cached[0] == stamp:
            self._known[path] = cached
            return None
        problem = check_image(path)
        if problem is None and stamp is not None:
            try:
                digest = file_digest(path)
            except OSError:
                return None  # gone since the check: `digest` reports it where the plan needs it
            if _stamp(path) == stamp:  # not changed while it was read
                self._known[path] = (stamp, digest)
        return problem

    def digest(self, path: str) -> bytes:
        """The photo's sha256: the one `check` learned, or read now.

        Raises:
            `OSError`: the file cannot be read (it changed kind or vanished since the check).
        """
        known = self._known.get(path)
        return known[1] if known is not None else file_digest(path)

    @property
    def changed(self) -> bool:
        """Whether the cache file would differ from the one read: a photo was read, or one is gone."""
        return self._known != self._cached

    def cache_json(self) -> str:
        """The cache file's text: this load's references that passed their check, with their stat."""
        entries = {path: [*stamp, digest.hex()] for path, (stamp, digest) in sorted(self._known.items())}
        return json.dumps({"format": _FORMAT, "references": entries}, separators=(",", ":")) + "\n"


def _read_cache(path: Path) -> dict[str, tuple[Stamp, bytes]]:
    """The entries of a cache file; `{}` when there is none or it cannot be trusted (damaged, another
    format, a link or a FIFO in its place), and a damaged entry is left out: its photo is read again."""
    try:
        data = json.loads(read_regular_file(path, _MAX_BYTES, follow_symlinks=False))
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(data, Mapping) or data.get("format") != _FORMAT:
        return {}
    entries = data.get("references")
    return dict(_entries(entries)) if isinstance(entries, Mapping) else {}


def _entries(entries: Mapping[Any, Any]):
    for path, value in entries.items():
        if not (isinstance(path, str) and isinstance(value, list) and len(value) == 6):
            continue
        *stamp, digest = value
        if not all(type(number) is int for number in stamp) or not isinstance(digest, str):
            continue
        try:
            raw = bytes.fromhex(digest)
        except ValueError:
            continue
        if len(raw) == hashlib.sha256().digest_size:
            yield path, (tuple(stamp), raw)
