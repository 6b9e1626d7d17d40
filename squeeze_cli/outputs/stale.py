"""Stale outputs: images in OUT whose job the current plan does not have (a prompt, seed or subject
removed or changed, another model run into the same folder), and moving them to `OUT/.stale/<UTC time>/`.

An image is stale when its sidecar, in a folder directly under OUT, names a job id that no planned job
has. Nothing here deletes: stale files are only ever renamed (`os.rename`, within OUT, never through a
link) into `OUT/.stale/<UTC time>/<folder>/`, and only when `squeeze gen --prune` asks for it, or when a
planned job needs the name a stale image holds (so a name never shows another prompt than the plan's).
The folders those moves leave empty in a removed subject's folder are removed (`os.rmdir` only), so the
run folder a shop publishes holds no empty folders of products it no longer sells.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from squeeze_cli.outputs.files import OutputWriteError, fsync_dir
from squeeze_cli.outputs.index import own_variant_files
from squeeze_cli.outputs.layout import (
    RESERVED_NAMES,
    STALE_DIR_NAME,
    contact_sheet_page,
    image_stem,
    safe_join,
    views_root,
)
from squeeze_cli.outputs.records import read_sidecar

if TYPE_CHECKING:
    from ..plan import Job
    from .resume import Finished

_GRID = re.compile(r"grid-(\d+)\.png")


@dataclass(frozen=True, slots=True)
class StaleImage:
    """An image (its sidecar, the PNG beside it when there is one, and its channel variants) of a job the
    plan does not have."""

    folder: str  # the folder directly under OUT: a subject's, current or removed
    stem: str
    job_id: str
    variants: tuple[str, ...] = ()  # its variants' files relative to OUT, as its sidecar records them

    @property
    def image(self) -> str:
        """The PNG's name relative to OUT, with `/`."""
        return f"{self.folder}/{self.stem}.png"

    @property
    def sidecar(self) -> str:
        return f"{self.folder}/{self.stem}.json"


def _entries(directory: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(directory) as entries:
            return sorted(entries, key=lambda entry: entry.name)
    except OSError:
        return []


def _folders(out_dir: Path) -> list[str]:
    """The real folders directly under OUT that may hold images: not hidden, not a link, not `shards`."""
    return [
        entry.name
        for entry in _entries(out_dir)
        if not entry.name.startswith(".")
        and entry.name not in RESERVED_NAMES
        and entry.is_dir(follow_symlinks=False)
    ]


def find_stale(
    out_dir: str | os.PathLike,
    jobs: Iterable[Job],
    finished: Mapping[str, Finished] | None = None,
) -> list[StaleImage]:
    """The images in OUT whose sidecar names a job that `jobs` (the whole plan) does not have.

    Reads the sidecars of every folder directly under OUT, except those `finished` already places (their
    job is planned). A file that is not a sidecar (unreadable, no `job_id`) is left out: it is no image.
    """
    out_dir = Path(out_dir)
    jobs = list(jobs)
    planned = {job.job_id for job in jobs}
    known = {(job.subject, found.stem) for job in jobs if (found := (finished or {}).get(job.job_id))}
    stale = []
    for folder in _folders(out_dir):
        for entry in _entries(out_dir / folder):
            name = entry.name
            if not name.endswith(".json") or name.startswith(".") or not entry.is_file(follow_symlinks=False):
                continue
            stem = name[: -len(".json")]
            if (folder, stem) in known:
                continue
            record = read_sidecar(entry.path)
            job_id = record.get("job_id") if record is not None else None
            if record is not None and isinstance(job_id, str) and job_id not in planned:
                variants = tuple(own_variant_files(record, folder, stem).values())
                stale.append(StaleImage(folder, stem, job_id, variants))
    return stale


def find_stale_views(
    out_dir: str | os.PathLike, jobs: Iterable[Job], views_dir: str | None = None
) -> list[str]:
    """Grids and contact-sheet pages (relative to OUT) that no planned job is shown on: every view in a
    folder of a subject the plan does not have, and the grids of prompt positions it no longer has; in
    `OUT/<views_dir>/` with `output.views_dir`."""
    out_dir = Path(out_dir)
    prompts: dict[str, set[int]] = {}
    for job in jobs:
        prompts.setdefault(job.subject, set()).add(job.prompt_index)
    root = views_root(out_dir, views_dir)
    if views_dir and not _is_real_dir(root):  # not drawn yet, or a link: nothing of it is moved
        return []
    prefix = f"{views_dir}/" if views_dir else ""
    views = []
    for folder in _folders(root):
        for entry in _entries(root / folder):
            if not entry.is_file(follow_symlinks=False):
                continue
            grid = _GRID.fullmatch(entry.name)
            if folder not in prompts:
                if grid is not None or contact_sheet_page(entry.name) is not None:
                    views.append(f"{prefix}{folder}/{entry.name}")
            elif grid is not None and int(grid.group(1)) not in prompts[folder]:
                views.append(f"{prefix}{folder}/{entry.name}")
    return views


def in_the_way(stale: Iterable[StaleImage], jobs: Iterable[Job]) -> list[StaleImage]:
    """The stale images that sit under a name one of `jobs` is given."""
    names = {(job.subject, image_stem(job)) for job in jobs}
    return [image for image in stale if (image.folder, image.stem) in names]


def stale_folder_name(when: datetime | None = None) -> str:
    """`<UTC time>`: the folder under `OUT/.stale` that one run moves its stale files into."""
    when = (when or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return when.strftime("%Y%m%dT%H%M%S.%fZ")


def move_stale(
    out_dir: str | os.PathLike,
    images: Sequence[StaleImage],
    views: Sequence[str] = (),
    *,
    folder: str | None = None,
) -> list[str]:
    """Rename `images` (variants, PNG and sidecar) and `views` into `OUT/.stale/<folder>/`, under the
    same names relative to OUT.

    Every move is an `os.rename` within OUT: nothing is copied, deleted or written through a link (a
    link or a special file at a stale name is left where it is). The sidecar moves last: killed before,
    the sidecar stays, and the next run finds it stale again.

    Returns:
        `list[str]`: what was moved, relative to OUT, with `/`.

    Raises:
        `OutputWriteError`: a folder could not be made or a file could not be renamed.
    """
    out_dir = Path(out_dir)
    names = [name for image in images for name in (*image.variants, image.image, image.sidecar)]
    names += views
    if not names:
        return []
    target_root = _stale_dir(out_dir, folder or stale_folder_name())
    moved = []
    touched: set[Path] = set()
    for name in names:
        *folders, base = name.split("/")
        source = safe_join(out_dir, *folders, base)
        try:
            info = os.lstat(source)
        except FileNotFoundError:
            continue  # a sidecar without its PNG
        except OSError as error:
            raise OutputWriteError.from_os_error(source, error, "read") from error
        if not stat.S_ISREG(info.st_mode):
            continue
        target_dir = target_root
        for part in folders:
            target_dir = _make_dir(target_dir / part)
        target = target_dir / base
        if os.path.lexists(target):
            continue  # never replace what an earlier move put there
        try:
            os.rename(source, target)
        except OSError as error:
            raise OutputWriteError.from_os_error(source, error, "move a stale file from") from error
        touched.update({source.parent, target_dir})
        moved.append(name)
    for directory in sorted(touched):
        fsync_dir(directory)
    return moved


def remove_emptied_folders(
    out_dir: str | os.PathLike, subjects: Collection[str], views_dir: str | None = None
) -> list[str]:
    """Remove the folders that moving stale files emptied, in the folders directly under OUT (and, with
    `output.views_dir`, under `OUT/<views_dir>/`) that are no subject of `subjects` (the whole plan's):
    each real folder (not a link), deepest first, that is
    empty and that some `OUT/.stale/<UTC time>/` holds under the same path, i.e. a move took files out
    of it. So a folder emptied by a run killed before it got here is removed by the next one, and a
    folder squeeze never moved anything out of (a user's, empty) stays.

    Only `os.rmdir`, which fails on a folder that holds anything (a user's file): that folder stays.
    A planned subject's folders stay even when empty: a shard of the same layout (the layout lock lets
    those run at once, and only those) may be about to write into them; no shard writes into a folder of
    a subject its plan does not have.

    Returns:
        `list[str]`: the folders removed, relative to OUT, with `/`, deepest first.

    Raises:
        `OutputWriteError`: an empty folder could not be removed (no permission, a read-only disk).
    """
    out_dir = Path(out_dir)
    stale_root = out_dir / STALE_DIR_NAME
    if not os.path.isdir(stale_root) or os.path.islink(stale_root):
        return []
    runs = [Path(entry.path) for entry in _entries(stale_root) if entry.is_dir(follow_symlinks=False)]
    removed: list[str] = []
    for folder in _folders(out_dir):
        if folder not in subjects:
            _remove_if_emptied(out_dir, (folder,), runs, removed)
    root = views_root(out_dir, views_dir)
    if views_dir and _is_real_dir(root):  # a removed subject's views folder, `OUT/<views_dir>/<subject>/`
        for folder in _folders(root):
            if folder not in subjects:
                _remove_if_emptied(out_dir, (views_dir, folder), runs, removed)
    return removed


def _remove_if_emptied(out_dir: Path, parts: tuple[str, ...], runs: list[Path], removed: list[str]) -> None:
    # Only the runs that moved files out of this folder can hold its subfolders: a folder nothing was
    # moved out of (a user's tree, a views folder) is not walked.
    runs = [run for run in runs if _is_real_dir(run.joinpath(*parts))]
    if not runs:
        return
    path = safe_join(out_dir, *parts)
    for entry in _entries(path):
        if entry.is_dir(follow_symlinks=False):
            _remove_if_emptied(out_dir, (*parts, entry.name), runs, removed)
    try:
        os.rmdir(path)
    except OSError as error:
        if error.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
            return  # it holds something else, or a shard of this layout pruning too removed it first
        raise OutputWriteError.from_os_error(path, error, "remove the emptied folder") from error
    removed.append("/".join(parts))


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _stale_dir(out_dir: Path, folder: str) -> Path:
    """`OUT/.stale/<folder>`, made when missing; a link or a file in the way is refused."""
    return _make_dir(_make_dir(safe_join(out_dir, STALE_DIR_NAME)) / folder)


def _make_dir(path: Path) -> Path:
    try:
        os.mkdir(path)
    except FileExistsError:
        pass
    except OSError as error:
        raise OutputWriteError.from_os_error(path, error, "create the directory") from error
    try:
        info = os.lstat(path)
    except OSError as error:
        raise OutputWriteError.from_os_error(path, error, "create the directory") from error
    if not stat.S_ISDIR(info.st_mode):
        raise OutputWriteError(
            f"cannot move stale files into {path}: it is a link or a file, not a folder",
            f"remove {path}, then run again",
            path=path,
        )
    return path
