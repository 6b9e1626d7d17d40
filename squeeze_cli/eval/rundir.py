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


class RunDirError(SqueezeError):
    """A path given to `squeeze eval` that is not a run directory (exit code 2)."""


@dataclass(frozen=True)
class GateVerdict:
    """How `gen`'s identity gate chose an image (its sidecar's `quality`): the highest DINO of `attempts`
    images made with different seeds. None where an older sidecar does not say."""

    attempts: int | None
    max_attempts: int | None
    min_dino: float | None


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
    gate: GateVerdict | None = None  # chosen by `gen`'s identity gate (best DINO of several seeds)
    # The index line's channel variants (`{name: file}`, `output.variants`), for `eval --rules --variant`.
    variants: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    # The PNG's sha256 as its sidecar records it (the score cache's key): None means hash the file.
    sha256: str | None = None
    # Trusted by its stat, as gen's resume does: not read, so not yet checked by `unreadable` either.
    # `evaluate_run` checks it before decoding it; a cached eval reads it not at all.
    unread: bool = False

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
    # Jobs of the run's plan with no index line yet (an unfinished or still running gen): the means are
    # over part of the plan, which must be said. None when the folder has no plan that loads.
    pending: int | None = None

    @property
    def recipe(self) -> str | None:
        """The recipe of the images (one model identity per run: `read_run` refuses a mix)."""
        return self.images[0].recipe if self.images else None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def gated(self) -> list[RunImage]:
        """The images `gen`'s identity gate chose (each the best DINO of its attempts)."""
        return [image for image in self.images if image.gate is not None]


def _index_files(run_dir: Path) -> list[Path]:
    """Every shard's index, then the run's own: images of a sharded run not merged yet are found, and the
    merged index (written last, by the run that retried the shards' failures) has the final word."""
    run, *shards = outputs.run_folders(run_dir)
    return [
        folder / outputs.INDEX_NAME for folder in (*shards, run) if (folder / outputs.INDEX_NAME).is_file()
    ]


def read_run(path: str | Path, *, verify: bool = False) -> RunContents:
    """The images of the run in `path`, each finished job once (its latest line wins).

    A job whose index line says `ok` but whose PNG or sidecar is gone is listed in `missing`; failed jobs
    in `failed`; neither stops the evaluation of the rest. With `verify`, every PNG is hashed and checked
    (`eval --verify`), not only those whose stat differs from their sidecar's.

    Raises:
        `RunDirError`: when `path` is not a directory or holds no run index.
    """
    run_dir = Path(path)
    if not run_dir.is_dir():
        raise RunDirError(*outputs.not_a_run_folder(run_dir))
    # A link to the run: eval's files are written in the folder it names (never through a link).
    run_dir = outputs.real_folder(run_dir, "give the --out folder of a `squeeze gen` run")
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
    if not latest:  # garbage, or a run killed before its first image: nothing to evaluate, nothing written
        raise RunDirError(
            f"{run_dir}: its {outputs.INDEX_NAME} has no valid line (not a squeeze run, or none of its "
            "jobs has finished)",
            "run `squeeze gen` on it (it rebuilds a damaged index from the sidecars), then eval",
        )
    contents = RunContents(run_dir)
    plan = outputs.run_plan_if_any(run_dir, verify=verify)
    planned = {job.job_id for job in plan.jobs} if plan is not None else None
    if planned is not None:
        contents.pending = len(planned - latest.keys())
    for entry in latest.values():
        if planned is not None and entry["job_id"] not in planned:
            if entry.get("status") == "ok":
                contents.stale.append(str(entry.get("image") or entry["job_id"]))
            continue
        if entry.get("status") != "ok":
            contents.failed.append(entry)
            continue
        image = _run_image(run_dir, entry, contents.missing, verify)
        if image is not None:
            contents.images.append(image)
    contents.images.sort(key=lambda image: image.key)
    _refuse_mixed_models(contents)
    return contents


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


def _run_image(run_dir: Path, entry: dict[str, Any], missing: list[str], verify: bool) -> RunImage | None:
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
    damaged = _damaged_field(record)
    if damaged is not None:
        missing.append(f"{sidecar_name}: the sidecar is damaged: {damaged}")
        return None
    # Gen's definition of finished (size and sha256 as the sidecar records, the stat trusted), then a
    # header and completeness check that decodes nothing: a truncated, replaced or bomb PNG is listed,
    # not scored. A PNG whose stat is the one squeeze recorded is read by neither (a cached eval of 100k
    # images reads no image); `evaluate_run` checks it before decoding it. One that was hashed is checked
    # now: a sidecar edited to match a bomb vouches for nothing.
    reason, new_stamp = outputs.png_check(image_path, record, verify=verify)
    unread = reason is None and new_stamp is None and not verify
    if reason is None and not unread:
        reason = unreadable(image_path)
    if reason is not None:
        missing.append(f"{image_name}: {reason}")
        return None
    references = record.get("references")
    return RunImage(
        job_id=entry["job_id"],
        subject=str(record.get("subject")),
        prompt_index=record.get("prompt_index", 0),
        seed=record.get("seed", 0),
        prompt=str(record.get("prompt") or ""),
        class_noun=record.get("class_noun"),
        image=image_name,
        # Paths only: anything else in the list (a number would be taken as a file descriptor) is ignored.
        references=tuple(r for r in references if isinstance(r, str) and r)
        if isinstance(references, list)
        else (),
        recipe=str(record.get("preset") or ""),
        model=hashlib.sha256(
            json.dumps(record.get("model"), sort_keys=True, default=str).encode()
        ).hexdigest()[:16],
        gate=_gate_verdict(record.get("quality")),
        variants=variants if isinstance(variants := entry.get(outputs.VARIANTS_KEY), dict) else {},
        sha256=record[outputs.PNG_FILE_KEY]["sha256"],  # matched: `png_check` found it a string
        unread=unread,
    )


def _gate_verdict(quality: Any) -> GateVerdict | None:
    if quality is None:
        return None

    def number(name: str, kind: type | tuple[type, ...]) -> Any:
        value = quality.get(name)
        return value if isinstance(value, kind) and not isinstance(value, bool) else None

    return GateVerdict(number("attempts", int), number("max_attempts", int), number("min_dino", (int, float)))


def _damaged_field(record: dict[str, Any]) -> str | None:
    """Which field of a sidecar has the wrong type for scoring, in words; None when all are usable."""
    for name in ("prompt_index", "seed"):
        value = record.get(name, 0)
        if not isinstance(value, int) or isinstance(value, bool):
            return f"`{name}` is {json_type(value)}, not an integer"
    class_noun = record.get("class_noun")
    if class_noun is not None and not isinstance(class_noun, str):
        return f"`class_noun` is {json_type(class_noun)}, not text"
    quality = record.get("quality")  # whether the image was chosen by DINO must not be guessed
    if quality is not None and not isinstance(quality, dict):
        return f"`quality` is {json_type(quality)}, not an object"
    return None


def json_type(value: Any) -> str:
    """A JSON value's type in words: `a list`, `null`, `a number (1.5)`, ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"text ({value[:20]!r})"
    if isinstance(value, list):
        return "a list"
    return "an object" if isinstance(value, dict) else type(value).__name__


def unreadable(image_path: Path) -> str | None:
    """Why a run's image is not safe to decode (`check_image`: truncated, damaged, a bomb), or None."""
    from squeeze_cli.images import check_image

    reason = check_image(str(image_path))
    return None if reason is None else f"cannot be read: {reason}"
