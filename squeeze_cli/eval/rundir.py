"""What a run directory holds, for evaluation: its finished images (with their sidecars), failed jobs and
missing files, read from `index.jsonl` (and the shards' indexes) as docs/outputs.md describes. Only the
jobs of the run's plan (its `manifest.resolved.yaml`) count: stale images of an earlier plan or another
model in the same folder are left out and listed. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from squeeze_cli import outputs
from squeeze_cli.errors import SqueezeError

SHARDS_DIR = "shards"


class RunDirError(SqueezeError):
    """A path given to `squeeze eval` that is not a run directory (exit code 2)."""


@dataclass(frozen=True)
class RunImage:
    """One finished image of a run, with what scoring it needs from its sidecar."""

    job_id: str
    subject: str
    prompt_index: int
    seed: int
    prompt: str
    class_noun: str | None
    image: str  # relative to the run directory, with `/`
    references: tuple[str, ...]  # absolute paths, in the order the model saw them
    recipe: str = ""  # the sidecar's `preset`: the recipe (model preset) that made it
    model: str = ""  # a hash of the sidecar's `model` section: images of one model identity share it

    @property
    def key(self) -> tuple[str, int, int]:
        """(subject, prompt index, seed): the same job across runs of one manifest."""
        return (self.subject, self.prompt_index, self.seed)


@dataclass
class RunContents:
    """A run directory's images, and what it lacks: failed jobs and files that are gone."""

    path: Path
    images: list[RunImage] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # one line each: which file and why
    stale: list[str] = field(default_factory=list)  # images of jobs the run's plan does not have: not scored

    @property
    def recipe(self) -> str | None:
        """The recipe of the images (one model identity per run: `read_run` refuses a mix)."""
        return self.images[0].recipe if self.images else None

    @property
    def name(self) -> str:
        return self.path.name


def _index_files(run_dir: Path) -> list[Path]:
    """Every shard's index, then the run's own: images of a sharded run not merged yet are found, and the
    merged index (written last, by the run that retried the shards' failures) has the final word."""
    found = []
    shards = run_dir / SHARDS_DIR
    if shards.is_dir():
        found += sorted(p for p in shards.glob(f"*-of-*/{outputs.INDEX_NAME}") if p.is_file())
    if (run_dir / outputs.INDEX_NAME).is_file():
        found.append(run_dir / outputs.INDEX_NAME)
    return found


def read_run(path: str | Path) -> RunContents:
    """The images of the run in `path`, each finished job once (its latest line wins).

    A job whose index line says `ok` but whose PNG or sidecar is gone is listed in `missing`; failed jobs
    in `failed`; neither stops the evaluation of the rest.

    Raises:
        `RunDirError`: when `path` is not a directory or holds no run index.
    """
    run_dir = Path(path)
    if not run_dir.exists():
        raise RunDirError(f"{run_dir}: no such directory", "give the --out folder of a `squeeze gen` run")
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: not a directory", "give the --out folder of a `squeeze gen` run")
    index_files = _index_files(run_dir)
    if not index_files:
        raise RunDirError(
            f"{run_dir}: not a squeeze run (no {outputs.INDEX_NAME}, nor shards/I-of-N/{outputs.INDEX_NAME})",
            "give the --out folder of a `squeeze gen` run that has finished at least one image",
        )
    latest: dict[str, dict[str, Any]] = {}
    for index_file in index_files:
        for entry in outputs.read_index(index_file.parent):
            latest.pop(entry["job_id"], None)
            latest[entry["job_id"]] = entry
    contents = RunContents(run_dir)
    planned = planned_job_ids(run_dir)
    for entry in latest.values():
        if planned is not None and entry["job_id"] not in planned:
            if entry.get("status") == "ok":
                contents.stale.append(str(entry.get("image") or entry["job_id"]))
            continue
        if entry.get("status") != "ok":
            contents.failed.append(entry)
            continue
        image = _run_image(run_dir, entry, contents.missing)
        if image is not None:
            contents.images.append(image)
    contents.images.sort(key=lambda image: image.key)
    _refuse_mixed_models(contents)
    return contents


def _run_manifests(run_dir: Path) -> list[Path]:
    """The run's `manifest.resolved.yaml`, else its shards' (each holds the whole plan)."""
    found = [run_dir / outputs.RESOLVED_MANIFEST_NAME]
    shards = run_dir / SHARDS_DIR
    if shards.is_dir():
        found += sorted(shards.glob(f"*-of-*/{outputs.RESOLVED_MANIFEST_NAME}"))
    return [path for path in found if path.is_file()]


def planned_job_ids(run_dir: Path) -> set[str] | None:
    """The job ids of the run's plan, from its resolved manifest; None when it has none that loads (a
    folder from an older squeeze, references since moved): then every indexed image counts."""
    from squeeze_cli.manifest import load_manifest
    from squeeze_cli.plan import plan_jobs

    for path in _run_manifests(run_dir):
        try:
            loaded = load_manifest(path, check_sources=False)
            jobs = plan_jobs(loaded, model_identity=loaded.model_identity, max_jobs=loaded.max_jobs)
        except (SqueezeError, OSError):
            continue
        return {job.job_id for job in jobs}
    return None


def _refuse_mixed_models(contents: RunContents) -> None:
    """Images of two model identities are never scored as one run (possible only without a plan)."""
    models: dict[str, list[RunImage]] = {}
    for image in contents.images:
        models.setdefault(image.model, []).append(image)
    if len(models) > 1:
        counts = ", ".join(f"{group[0].recipe or 'unknown'}: {len(group)}" for group in models.values())
        raise RunDirError(
            f"{contents.path}: holds images of {len(models)} models ({counts}) and no plan that says which "
            "count",
            "give each recipe its own --out, or run `squeeze gen MANIFEST --out RUN --prune` to move the "
            "other model's images to RUN/.stale/",
        )


def _run_image(run_dir: Path, entry: dict[str, Any], missing: list[str]) -> RunImage | None:
    image_name, sidecar_name = entry.get("image"), entry.get("sidecar")
    if not isinstance(image_name, str) or not isinstance(sidecar_name, str):
        missing.append(f"job {entry['job_id']}: its index line names no image or sidecar")
        return None
    try:
        image_path = outputs.safe_join(run_dir, *image_name.split("/"))
        sidecar_path = outputs.safe_join(run_dir, *sidecar_name.split("/"))
    except outputs.UnsafeOutputPathError:
        missing.append(f"{image_name}: its index line points outside the run directory")
        return None
    if not image_path.is_file():
        missing.append(f"{image_name}: the image is missing")
        return None
    record = outputs.read_sidecar(sidecar_path)
    if record is None or record.get("job_id") != entry["job_id"]:
        missing.append(f"{sidecar_name}: the sidecar is missing or belongs to another job")
        return None
    return RunImage(
        job_id=entry["job_id"],
        subject=str(record.get("subject")),
        prompt_index=int(record.get("prompt_index", 0)),
        seed=int(record.get("seed", 0)),
        prompt=str(record.get("prompt") or ""),
        class_noun=record.get("class_noun"),
        image=image_name,
        references=tuple(record.get("references") or ()),
        recipe=str(record.get("preset") or ""),
        model=hashlib.sha256(
            json.dumps(record.get("model"), sort_keys=True, default=str).encode()
        ).hexdigest()[:16],
    )
