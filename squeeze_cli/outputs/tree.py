"""The output tree's shape, checked before a run loads anything or writes a byte: folders where squeeze
writes are real folders (not files, not symbolic links), and the files it writes or reads are regular
files. Only `lstat` and `scandir`: nothing is opened, followed or created."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from squeeze_cli.outputs.layout import (
    INDEX_NAME,
    LAYOUT_LOCK_NAME,
    LOCK_NAME,
    RESOLVED_MANIFEST_NAME,
    RUN_SUMMARY_NAME,
    VARIANT_EXTENSIONS,
    VARIANTS_DIR_NAME,
    UnsafeOutputPathError,
    check_subject_name,
    contact_sheet_name,
    contact_sheet_pages,
    image_stem,
)
from squeeze_cli.reading import file_kind

if TYPE_CHECKING:
    from squeeze_cli.manifest.schema import OutputVariant
    from squeeze_cli.plan import Job

RUN_FILE_NAMES = (INDEX_NAME, RUN_SUMMARY_NAME, RESOLVED_MANIFEST_NAME, LOCK_NAME, LAYOUT_LOCK_NAME)
_NO_LINKS = "squeeze never reads or writes through symbolic links"


def _mode(path: Path) -> int | None:
    try:
        return os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError:
        return None  # unreadable: the write itself reports it, naming the file


def _refuse(path: Path, what: str, hint: str) -> UnsafeOutputPathError:
    return UnsafeOutputPathError(f"{path} {what}", hint)


def _check_folder(path: Path, hint: str) -> bool:
    """Whether `path` exists, refusing anything but a real folder there."""
    mode = _mode(path)
    if mode is None:
        return False
    if stat.S_ISLNK(mode):
        raise _refuse(path, "is a symbolic link", f"replace it by a real folder or remove it ({_NO_LINKS})")
    if not stat.S_ISDIR(mode):
        raise _refuse(path, f"is {file_kind(mode)}, not a folder", hint)
    return True


def _check_files(folder: Path, names: set[str], hint: str) -> None:
    """Refuse any of `names` in `folder` that exists as something other than a regular file."""
    try:
        with os.scandir(folder) as entries:
            # The entry's type from the directory listing: no stat per file (200,000 at 100,000 images).
            found = sorted(
                (entry.name, entry.stat(follow_symlinks=False).st_mode)
                for entry in entries
                if entry.name in names and not entry.is_file(follow_symlinks=False)
            )
    except OSError:
        return
    if found:
        name, mode = found[0]
        raise _refuse(folder / name, f"is {file_kind(mode)}, not a regular file", hint)


def check_output_tree(
    out_dir: Path,
    run_dir: Path,
    jobs: Sequence[Job],
    variants: Sequence[OutputVariant] = (),
    views_dir: str | None = None,
) -> None:
    """Refuse an output tree squeeze could not write safely, before anything is loaded or written.

    - `OUT` must be a folder (it may be a symbolic link to one: that is the user's own choice of place);
    - the run folders below it (`shards`, `shards/I-of-N`), each subject folder and its channel variants'
      folders (`variants`, `variants/<name>`) must be real folders, and so must `OUT/<views_dir>` and its
      subject folders with `views_dir` (`output.views_dir`);
    - the run files (`index.jsonl`, `run.json`, `manifest.resolved.yaml`, the locks) and each job's image,
      sidecar, grid, contact sheet and variants must be regular files where they exist (not links, FIFOs,
      folders).

    Raises:
        `UnsafeOutputPathError`: (exit 2) naming the first path in the way and what to do about it.
    """
    if not out_dir.exists():
        if out_dir.is_symlink():
            raise _refuse(
                out_dir, "is a broken symbolic link", "point it at a folder, or choose another --out"
            )
        return
    if not out_dir.is_dir():
        raise _refuse(out_dir, "is a file, not a folder", "choose another --out, or move the file away")
    run_file_hint = f"remove it: squeeze writes its run files there itself ({_NO_LINKS})"
    _check_files(out_dir, set(RUN_FILE_NAMES), run_file_hint)
    if run_dir != out_dir:
        folder = out_dir
        for part in run_dir.relative_to(out_dir).parts:
            folder = folder / part
            if not _check_folder(folder, "remove it: squeeze keeps each shard's run files there"):
                break
        else:
            _check_files(run_dir, set(RUN_FILE_NAMES), run_file_hint)
    names_by_subject: dict[str, set[str]] = {}
    prompts_by_subject: dict[str, set[int]] = {}
    for job in jobs:
        names = names_by_subject.setdefault(check_subject_name(job.subject), set())
        prompts_by_subject.setdefault(job.subject, set()).add(job.prompt_index)
        stem = image_stem(job)
        names.update((f"{stem}.png", f"{stem}.json"))
    view_names_by_subject = {
        subject: {f"grid-{index:03d}.png" for index in prompts}
        | {contact_sheet_name(page) for page in range(1, contact_sheet_pages(len(prompts)) + 1)}
        for subject, prompts in prompts_by_subject.items()
    }
    file_hint = f"remove it: squeeze writes this file itself ({_NO_LINKS})"
    if views_dir:
        # The views are drawn after every image: a views folder in the way must stop the run before it.
        views = out_dir / views_dir
        views_hint = f"move or remove it: the grids and contact sheets (output.views_dir) go in {views}"
        if _check_folder(views, views_hint):
            for subject, view_names in view_names_by_subject.items():
                folder = views / subject
                hint = f"move or remove it: the views of subject {subject!r} go in the folder {folder}"
                if _check_folder(folder, hint):
                    _check_files(folder, view_names, file_hint)
    else:
        for subject, view_names in view_names_by_subject.items():
            names_by_subject[subject] |= view_names
    for subject, names in names_by_subject.items():
        folder = out_dir / subject
        hint = f"move or remove it: the images of subject {subject!r} go in the folder {folder}"
        if not _check_folder(folder, hint):
            continue
        _check_files(folder, names, file_hint)
        if not variants or not _check_folder(folder / VARIANTS_DIR_NAME, hint):
            continue
        stems = {name[: -len(".json")] for name in names if name.endswith(".json")}
        for variant in variants:
            variant_folder = folder / VARIANTS_DIR_NAME / variant.name
            extension = VARIANT_EXTENSIONS[variant.format]
            if _check_folder(variant_folder, f"move or remove it: variant {variant.name!r} goes there"):
                _check_files(variant_folder, {f"{stem}.{extension}" for stem in stems}, file_hint)
