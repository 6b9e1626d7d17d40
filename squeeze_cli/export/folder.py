"""`squeeze export`: a run's finished images into a dataset folder, incrementally and crash-safely.

The export folder keeps its state in `.squeeze-export.json` (hidden: loaders skip it): the run, the
selection, the columns, each part and the job ids exported. A rerun adds the new images only, as new
parts. Each part is written under `.squeeze-export-staging/` and renamed into place whole; the state is
written (atomically) after the rename, the card last. Killed at any point, the folder holds the previous
export and at most one whole new part the state does not list yet, which the next run removes and writes
again; a part is never half there.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import shutil
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock

from squeeze_cli import __version__, outputs
from squeeze_cli.errors import UsageError
from squeeze_cli.export.card import dataset_card
from squeeze_cli.export.formats import FORMATS, PartWriter, open_part, part_name
from squeeze_cli.export.rows import (
    ExportImage,
    RunImages,
    assign_splits,
    parse_splits,
    read_run_images,
)
from squeeze_cli.export.where import Predicate, parse_where
from squeeze_cli.reading import MANIFEST_MAX_BYTES, file_kind, read_regular_file

STATE_FORMAT = 1
CARD_NAME = "README.md"
CARD_MAX_BYTES = 2 * MANIFEST_MAX_BYTES  # the run's resolved manifest and a page about it
# The files export writes atomically (through a temporary file beside them).
_WRITTEN_WHOLE = (outputs.EXPORT_STATE_NAME, CARD_NAME)
# How an error names each option of the selection.
_OPTION_NAMES = {
    "run": "run",
    "format": "--format",
    "where": "--where",
    "subjects": "--subjects",
    "split": "--split",
    "seed": "--seed",
    "with_references": "--with-references",
    "metrics": "set of eval scores",
}
# The names of the parts a format writes (relative to the export folder): what a rerun may remove when the
# state does not list it (a part renamed into place just before a kill).
_PARTS = {
    "imagefolder": ("*/part-*", re.compile(r"[a-z]+/part-\d{5}")),
    "parquet": ("data/*.parquet", re.compile(r"data/[a-z]+-\d{5}\.parquet")),
    "webdataset": ("*.tar", re.compile(r"[a-z]+-\d{5}\.tar")),
}


@dataclass(frozen=True)
class ExportResult:
    folder: Path
    added: int
    total: int
    splits: dict[str, int]  # rows per split, in all
    left_out: tuple[str, ...] = ()  # damaged images of the selection, `<subject>/<name>: why`


def export_run(
    run: str | os.PathLike,
    folder: str | os.PathLike,
    *,
    export_format: str,
    where: str | None = None,
    subjects: str | None = None,
    splits: Sequence[str] = (),
    seed: int = 0,
    with_references: bool = False,
) -> ExportResult:
    """Export the finished images of `run`'s current plan that the selection keeps into `folder`.

    Raises:
        `UsageError`: a bad flag or expression, `run` is not a run folder, `folder` holds something other
            than an export of this run with this selection.
    """
    if export_format not in FORMATS:
        raise UsageError(f"--format {export_format}: expected one of {', '.join(FORMATS)}")
    if with_references and export_format == "webdataset":
        raise UsageError(
            "--with-references: the webdataset format has no place for a list of images",
            "use --format imagefolder or parquet, or leave the references as paths",
        )
    fractions = parse_splits(splits)
    images = read_run_images(run)
    keep = parse_where(where, images.fields, images.absent_fields) if where else None
    subject_names = [subject.name for subject in images.plan.loaded.subjects]
    chosen = [name for name in subject_names if subjects is None or fnmatch.fnmatchcase(name, subjects)]
    if not chosen:
        raise UsageError(
            f"--subjects {subjects}: no subject of the run matches",
            f"its subjects: {', '.join(subject_names)}",
        )
    # The subjects `--subjects` keeps are split, not the run's: else a split could take all of them, or none.
    assignment = assign_splits(chosen, fractions, seed)  # refuses splits that leave train no subject
    folder = outputs.real_folder(folder, "point it at a folder, or give another folder")  # -o may be a link
    run_folder = images.out  # real, as `folder` is: a link to the run is caught too
    if folder == run_folder or run_folder in folder.parents:
        raise UsageError(f"-o {folder}: inside the run folder {images.out}", "export to a folder outside it")
    selection = {
        "run": str(images.out),
        "format": export_format,
        "where": where,
        "subjects": subjects,
        "split": fractions,
        "seed": seed,
        "with_references": with_references,
        "metrics": list(images.metric_names),
    }
    try:
        with _export_lock(folder):
            return _export(images, folder, selection, assignment, chosen, keep)
    except OSError as error:  # disk full, permission denied: what was exported before stays whole
        path = Path(error.filename) if error.filename else folder
        raise outputs.OutputWriteError.from_os_error(path, error) from error


def _check_own_names(folder: Path) -> None:
    """Refuse what stands at the export's own names other than what export writes there (a link, a FIFO, a
    device): the state is read, the lock opened and the staging folder written, never through a link."""
    for name, want, hint in (
        (
            outputs.EXPORT_STATE_NAME,
            stat.S_ISREG,
            "export into a new folder (or delete this one and export again)",
        ),
        (outputs.EXPORT_LOCK_NAME, stat.S_ISREG, "remove it: squeeze export makes its lock itself"),
        (outputs.EXPORT_STAGING_NAME, stat.S_ISDIR, "remove it: squeeze export makes this folder itself"),
    ):
        try:
            mode = os.lstat(folder / name).st_mode
        except FileNotFoundError:
            continue
        if not want(mode):
            expected = "a folder" if want is stat.S_ISDIR else "a regular file"
            raise UsageError(f"{folder / name}: is {file_kind(mode)}, not {expected}", hint)


def _is_ours(name: str) -> bool:
    """Whether `name` in an export folder is one export writes: its state, lock, staging folder, or a
    temporary file of its state or card (`.<name>.<pid>.tmp`, what a kill in the middle of a write leaves)."""
    ours = (outputs.EXPORT_STATE_NAME, outputs.EXPORT_LOCK_NAME, outputs.EXPORT_STAGING_NAME)
    temporary = re.fullmatch(r"\.(.+)\.\d+\.tmp", name)
    return name in ours or (temporary is not None and temporary[1] in _WRITTEN_WHOLE)


@contextlib.contextmanager
def _export_lock(folder: Path) -> Iterator[None]:
    """One export into `folder` at a time: a `filelock` lock, which the OS releases when its process dies.
    A folder that is neither new, empty nor an export is refused first: nothing is written into it."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"-o {folder}: not a folder", "give a new or empty folder")
    if folder.is_dir():
        _check_own_names(folder)
    if folder.is_dir() and not all(_is_ours(path.name) for path in folder.iterdir()):
        if not (folder / outputs.EXPORT_STATE_NAME).is_file():
            raise UsageError(
                f"-o {folder}: the folder holds other files and no squeeze export",
                "give a new or empty folder: squeeze never writes over files it did not make",
            )
    folder.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(folder / outputs.EXPORT_LOCK_NAME, fallback_to_soft=False)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise UsageError(
            f"-o {folder}: another squeeze export is writing it", "wait for it to finish"
        ) from None
    try:
        yield
    finally:
        lock.release()


def _export(
    images: RunImages,
    folder: Path,
    selection: dict[str, Any],
    assignment: Mapping[str, str],
    chosen: Sequence[str],
    keep: Predicate | None,
) -> ExportResult:
    """The export of the selected images into the locked `folder`, the run's subjects split as in
    `assignment` (a subject exported before keeps its split)."""
    outputs.remove_stale_temp_files(folder, only=_WRITTEN_WHOLE)  # of an export killed while writing them
    state = _open_folder(folder, selection)
    exported = set(state["job_ids"])
    planned = {job.job_id for job in images.plan.jobs}
    if not exported <= planned:
        raise UsageError(
            f"-o {folder}: {len(exported - planned)} of its images have left the run's plan (stale)",
            "export into a new folder: rows already exported are never rewritten",
        )
    assignment = {**assignment, **state["subject_splits"]}
    rows = (image for image in images.images(set(chosen), skip=exported) if keep is None or keep(image.row))
    added = _add_parts(folder, state, rows, assignment, images.metric_names)
    if added:
        outputs.atomic_write_json(folder / outputs.EXPORT_STATE_NAME, state)
    # Written whenever it is not the card of the state: an export killed (or out of space) after saving
    # its state and before its card leaves the old card, which a rerun with nothing new must still replace.
    card = dataset_card(images, state, version=__version__)
    if _read_card(folder) != card:
        outputs.atomic_write_text(folder / CARD_NAME, card)
    return ExportResult(folder, added, len(state["job_ids"]), dict(state["rows"]), tuple(images.left_out))


def _read_card(folder: Path) -> str | None:
    """The text of the dataset card in `folder`, or None when there is none to read (never through a link)."""
    try:
        return read_regular_file(folder / CARD_NAME, CARD_MAX_BYTES, follow_symlinks=False).decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _add_parts(
    folder: Path,
    state: dict[str, Any],
    images: Iterable[ExportImage],
    assignment: Mapping[str, str],
    metric_names: Sequence[str],
) -> int:
    """Write `images` as new parts of the export in `folder` (one a split), each under the staging folder
    and then renamed into place; record them in `state` (not saved here). Returns how many were added."""
    selection = state["selection"]
    staging = outputs.safe_join(folder, outputs.EXPORT_STAGING_NAME)
    writers: dict[str, tuple[str, PartWriter]] = {}
    added = 0
    try:
        for image in images:
            row = image.row
            split = assignment[row["subject"]]
            if split not in writers:
                name = part_name(selection["format"], split, state["next_part"])
                state["next_part"] += 1
                part = open_part(
                    selection["format"], staging / name, metric_names, selection["with_references"]
                )
                writers[split] = (name, part)
            writers[split][1].add(image.png, row)
            state["subject_splits"][row["subject"]] = split
            state["job_ids"].append(row["job_id"])
            state["rows"][split] = state["rows"].get(split, 0) + 1
            added += 1
        for name, part in writers.values():
            part.close()
            target = outputs.safe_join(folder, *name.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(staging / name, target)
            outputs.fsync_dir(target.parent)  # the rename survives a power cut before the state lists it
            state["parts"].append(name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return added


def _open_folder(folder: Path, selection: dict[str, Any]) -> dict[str, Any]:
    """The export state of the locked `folder`: the saved one when it holds an export of the same run and
    selection; a new one, saved at once, for a new folder or one that holds no part yet. What a killed
    export left is removed.

    Raises:
        `UsageError`: `folder` holds an export made another way, or a damaged state.
    """
    state_path = folder / outputs.EXPORT_STATE_NAME
    if state_path.is_file():
        try:
            state = outputs.read_export_state(folder)
        except (OSError, ValueError):
            raise UsageError(
                f"{state_path}: damaged", "export into a new folder (or delete this one and export again)"
            ) from None
        saved = state["selection"]
        changed = _changed_options(saved, selection)
        if changed and state["parts"]:
            raise UsageError(
                f"-o {folder}: holds an export made with another "
                + ", ".join(_OPTION_NAMES[key] for key in changed),
                "the run's `squeeze eval` scores changed since: export into a new folder for their columns"
                if "metrics" in changed
                else "rerun with the same options to add new images, or export into a new folder",
            )
        shutil.rmtree(folder / outputs.EXPORT_STAGING_NAME, ignore_errors=True)
        _remove_unlisted_parts(folder, saved["format"], set(state["parts"]))
        if not changed:
            return state
        # No part yet (a first export stopped before its first, or a selection that kept no image): nothing
        # is exported to keep, so the new options hold.
    else:
        shutil.rmtree(folder / outputs.EXPORT_STAGING_NAME, ignore_errors=True)
    new: dict[str, Any] = {
        "format": STATE_FORMAT,
        "selection": selection,
        "next_part": 0,
        "parts": [],
        "rows": {},
        "subject_splits": {},
        "job_ids": [],
    }
    # Saved before the first part: a first export killed after renaming a part into place leaves a folder
    # the next export knows as its own (and removes the part from), not "other files".
    outputs.atomic_write_json(state_path, new)
    return new


def _changed_options(saved: dict[str, Any], selection: dict[str, Any]) -> list[str]:
    """The options of `selection` that differ from the saved export's. The splits' order counts (each takes
    its subjects in turn); the seed counts only with splits (it shuffles nothing else)."""

    def comparable(options: dict[str, Any], key: str) -> Any:
        if key == "split":
            return list(options[key].items()) if isinstance(options.get(key), dict) else options.get(key)
        if key == "seed" and not options.get("split"):
            return None
        return options.get(key)

    return [key for key in selection if comparable(saved, key) != comparable(selection, key)]


def _remove_unlisted_parts(folder: Path, export_format: str, listed: set[str]) -> None:
    """Parts renamed into place by an export killed before it saved its state: their images are exported
    again, so no image is in two parts."""
    where, pattern = _PARTS[export_format]
    for path in folder.glob(where):
        name = path.relative_to(folder).as_posix()
        if pattern.fullmatch(name) and name not in listed:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
