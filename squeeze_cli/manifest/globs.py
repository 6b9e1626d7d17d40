"""Reference globs that always finish: `**` follows symbolic links to folders (photos often live behind
them) but never enters a folder twice, so a link to itself or to a parent cannot make the walk endless
(or one photo count as dozens of references)."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator


def glob_paths(pattern: str) -> list[str]:
    """The paths matching `pattern`, like `glob.glob(pattern, recursive=True)`, with each folder walked
    once by `**` (folders are told apart by device and inode, not by path text).

    As with `glob`, names starting with `.` match only a pattern part that starts with `.`, and `**`
    does not enter hidden folders.
    """
    parts = pattern.split(os.sep)
    if "**" not in parts:
        return glob.glob(pattern)  # no recursion: finite whatever the links
    at = parts.index("**")
    head, rest = os.sep.join(parts[:at]), parts[at + 1 :]
    if at == 0:
        tops = [os.curdir]
    elif head == "":
        tops = [os.sep]  # `/**/...`
    elif glob.has_magic(head):
        tops = [path for path in glob.glob(head) if os.path.isdir(path)]
    else:
        tops = [head] if os.path.isdir(head) else []
    found: list[str] = []
    for top in tops:
        for folder in _folders_once(top):
            if not rest or rest == [""]:
                found.append(folder)
                found.extend(_visible_entries(folder))
            else:
                found.extend(glob_paths(os.path.join(glob.escape(folder), *rest)))
    if at == 0:
        found = [os.path.relpath(path) if path != os.curdir else path for path in found]
    return list(dict.fromkeys(found))


def _folders_once(top: str) -> Iterator[str]:
    """`top` and every visible folder under it, following symbolic links, each real folder once."""
    seen: set[tuple[int, int]] = set()
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            info = os.stat(folder)
        except OSError:
            continue
        key = (info.st_dev, info.st_ino)
        if key in seen:
            continue
        seen.add(key)
        yield folder
        try:
            with os.scandir(folder) as entries:
                names = sorted(entry.name for entry in entries if _is_visible_dir(entry))
        except OSError:
            continue
        stack.extend(os.path.join(folder, name) for name in reversed(names))


def _is_visible_dir(entry: os.DirEntry) -> bool:
    try:
        return not entry.name.startswith(".") and entry.is_dir()
    except OSError:
        return False


def _visible_entries(folder: str) -> list[str]:
    try:
        with os.scandir(folder) as entries:
            return sorted(entry.path for entry in entries if not entry.name.startswith("."))
    except OSError:
        return []


def file_identity(path: str) -> tuple[int, int] | str:
    """What tells two paths to one file apart from two files: (device, inode), or the real path when the
    file cannot be stat'ed (it is then refused later, with its own message)."""
    try:
        info = os.stat(path)
    except OSError:
        return os.path.realpath(path)
    return (info.st_dev, info.st_ino)
