"""Every name a run uses on disk, and `safe_join`, which keeps every path inside the output folder."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import EXIT_INVALID, SqueezeError

if TYPE_CHECKING:
    from ..plan import Job


INDEX_NAME = "index.jsonl"
RUN_SUMMARY_NAME = "run.json"
RESOLVED_MANIFEST_NAME = "manifest.resolved.yaml"
CONTACT_SHEET_NAME = "contact-sheet.png"  # page 1; page N > 1 is `contact-sheet-<N:03d>.png`
CONTACT_SHEET_PAGE_PROMPTS = 50  # prompts per contact-sheet page: a page stays a few MB to draw and view
LOCK_NAME = ".squeeze.lock"  # in OUT, or in a shard's folder
LAYOUT_LOCK_NAME = ".squeeze-layout.lock"  # in OUT: which shard layout (plain, or --shard I/N) holds OUT
SHARDS_DIR_NAME = "shards"  # OUT/shards/<I>-of-<N>/ holds one shard's run files
# OUT/.squeeze-recipes.json: the recipe folders `gen --recipe A,B` puts in OUT, written before the first
# recipe runs, so that `status` can name a recipe that never ran. Hidden: no subject can take it.
RECIPES_NAME = ".squeeze-recipes.json"
# OUT/.stale/<UTC time>/<subject>/: images of jobs the plan no longer has, moved out of the way. It starts
# with `.`, so no subject can take it (`check_subject_name`).
STALE_DIR_NAME = ".stale"
# OUT/<subject>/variants/<variant>/<stem>.<ext>: channel copies of the images (`output.variants`).
VARIANTS_DIR_NAME = "variants"
VARIANT_EXTENSIONS = {"jpeg": "jpg", "webp": "webp", "png": "png"}
# What `squeeze export` keeps in its export folder: which images are in it and how it was selected (hidden,
# so dataset loaders skip it), and where a part is written before it is renamed into place.
EXPORT_STATE_NAME = ".squeeze-export.json"
EXPORT_STAGING_NAME = ".squeeze-export-staging"
EXPORT_LOCK_NAME = ".squeeze-export.lock"  # one export into a folder at a time
# The dataset layouts `squeeze export` writes (export/formats.py) and `squeeze train` reads back.
EXPORT_FORMATS = ("imagefolder", "parquet", "webdataset")
# The split names export writes: `train`, and the others `datasets` loaders recognise from file and folder
# names (`val` loads as `validation`).
EXPORT_TRAIN_SPLIT = "train"
EXPORT_OTHER_SPLITS = ("val", "validation", "test")
# What `squeeze eval` writes at the top of OUT (squeeze_cli/eval/).
METRICS_JSONL_NAME = "metrics.jsonl"
METRICS_JSON_NAME = "metrics.json"
METRICS_CACHE_NAME = "metrics-cache.json"
REPORT_NAME = "report.html"
# Names at the top of OUT that a subject directory must not take.
RESERVED_NAMES = frozenset(
    {INDEX_NAME, RUN_SUMMARY_NAME, RESOLVED_MANIFEST_NAME, SHARDS_DIR_NAME}
    | {METRICS_JSONL_NAME, METRICS_JSON_NAME, METRICS_CACHE_NAME, REPORT_NAME}
)


def is_run_folder(folder: Path) -> bool:
    """Whether `squeeze gen` ran in `folder`: it holds the run's manifest, or shards' folders."""
    return (folder / RESOLVED_MANIFEST_NAME).is_file() or (folder / SHARDS_DIR_NAME).is_dir()


def runs_inside(folder: Path) -> list[Path]:
    """The run folders directly inside `folder`, by name, when it is not one itself: what
    `gen --recipe A,B` writes (OUT/A/, OUT/B/). Empty for a run folder, or one without runs."""
    if is_run_folder(folder) or not folder.is_dir():
        return []
    return sorted(sub for sub in folder.iterdir() if sub.is_dir() and is_run_folder(sub))


def holds_recipes(folder: Path) -> bool:
    """Whether `folder` is the folder of `gen --recipe A,B`: not a run itself, it records its recipes
    (`RECIPES_NAME`), or holds run folders."""
    if is_run_folder(folder):
        return False
    return os.path.lexists(folder / RECIPES_NAME) or bool(runs_inside(folder))


class UnsafeOutputPathError(SqueezeError):
    """A path that would land outside the output directory, or on one of its reserved names."""

    exit_code = EXIT_INVALID


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
                f"refusing to use {'/'.join(parts)!r}: not a relative name under the output directory {base}",
                "names under --out must be plain relative names",
            )
    path = base.joinpath(*parts)
    try:
        root = base.resolve()
        resolved = path.resolve()
    except (OSError, RuntimeError) as error:  # a symlink loop
        raise UnsafeOutputPathError(
            f"refusing to use {path}: it cannot be resolved ({error})",
            "remove the looping symlink, or choose another --out",
        ) from error
    if resolved != root and root not in resolved.parents:
        raise UnsafeOutputPathError(
            f"refusing to use {path}: it resolves to {resolved}, outside the output directory {root}",
            "remove the symlink or '..' that leads out, or choose another --out",
        )
    return path


def real_folder(folder: str | os.PathLike, hint: str) -> Path:
    """`folder`, absolute, with its symbolic links resolved. An output folder may itself be a link to a
    folder (the user's choice of place, docs/outputs.md): resolved before anything is written, every write
    (none goes through a link inside it) lands in the folder it names. A broken link on the way (the folder
    itself, or the nearest part of its path that exists), or a loop, is refused with `hint`: it would
    otherwise be followed to create its target.

    Raises:
        `UnsafeOutputPathError`: a broken symbolic link on the way.
    """
    path = Path(folder).expanduser().absolute()
    nearest = next(part for part in (path, *path.parents) if os.path.lexists(part))
    if nearest.is_symlink() and not nearest.exists():
        raise UnsafeOutputPathError(f"{nearest} is a broken symbolic link (or a loop)", hint)
    return Path(os.path.realpath(path))


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
    """`OUT/<subject>`, refused when it leads out of OUT (`safe_join`)."""
    path = Path(out_dir) / check_subject_name(subject)
    # One plain name (checked): it can only lead out of OUT as a symbolic link, so only a link is
    # resolved (10,000 subjects: 10,000 lstat calls, not 20,000 realpaths).
    return safe_join(out_dir, subject) if os.path.islink(path) else path


def position_stem(prompt_index: int, seed: int) -> str:
    """`<prompt_index:03d>-s<seed>`: never the prompt text, so names stay short, safe and stable."""
    return f"{prompt_index:03d}-s{seed}"


def image_stem(job: Job) -> str:
    """The name (without extension) of `job`'s image and sidecar: `position_stem` of its position."""
    return position_stem(job.prompt_index, job.seed)


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


def variant_name(subject: str, stem: str, variant: str, image_format: str) -> str:
    """A channel variant's name relative to OUT, with `/`: `<subject>/variants/<variant>/<stem>.<ext>`."""
    extension = VARIANT_EXTENSIONS[image_format]
    return f"{check_subject_name(subject)}/{VARIANTS_DIR_NAME}/{variant}/{stem}.{extension}"


def grid_path(out_dir: str | os.PathLike, subject: str, prompt_index: int) -> Path:
    """`OUT/<subject>/grid-<prompt_index:03d>.png`."""
    return safe_join(subject_dir(out_dir, subject), f"grid-{prompt_index:03d}.png")


def contact_sheet_name(page: int = 1) -> str:
    """`contact-sheet.png` for page 1, `contact-sheet-<page:03d>.png` for the pages after it."""
    return CONTACT_SHEET_NAME if page == 1 else f"contact-sheet-{page:03d}.png"


def contact_sheet_page(name: str) -> int | None:
    """The page number of a contact-sheet file name, or None when `name` is not one squeeze writes."""
    match = _SHEET_PAGE.fullmatch(name)
    page = int(match.group(1) or 1) if match else None
    return page if page is not None and contact_sheet_name(page) == name else None


_SHEET_PAGE = re.compile(r"contact-sheet(?:-(\d+))?\.png")


def contact_sheet_pages(prompt_count: int) -> int:
    """How many pages the contact sheet of a subject with `prompt_count` prompts has (at least one)."""
    return max(1, -(-prompt_count // CONTACT_SHEET_PAGE_PROMPTS))


def contact_sheet_page_prompts(page: int) -> slice:
    """Which of a subject's prompts (by position in the plan) page `page` shows."""
    return slice((page - 1) * CONTACT_SHEET_PAGE_PROMPTS, page * CONTACT_SHEET_PAGE_PROMPTS)


def contact_sheet_path(out_dir: str | os.PathLike, subject: str, page: int = 1) -> Path:
    """`OUT/<subject>/contact-sheet.png`, or `OUT/<subject>/contact-sheet-<page:03d>.png` after page 1."""
    return safe_join(subject_dir(out_dir, subject), contact_sheet_name(page))


def views_root(out_dir: str | os.PathLike, views_dir: str | None) -> Path:
    """Where grids and contact sheets go: OUT, or `OUT/<output.views_dir>` so that OUT's subject folders
    hold images and sidecars only."""
    return safe_join(out_dir, views_dir) if views_dir else Path(out_dir)


def index_path(out_dir: str | os.PathLike) -> Path:
    return safe_join(out_dir, INDEX_NAME)


def run_summary_path(out_dir: str | os.PathLike) -> Path:
    return safe_join(out_dir, RUN_SUMMARY_NAME)


def resolved_manifest_path(out_dir: str | os.PathLike) -> Path:
    return safe_join(out_dir, RESOLVED_MANIFEST_NAME)


def run_dir(out_dir: str | os.PathLike, shard: tuple[int, int] | None) -> Path:
    """Where a run's index, summary, resolved manifest and lock live: `OUT`, or `OUT/shards/I-of-N` for
    shard I of N, so the shards of one layout can share an output folder."""
    if shard is None:
        return Path(out_dir)
    return Path(out_dir) / SHARDS_DIR_NAME / f"{shard[0]}-of-{shard[1]}"
