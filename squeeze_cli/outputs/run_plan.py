"""A run folder's own plan: its `manifest.resolved.yaml` (OUT's, else a shard's), loaded and planned again,
so the commands that read a finished run (`status`, `export`, `eval`, `check`) count the jobs `gen` planned
and no others."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from squeeze_cli.errors import SqueezeError, UsageError
from squeeze_cli.outputs.layout import RESOLVED_MANIFEST_NAME, SHARDS_DIR_NAME, runs_inside

if TYPE_CHECKING:
    from squeeze_cli.manifest import LoadedManifest
    from squeeze_cli.plan import Job


def not_a_run_folder(path: Path) -> tuple[str, str]:
    """The error and hint for `path`, given as a run folder and not a folder: a manifest is the usual
    mistake."""
    hint = "give the output folder of a `squeeze gen` run"
    if not path.exists():
        return f"{path}: no such folder", hint
    if path.suffix in (".yaml", ".yml"):
        hint += ", not its manifest: the folder its `output.dir` names, or gen's --out"
    return f"{path}: not a folder", hint


def run_folder_hint(out: Path, hint: str) -> str:
    """`hint` for a folder that is not a run, unless it holds runs (the folder of `gen --recipe A,B`, which
    `status` and `eval` take whole, or a parent of the run): then which one to give."""
    inside = runs_inside(out)
    if not inside:
        return hint
    return f"give one of the runs in it, e.g. {inside[0]}"


def run_folders(out: Path) -> list[Path]:
    """OUT and its shards' folders (`OUT/shards/I-of-N`), in that order."""
    shards = out / SHARDS_DIR_NAME
    found = sorted(p for p in shards.iterdir() if p.is_dir()) if shards.is_dir() else []
    return [out, *found]


def find_run_manifest(out: Path) -> Path:
    """OUT's `manifest.resolved.yaml`, else the newest of its shards'.

    Raises:
        `UsageError`: OUT is not a folder `squeeze gen` wrote (exit code 2).
    """
    if not out.is_dir():
        raise UsageError(*not_a_run_folder(out))
    candidates = [
        folder / RESOLVED_MANIFEST_NAME
        for folder in run_folders(out)
        if (folder / RESOLVED_MANIFEST_NAME).is_file()
    ]
    if not candidates:
        raise UsageError(
            f"{out} is not a squeeze run folder: it has no {RESOLVED_MANIFEST_NAME} (nor its shards)",
            run_folder_hint(out, "give the output folder of a `squeeze gen` run"),
        )
    if candidates[0].parent == out:
        return candidates[0]
    return max(candidates, key=lambda path: path.stat().st_mtime)


@dataclass(frozen=True)
class RunPlan:
    """A run folder's plan: the manifest it was made from, loaded, and its jobs in plan order."""

    manifest: Path
    loaded: LoadedManifest
    jobs: list[Job]


def load_run_plan(out: Path, *, verify: bool = False) -> RunPlan:
    """The plan of the run in `out` (the weights need not be on this machine: sources are not checked);
    with `verify`, every reference photo is read, the run's reference cache not trusted.

    Raises:
        `UsageError`: `out` is not a run folder; `ManifestError`: its resolved manifest does not load.
    """
    from squeeze_cli.manifest.resolve import load_manifest
    from squeeze_cli.plan import plan_jobs

    manifest = find_run_manifest(out)
    loaded = load_manifest(manifest, check_sources=False, reference_cache=not verify)
    jobs = plan_jobs(loaded, model_identity=loaded.model_identity, max_jobs=loaded.max_jobs)
    return RunPlan(manifest, loaded, jobs)


def run_plan_if_any(run_dir: Path, *, verify: bool = False) -> RunPlan | None:
    """The run's plan (`load_run_plan`); None when it has no resolved manifest that loads (a folder from an
    older squeeze, references since moved): then every indexed image counts."""
    try:
        return load_run_plan(run_dir, verify=verify)
    except (SqueezeError, OSError):
        return None
