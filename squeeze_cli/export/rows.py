"""An export's rows: the finished images of a run's current plan (never a stale one), one row each, with
what the sidecar records about it and the scores `squeeze eval` wrote into `metrics.jsonl`."""

from __future__ import annotations

import json
import math
import os
import random
import stat
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from squeeze_cli import outputs
from squeeze_cli.errors import UsageError
from squeeze_cli.logs import counted
from squeeze_cli.metrics.protocol import METRIC_LABELS
from squeeze_cli.plan import Job

# The recorded fields of a row, by kind (what `--where` may compare). Metric columns are added when the
# run was evaluated.
TEXT_FIELDS = ("subject", "class", "prompt", "job_id", "recipe", "model_identity", "license")
NUMBER_FIELDS = ("prompt_index", "seed")
# The split names `datasets` reads as one split, `validation`.
_VALIDATION = {"val", "validation"}


@dataclass(frozen=True)
class ExportImage:
    """One finished image of the plan: its PNG on disk and its row (without the image)."""

    png: Path
    row: dict[str, Any]


@dataclass
class RunImages:
    """A run folder read for export: its plan, and the metric scores of its images by job id."""

    out: Path
    plan: outputs.RunPlan
    metric_names: tuple[str, ...]
    scores: dict[str, tuple[float | None, ...]]
    # `images` appends each image it leaves out as damaged, `squeeze eval`'s way: `<subject>/<name>: why`.
    left_out: list[str] = field(default_factory=list)

    @property
    def fields(self) -> dict[str, str]:
        """`{field: "number" | "text"}` of every row."""
        kinds = dict.fromkeys(TEXT_FIELDS, "text") | dict.fromkeys(NUMBER_FIELDS, "number")
        return kinds | dict.fromkeys(self.metric_names, "number")

    @property
    def absent_fields(self) -> dict[str, str]:
        """`{field: hint}` of the eval scores this run has none of."""
        hint = f"run `squeeze eval {self.out}` first: its scores become fields"
        return {name: hint for name in METRIC_LABELS if name not in self.metric_names}

    def images(self, subjects: Collection[str], skip: Collection[str] = ()) -> Iterator[ExportImage]:
        """The finished images of the plan's `subjects`, in plan order, one at a time; the jobs in `skip`
        (exported already) are not read.

        An image is finished as `gen` decides it (`outputs.png_check`): its sidecar, at its position's
        name, names its job and the PNG beside it has the size and sha256 it records.
        """
        identity = self.plan.loaded.model_identity
        folders: dict[str, Path] = {}
        for job in self.plan.jobs:
            if job.subject not in subjects or job.job_id in skip:
                continue
            if job.subject not in folders:  # resolved once a subject: the names inside are squeeze's own
                folders[job.subject] = outputs.safe_join(self.out, job.subject)
            png = folders[job.subject] / outputs.image_name(job).split("/")[1]
            sidecar = png.with_suffix(".json")
            record = outputs.read_sidecar(sidecar)
            if record is None:
                if os.path.lexists(sidecar):  # there but unreadable: damaged, not a job still to run
                    self.left_out.append(f"{job.subject}/{sidecar.name}: the sidecar is damaged")
                continue
            if record.get("job_id") != job.job_id:  # another plan's image at this position: stale
                continue
            reason, new_stamp = outputs.png_check(png, record)
            if reason is None and new_stamp is not None:
                reason = _undecodable(png)
            if reason is not None:
                self.left_out.append(f"{job.subject}/{png.name}: {reason}")
                continue
            yield ExportImage(png, self._row(job, record, identity))

    def _row(self, job: Job, record: Mapping[str, Any], identity: str) -> dict[str, Any]:
        variants = record.get("variants")
        license_ = record.get("license")  # the recipe's: {"name", "commercial_use", "url"}
        row: dict[str, Any] = {
            "prompt": job.prompt,
            "subject": job.subject,
            "class": job.class_noun,
            "prompt_index": job.prompt_index,
            "seed": job.seed,
            "job_id": job.job_id,
            "recipe": record.get("preset"),
            "model_identity": identity,
            "model": json.dumps(record.get("model"), sort_keys=True),
            "license": license_.get("name") if isinstance(license_, dict) else None,
            "references": list(job.references),
            "variants": None if variants is None else json.dumps(variants, sort_keys=True),
        }
        scores = self.scores.get(job.job_id, (None,) * len(self.metric_names))
        row.update(zip(self.metric_names, scores, strict=True))
        return row


def _undecodable(png: Path) -> str | None:
    """Why `png` is not safe to decode (truncated, damaged, a bomb: nothing decoded to tell), or None."""
    from squeeze_cli.images import check_image

    reason = check_image(str(png))
    return None if reason is None else f"cannot be read: {reason}"


def read_run_images(out: str | os.PathLike) -> RunImages:
    """The run in `out`: its plan (from its `manifest.resolved.yaml`) and its `metrics.jsonl` scores.

    Raises:
        `UsageError`: `out` is not a run folder, or its `metrics.jsonl` cannot be read.
    """
    out = outputs.real_folder(out, "give the --out folder of a `squeeze gen` run")  # a link: the run it names
    plan = outputs.load_run_plan(out)
    names, scores = _read_scores(out)
    return RunImages(out, plan, names, scores)


def _read_scores(out: Path) -> tuple[tuple[str, ...], dict[str, tuple[float | None, ...]]]:
    """The metric columns `squeeze eval` scored and each image's scores, from `metrics.jsonl`, read a line
    at a time and kept as tuples (a few dozen bytes an image at 100,000 images)."""
    path = outputs.safe_join(out, outputs.METRICS_JSONL_NAME)
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise UsageError(f"{path}: not a regular file", f"remove it and run `squeeze eval {out}` again")
    except FileNotFoundError:
        return (), {}
    rows: list[tuple[str, dict[str, Any]]] = []
    present: set[str] = set()
    with open(path, "rb") as lines:  # bytes: a line that is not UTF-8 is a bad line, not a traceback
        for number, line in enumerate(lines, start=1):
            try:
                row = json.loads(line)
            except ValueError:
                raise UsageError(
                    f"{path}:{number}: not a JSON line", f"run `squeeze eval {out}` again to rewrite it"
                ) from None
            if not isinstance(row, dict) or not isinstance(row.get("job_id"), str):
                continue
            values = {name: row[name] for name in METRIC_LABELS if _is_number(row.get(name))}
            present.update(values)
            rows.append((row["job_id"], values))
    names = tuple(name for name in METRIC_LABELS if name in present)
    return names, {job_id: tuple(values.get(name) for name in names) for job_id, values in rows}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_splits(specs: Sequence[str]) -> dict[str, float]:
    """`{split: fraction of subjects}` from `--split NAME=FRACTION` flags (the rest of the subjects are
    `train`).

    Raises:
        `UsageError`: a malformed flag, an unknown split name, or fractions of 1 or more in all.
    """
    splits: dict[str, float] = {}
    for spec in specs:
        name, _, value = spec.partition("=")
        name = name.strip()
        try:
            fraction = float(value)
        except ValueError:
            fraction = math.nan
        if not 0 < fraction < 1:
            raise UsageError(
                f"--split {spec}: expected NAME=FRACTION with 0 < FRACTION < 1", "e.g. --split val=0.05"
            )
        if name not in outputs.EXPORT_OTHER_SPLITS:
            raise UsageError(
                f"--split {spec}: unknown split {name!r}",
                f"use {', '.join(outputs.EXPORT_OTHER_SPLITS)}: the names dataset loaders recognise "
                "(the rest is `train`)",
            )
        if name in splits:
            raise UsageError(f"--split {spec}: split {name!r} given twice")
        if name in _VALIDATION and splits.keys() & _VALIDATION:
            raise UsageError(
                f"--split {spec}: `val` and `validation` are one split to dataset loaders",
                "give one of them",
            )
        splits[name] = fraction
    if sum(splits.values()) >= 1:
        raise UsageError(
            f"--split: the fractions add up to {sum(splits.values()):g}", "leave some subjects for train"
        )
    return splits


def assign_splits(subjects: Sequence[str], splits: Mapping[str, float], seed: int) -> dict[str, str]:
    """`{subject: split}`: whole subjects, never one in two splits. The subjects are shuffled with `seed`
    (the same subjects and seed give the same assignment), then each split takes `round(fraction × count)`
    of them (at least one), in the order given; the rest are `train`.

    Raises:
        `UsageError`: the splits would take every subject, leaving none for `train` (or none for a split).
    """
    counts = {name: max(1, round(fraction * len(subjects))) for name, fraction in splits.items()}
    if splits and sum(counts.values()) >= len(subjects):
        taken = ", ".join(f"{name} {count}" for name, count in counts.items())
        raise UsageError(
            f"--split: the splits take {taken} of the {counted(len(subjects), 'subject')} exported, "
            "leaving none for train",
            "lower the fractions: each split takes round(FRACTION x subjects) whole subjects, at least one",
        )
    order = sorted(subjects)
    random.Random(seed).shuffle(order)
    assignment = dict.fromkeys(order, outputs.EXPORT_TRAIN_SPLIT)
    start = 0
    for name in splits:
        count = counts[name]
        for subject in order[start : start + count]:
            assignment[subject] = name
        start += count
    return assignment
