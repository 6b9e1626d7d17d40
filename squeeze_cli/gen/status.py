"""`squeeze status OUT`: how far a run folder is against its manifest, read from the files alone.

The plan comes from the run's own `manifest.resolved.yaml` (in OUT, or in a shard's folder when only
shards ran), what is done from the sidecars (as `gen` decides it), what failed from the run indexes (OUT's
and every shard's). Torch-free and GPU-free: a cron job can ask whether a catalog is complete.
`merge_run` brings OUT's index and grids up to date from the shards' files without generating anything.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any

from squeeze_cli import outputs
from squeeze_cli.errors import EXIT_JOBS_FAILED, EXIT_OK
from squeeze_cli.logs import counted
from squeeze_cli.manifest import LoadedManifest
from squeeze_cli.plan import Job
from squeeze_cli.processes import process_alive
from squeeze_cli.reading import MANIFEST_MAX_BYTES, file_kind, read_regular_file


@dataclass(frozen=True)
class SubjectStatus:
    name: str
    planned: int
    done: int
    failed: int

    @property
    def pending(self) -> int:
        return self.planned - self.done - self.failed


@dataclass
class RunStatus:
    """Where a run folder stands: per subject done / failed / pending, and each run's last summary."""

    out: Path
    manifest: Path
    subjects: list[SubjectStatus]
    runs: list[dict[str, Any]]  # {"folder", "shard", "status", "finished_at"} from each run.json
    failures: list[dict[str, Any]]  # the index lines of the failed, unfinished jobs
    jobs: list[Job] = field(repr=False, default_factory=list)
    finished: dict[str, outputs.Finished] = field(repr=False, default_factory=dict)
    loaded: LoadedManifest | None = field(repr=False, default=None)
    stale: list[outputs.StaleImage] = field(default_factory=list)  # images of jobs the plan does not have

    @property
    def totals(self) -> dict[str, int]:
        return {
            key: sum(getattr(subject, key) for subject in self.subjects)
            for key in ("planned", "done", "failed", "pending")
        }

    @property
    def complete(self) -> bool:
        totals = self.totals
        return totals["done"] == totals["planned"]

    @property
    def plan(self) -> outputs.RunPlan | None:
        """The plan this status counts (None without its loaded manifest)."""
        return outputs.RunPlan(self.manifest, self.loaded, self.jobs) if self.loaded is not None else None

    @property
    def exit_code(self) -> int:
        """0 when every planned job is done, 1 otherwise (pending or failed jobs)."""
        return EXIT_OK if self.complete else EXIT_JOBS_FAILED

    def resume_command(self) -> str:
        import shlex

        return shlex.join(["squeeze", "gen", str(self.manifest), "--out", str(self.out)])

    def prune_command(self) -> str:
        import shlex

        return shlex.join(["squeeze", "gen", str(self.manifest), "--out", str(self.out), "--prune"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "manifest": str(self.manifest),
            "complete": self.complete,
            "jobs": self.totals,
            "subjects": [
                {
                    "name": s.name,
                    "planned": s.planned,
                    "done": s.done,
                    "failed": s.failed,
                    "pending": s.pending,
                }
                for s in self.subjects
            ],
            "failures": self.failures,
            "runs": self.runs,
            "stale": {
                "count": len(self.stale),
                "images": [
                    {"image": image.image, "sidecar": image.sidecar, "job_id": image.job_id}
                    for image in self.stale
                ],
            },
        }


# A run.json holds counts, timings and the failures: megabytes at most, even with 100,000 failed jobs.
SUMMARY_MAX_BYTES = MANIFEST_MAX_BYTES


def _read_summary(folder: Path) -> dict[str, Any] | None:
    """A run's `run.json`, or None when it is missing or damaged: not a regular file (a FIFO, a link to
    /dev/zero), too large, not JSON, nested too deep for the parser, or not an object."""
    try:
        data = read_regular_file(folder / outputs.RUN_SUMMARY_NAME, SUMMARY_MAX_BYTES, follow_symlinks=False)
        summary = json.loads(data)
    except (OSError, ValueError, RecursionError):  # ValueError: UnicodeDecodeError and JSON errors
        return None
    return summary if isinstance(summary, dict) else None


def _liveness(summary: dict[str, Any]) -> dict[str, Any]:
    """For a run whose `run.json` says `running`: its `pid`, and `alive`, whether that process still runs
    (None when it cannot be told from here: another machine's run, an older run.json; False for a pid that
    names a process started after the run). A killed run (kill -9, out of memory) never writes its summary,
    and says `running` for good."""
    if summary.get("status") != "running":
        return {}
    pid = summary.get("pid")
    return {"pid": pid, "alive": process_alive(pid, summary.get("host"), summary.get("started_at"))}


def run_status(out: str | Path, *, verify: bool = False) -> RunStatus:
    """Read a run folder: its plan, what is finished, what failed, each run's summary; writes nothing.
    With `verify`, every finished image is hashed (`outputs.find_finished`)."""
    out = outputs.real_folder(out, "point it at the run's folder")
    plan = outputs.load_run_plan(out, verify=verify)
    manifest, loaded, jobs = plan.manifest, plan.loaded, plan.jobs
    finished = outputs.find_finished(out, jobs, verify=verify)
    planned_ids = {job.job_id for job in jobs}
    failed: dict[str, dict[str, Any]] = {}
    runs = []
    for folder in outputs.run_folders(out):
        for entry in outputs.iter_index(folder):
            job_id = entry.get("job_id")
            if job_id in planned_ids and job_id not in finished:
                if entry.get("status") == "failed":
                    failed[job_id] = entry
                else:
                    failed.pop(job_id, None)
        summary = _read_summary(folder)
        if summary is not None:
            runs.append(
                {
                    "folder": str(folder.relative_to(out)) if folder != out else ".",
                    "shard": summary.get("shard"),
                    "status": summary.get("status"),
                    "finished_at": summary.get("finished_at"),
                    **_liveness(summary),
                }
            )
    ids_by_subject: dict[int, list[str]] = {}  # one pass: not one pass over every job per subject
    for job in jobs:
        ids_by_subject.setdefault(job.subject_index, []).append(job.job_id)
    subjects = []
    for subject in loaded.subjects:
        ids = ids_by_subject.get(subject.index, [])
        subjects.append(
            SubjectStatus(
                subject.name,
                planned=len(ids),
                done=sum(job_id in finished for job_id in ids),
                failed=sum(job_id in failed for job_id in ids),
            )
        )
    stale = outputs.find_stale(out, jobs, finished)
    return RunStatus(out, manifest, subjects, runs, list(failed.values()), jobs, finished, loaded, stale)


def merge_run(status: RunStatus) -> None:
    """Bring OUT's run index and grids up to date from every image on disk (the shards' included), and
    record the failures the shards' indexes hold; generates nothing. Takes OUT's lock, like `gen`."""
    from squeeze_cli.gen.lock import DirectoryLock, drawing_views  # filelock costs plain `status` ~20 ms

    lock = DirectoryLock(status.out)
    lock.acquire()
    try:
        entries = {job_id: found.entry for job_id, found in status.finished.items()}
        outputs.repair_index(status.out, entries, planned_images=outputs.planned_images(status.jobs))
        indexed = {entry["job_id"] for entry in outputs.iter_index(status.out)}
        for entry in status.failures:
            if entry["job_id"] not in indexed:
                outputs.append_index(status.out, entry)
        assert status.loaded is not None, "run_status always reads the manifest"
        output = status.loaded.document.output
        # A subject whose folder is in the way (a FIFO, a file, a link where it goes) keeps its views as
        # they are; every other subject's are drawn, then the first such path is reported.
        drawable, refused = _drawable_jobs(status.out, status.jobs)
        # Shards still running draw views too: the images are read again under the drawing lock, so views
        # a shard drew since `run_status` read them are never replaced by views with fewer images.
        with drawing_views(status.out):
            outputs.update_views(
                status.out,
                drawable,
                outputs.find_finished(status.out, drawable),
                lambda: False,
                grids=output.grids,
                contact_sheets=output.contact_sheet,
                views_dir=output.views_dir,
            )
    finally:
        lock.release()
    if refused:
        first = refused[0]
        more = f" (and {len(refused) - 1} more subjects)" if len(refused) > 1 else ""
        raise outputs.UnsafeOutputPathError(
            f"{first.message}: its views were not drawn{more}; the index and the other views are merged",
            first.hint,
        )


def _drawable_jobs(out: Path, jobs: list[Job]) -> tuple[list[Job], list[outputs.UnsafeOutputPathError]]:
    """The jobs of the subjects whose folder is a real folder (or absent), and what stops the others: a
    FIFO, a file or a link where a subject's folder goes."""
    drawable: list[Job] = []
    refused: list[outputs.UnsafeOutputPathError] = []
    for subject, subject_jobs in groupby(jobs, key=lambda job: job.subject):
        folder = out / subject
        try:
            mode: int | None = os.lstat(folder).st_mode
        except FileNotFoundError:
            mode = None
        except OSError:
            mode = None  # unreadable: the drawing reports it, naming the file
        if mode is not None and not stat.S_ISDIR(mode):
            refused.append(
                outputs.UnsafeOutputPathError(
                    f"{folder} is {file_kind(mode)}, not a folder",
                    f"move or remove it: the images of subject {subject!r} go in the folder {folder}",
                )
            )
        else:
            drawable.extend(subject_jobs)
    return drawable, refused


STALE_SHOWN = 5  # stale images named in the text; `--json` lists them all


def format_status(status: RunStatus, merged: bool = False) -> str:
    """The text `squeeze status` prints."""
    width = max((len(subject.name) for subject in status.subjects), default=0)
    lines = [f"run       {status.out}", f"manifest  {status.manifest}"]
    for subject in status.subjects:
        lines.append(f"  {subject.name:<{width}}  {_counts(subject.planned, subject.done, subject.failed)}")
    totals = status.totals
    lines.append(f"jobs      {_counts(totals['planned'], totals['done'], totals['failed'])}")
    for run in status.runs:
        # A plain run's folder is OUT itself (`.` in --json), already named on the first line.
        where = f"{run['folder']}: " if run["folder"] != "." else ""
        if run.get("alive") is False:
            gone = f"process {run['pid']} is gone (killed, out of memory, or run.json could not be written)"
            lines.append(f"last run  {where}stopped without its summary: {gone}")
        else:
            lines.append(f"last run  {where}{run['status']} ({run['finished_at'] or 'not finished'})")
    if status.stale:
        shown = ", ".join(image.image for image in status.stale[:STALE_SHOWN])
        more = f" and {len(status.stale) - STALE_SHOWN:,} more" if len(status.stale) > STALE_SHOWN else ""
        count = len(status.stale)
        lines.append(f"stale     {count:,} images of jobs this manifest does not plan: {shown}{more}")
        lines.append(f"          to move them to {outputs.STALE_DIR_NAME}/: {status.prune_command()}")
    if merged:
        lines.append(f"merged    {outputs.INDEX_NAME} and grids rebuilt from the images on disk")
    if status.complete:
        lines.append("complete: every planned image is done")
    else:
        left = totals["pending"] + totals["failed"]
        lines.append(f"incomplete: {counted(left, 'job')} left; to finish them: {status.resume_command()}")
    return "\n".join(lines)


def _counts(planned: int, done: int, failed: int) -> str:
    text = f"{done:,}/{planned:,} done"
    if failed:
        text += f", {failed:,} failed"
    pending = planned - done - failed
    if pending:
        text += f", {pending:,} pending"
    return text
