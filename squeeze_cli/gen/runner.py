"""`squeeze gen`: load the pipeline once, walk the jobs subject by subject, batch, write, resume.

Data flows one way: the planned jobs come in, the pipeline makes pixels, `outputs` writes every file.
With several processes (`accelerate launch` / `torchrun`) each takes a balanced share of the pending jobs;
the main process alone writes the run-level files (the run index, the summary, grids).
"""

from __future__ import annotations

import fcntl
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import groupby
from pathlib import Path
from typing import Any

from squeeze_cli import outputs
from squeeze_cli.errors import (
    EXIT_JOBS_FAILED,
    EXIT_OK,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    ManifestError,
    Problem,
    SqueezeError,
)
from squeeze_cli.gen.progress import Reporter
from squeeze_cli.images import load_rgb, upright_size
from squeeze_cli.manifest.resolve import LoadedManifest
from squeeze_cli.pipelines.stages import stage_plan
from squeeze_cli.plan import Job, plan_jobs, shard_jobs

LOCK_NAME = ".squeeze.lock"


@dataclass
class GenOptions:
    """The `squeeze gen` flags that are not manifest values (those went in through `--set`)."""

    out: Path | None = None
    overwrite: bool = False
    shard: tuple[int, int] | None = None  # (index, count), 0-based
    batch_size: int = 1
    device: str = "auto"
    offload: str = "none"
    dry_run: bool = False
    allow_pickle: bool = False
    command: list[str] = field(default_factory=list)


class OutputInUseError(SqueezeError):
    """Another `squeeze gen` holds the output directory."""


class _Processes:
    """This process's place among the processes of the run: one, or one of `accelerate launch`'s."""

    def __init__(self) -> None:
        self.state = None
        self.index, self.count = 0, 1
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch
            from accelerate import PartialState

            # Without cpu=True on a machine with no GPU, each process would believe it is alone.
            self.state = PartialState(cpu=not torch.cuda.is_available())
            self.index, self.count = self.state.process_index, self.state.num_processes

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def device(self, requested: str) -> str:
        if requested != "auto":
            return requested
        if self.state is not None:
            return str(self.state.device)
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def gather(self, value: Any) -> list[Any]:
        if self.state is None:
            return [value]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.count
        dist.all_gather_object(gathered, value)
        return gathered


class _StopNow(BaseException):
    """Raised by the signal handler to stop at once. A BaseException, like KeyboardInterrupt, so that no
    `except Exception` on the way (model loading wraps its errors) can swallow it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _StopSignal:
    """SIGINT/SIGTERM handling for the whole run.

    Until `graceful` is set (planning, locking, loading the model: nothing written yet) a signal stops at
    once. From then on the first one asks the run to stop after the current batch and still write its
    summary; a second one stops at once (atomic writes clean up their temporary file on the way out).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.graceful = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignal:
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.graceful or self.signum is not None:
            raise _StopNow(signum)
        self.signum = signum
        print("stopping after the current batch (signal again to stop now)", file=sys.stderr, flush=True)


def _exit_code(signum: int) -> int:
    return EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM


class _DirectoryLock:
    """One run per output directory: an flock the kernel releases when its process dies, even by kill -9,
    so a lock left by a dead run is simply taken over."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_NAME
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self) -> None:
        outputs.ensure_dir(self.path.parent)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:
            raise outputs.OutputWriteError.from_os_error(self.path, error, "create the lock file") from error
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            except OSError:
                holder = "unknown"
            os.close(fd)
            raise OutputInUseError(
                f"{self.path.parent} is in use by another squeeze gen (pid {holder})",
                "wait for it to finish, or choose another --out",
            ) from None
        except OSError as error:  # a file system without flock support
            os.close(fd)
            raise outputs.OutputWriteError.from_os_error(self.path, error, "lock") from error
        # The pid is for the message a second run prints; the lock itself is the flock. A full disk must
        # not keep a run from starting (it may have nothing left to write), so failing to record it is fine.
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except OSError:
            pass
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _is_out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
    )


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _batches(jobs: Sequence[Job], batch_size: int) -> Iterator[list[Job]]:
    """Consecutive jobs of one subject with equal sampling parameters, at most `batch_size` at a time."""
    for _, group in groupby(jobs, key=lambda job: (job.subject_index, job.params)):
        group = list(group)
        for start in range(0, len(group), batch_size):
            yield group[start : start + batch_size]


class Runner:
    """Generates the pending jobs of one process and records every outcome."""

    def __init__(
        self,
        manifest: LoadedManifest,
        options: GenOptions,
        reporter: Reporter,
        out_dir: Path,
        run_dir: Path,
        processes: _Processes,
    ):
        self.manifest = manifest
        self.options = options
        self.reporter = reporter
        self.out_dir = out_dir
        self.run_dir = run_dir
        self.processes = processes
        self.pipe: Any = None
        self.succeeded: list[str] = []
        self.failures: list[dict[str, Any]] = []
        self.timings = {"load": 0.0, "encode_subjects": 0.0, "generate": 0.0}
        self.preset_name = manifest.recipe.name if manifest.recipe is not None else "custom"
        self.model_info = manifest.model.model_dump(mode="json")
        self.versions = outputs.package_versions()

    def load(self) -> None:
        from squeeze_cli.loading import load_pipeline

        started = time.perf_counter()
        device = self.processes.device(self.options.device)
        self.reporter.status(f"loading {self.preset_name} on {device} ({self.manifest.model.dtype})")
        self.pipe = load_pipeline(
            self.manifest.model,
            device=device,
            offload=self.options.offload,
            allow_pickle=self.options.allow_pickle,
        )
        self.timings["load"] = time.perf_counter() - started

    def check_instructions(self, jobs: Sequence[Job]) -> list[Problem]:
        """One problem per prompt too long for the MLLM's context with its subject's references.

        Reads only the references' headers, so a manifest of thousands of subjects is checked quickly."""
        problems = []
        for _, subject_jobs in groupby(jobs, key=lambda job: job.subject_index):
            subject_jobs = list(subject_jobs)
            sizes = [upright_size(path) for path in subject_jobs[0].references]
            prompts = {(job.prompt_index, job.prompt) for job in subject_jobs}
            for prompt_index, prompt in sorted(prompts):
                try:
                    self.pipe.mllm_encoder.check_fits(sizes, [prompt])
                except ValueError as error:
                    subject_index = subject_jobs[0].subject_index
                    where = self.manifest.subjects[subject_index].prompts[prompt_index].location
                    field = f"subjects[{subject_index}].prompts[{prompt_index}]"
                    problems.append(Problem(where.file, where.line, where.column, field, str(error)))
        return problems

    def run(self, jobs: Sequence[Job], stop: _StopSignal) -> None:
        for _, subject_jobs in groupby(jobs, key=lambda job: job.subject_index):
            subject_jobs = list(subject_jobs)
            if stop.signum is not None:
                return
            conditions = self._encode_subject(subject_jobs)
            if conditions is None:
                continue
            for batch in _batches(subject_jobs, self.options.batch_size):
                if stop.signum is not None:
                    return
                self._generate(batch, conditions[batch[0].params.reference_size])

    def _encode_subject(self, jobs: list[Job]) -> dict[int, Any] | None:
        """The subject's condition for each reference size its jobs use; None when its references fail."""
        started = time.perf_counter()
        try:
            images = [load_rgb(path) for path in jobs[0].references]
            conditions = {
                size: self.pipe.encode_subject(images, reference_size=size)
                for size in sorted({job.params.reference_size for job in jobs})
            }
        except Exception as error:  # a reference unreadable since validation, or the model failing on it
            for job in jobs:
                self._fail(job, f"cannot encode the subject's references: {_one_line(error)}")
            return None
        self.timings["encode_subjects"] += time.perf_counter() - started
        return conditions

    def _generate(self, batch: list[Job], condition: Any) -> None:
        import torch

        self.reporter.batch_started(batch, batch[0].params.num_inference_steps)
        started = time.perf_counter()
        try:
            result = self.pipe(
                prompt=[job.prompt for job in batch],
                subject_condition=condition,
                # Each image's noise from its own seed: the same image whatever batch it lands in.
                generator=[torch.Generator("cpu").manual_seed(job.seed) for job in batch],
                callback_on_step_end=self._on_step,
                **batch[0].params.to_pipeline_kwargs(),
            )
        except Exception as error:
            self.reporter.batch_finished()
            if _is_out_of_memory(error) and len(batch) > 1:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                half = len(batch) // 2
                self.reporter.warning(
                    f"out of memory with a batch of {len(batch)}; retrying as {half} + {len(batch) - half}"
                )
                self._generate(batch[:half], condition)
                self._generate(batch[half:], condition)
                return
            for job in batch:
                self._fail(job, _one_line(error))
            return
        self.reporter.batch_finished()
        seconds = time.perf_counter() - started
        self.timings["generate"] += seconds
        plan = result.stage_plan.to_dict()
        for job, image in zip(batch, result.images, strict=True):
            record = outputs.image_record(
                job,
                preset_name=self.preset_name,
                model_info=self.model_info,
                stage_plan=plan,
                timings={"total": seconds / len(batch), "batch": seconds, "batch_size": len(batch)},
                versions=self.versions,
            )
            record["process"] = self.processes.index
            outputs.save_image(self.out_dir, job, image, record)
            # Finished from here on (the sidecar is the marker), whatever happens to its index line: a
            # line that cannot be written is added by the repair at the start of the next run.
            self.succeeded.append(job.job_id)
            self.reporter.job_finished(job, record["files"]["image"], seconds / len(batch))
            if self.processes.is_main:
                outputs.append_index(self.run_dir, outputs.index_entry(record))

    def _on_step(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        self.reporter.step()
        return callback_kwargs

    def _fail(self, job: Job, error: str) -> None:
        failure = {
            "job_id": job.job_id,
            "subject": job.subject,
            "prompt_index": job.prompt_index,
            "seed": job.seed,
            "error": error,
        }
        self.failures.append(failure)
        if self.processes.is_main:
            outputs.append_index(self.run_dir, outputs.failed_index_entry(job, error))
        self.reporter.job_failed(job, error)


def describe_plan(jobs: Sequence[Job], done: set[str]) -> dict[str, Any]:
    """What a dry run reports: counts, images per size, and the stage plan of each parameter set."""
    sizes: dict[str, int] = {}
    stages: dict[str, list[int]] = {}
    for job in jobs:
        params = job.params
        size = f"{params.width}x{params.height}"
        sizes[size] = sizes.get(size, 0) + 1
        key = (
            f"{size}, {params.num_inference_steps} steps, thresholds {params.stage_thresholds[0]}/"
            f"{params.stage_thresholds[1]}"
        )
        if key not in stages:
            plan = stage_plan(
                params.num_inference_steps, params.height, params.width, params.stage_thresholds
            )
            stages[key] = list(plan.counts)
    return {
        "jobs": len(jobs),
        "done": sum(job.job_id in done for job in jobs),
        "pending": sum(job.job_id not in done for job in jobs),
        "subjects": len({job.subject for job in jobs}),
        "images_per_size": sizes,
        "steps_per_stage": stages,
    }


def _mtime_ns(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def _write_grids(
    out_dir: Path,
    jobs: Sequence[Job],
    finished: dict[str, dict[str, Any]],
    generated: set[str],
    stop: _StopSignal,
    *,
    grids: bool = True,
    contact_sheets: bool = True,
) -> None:
    """A grid per (subject, prompt) and a contact sheet per subject, where this run added images or the
    file is missing or older than one of its images (a run killed or stopped before its grids); from the
    images on disk, so earlier runs' and other processes' images show. A first signal stops here too."""
    for subject, subject_jobs in groupby(jobs, key=lambda job: job.subject):
        subject_jobs = list(subject_jobs)
        references = subject_jobs[0].references
        rows = []
        for prompt_index, prompt_jobs in groupby(subject_jobs, key=lambda job: job.prompt_index):
            if stop.signum is not None:
                return
            prompt_jobs = list(prompt_jobs)
            entries = [
                (job.seed, outputs.image_path(out_dir, job) if job.job_id in finished else None)
                for job in prompt_jobs
            ]
            rows.append(outputs.SheetRow(prompt_index, prompt_jobs[0].prompt, entries))
            grid = outputs.grid_path(out_dir, subject, prompt_index)
            if grids and _is_stale(grid, prompt_jobs, entries, generated):
                outputs.write_prompt_grid(
                    out_dir, subject, prompt_index, prompt_jobs[0].prompt, references, entries
                )
        sheet = outputs.contact_sheet_path(out_dir, subject)
        all_entries = [entry for row in rows for entry in row.entries]
        if contact_sheets and _is_stale(sheet, subject_jobs, all_entries, generated):
            outputs.write_contact_sheet(out_dir, subject, references, rows)


def _is_stale(
    view: Path, jobs: Sequence[Job], entries: Sequence[tuple[int, Path | None]], generated: set[str]
) -> bool:
    """Whether a grid or sheet must be drawn: missing, older than one of its images, or this run added one."""
    drawn = _mtime_ns(view)
    newest = max((_mtime_ns(path) or 0 for _, path in entries if path is not None), default=0)
    return drawn is None or drawn < newest or any(job.job_id in generated for job in jobs)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_gen(
    manifest: LoadedManifest, options: GenOptions, *, json_events: bool = False, quiet: bool = False
) -> int:
    """Run `squeeze gen` for a loaded manifest; returns the exit code.

    SIGINT/SIGTERM: before anything is written the run stops at once; afterwards it stops after the
    current batch, writes its summary (status `interrupted`) and returns 130/143; a second signal stops at
    once. A file that cannot be written (disk full, permission denied) stops the run: what finished is
    kept, the summary says `failed` when it can still be written, and `OutputWriteError` is raised.
    """
    stop = _StopSignal()
    try:
        with stop:
            return _run_gen(manifest, options, stop, json_events=json_events, quiet=quiet)
    except _StopNow as stopped:
        name = signal.Signals(stopped.signum).name
        if stop.graceful:
            note = "finished images are kept and the run summary was not updated; run the same command again"
        else:
            note = "nothing was generated"
        print(f"stopped at once by {name}: {note}", file=sys.stderr, flush=True)
        return _exit_code(stopped.signum)


def _run_gen(
    manifest: LoadedManifest, options: GenOptions, stop: _StopSignal, *, json_events: bool, quiet: bool
) -> int:
    started_at, started = _now(), time.perf_counter()
    jobs = plan_jobs(manifest, model_identity=manifest.model_identity, max_jobs=manifest.max_jobs)
    if options.shard is not None:
        jobs = shard_jobs(jobs, *options.shard)
    out_dir = (options.out or manifest.output_dir).expanduser().absolute()
    # A shard's run index and summary live in its own folder, so shards can share one output directory.
    run_dir = (
        out_dir if options.shard is None else out_dir / "shards" / f"{options.shard[0]}-of-{options.shard[1]}"
    )

    processes = _Processes() if not options.dry_run else None
    is_main = processes is None or processes.is_main
    reporter = Reporter(Reporter.choose_mode(json_events=json_events, quiet=quiet), enabled=is_main)

    if options.dry_run:
        done = set() if options.overwrite or not out_dir.is_dir() else outputs.finished_job_ids(out_dir, jobs)
        report = {"event": "dry_run", "out": str(out_dir), **describe_plan(jobs, done)}
        _report_dry_run(reporter, report, json_events)
        return EXIT_OK

    # Nothing is written before the model is loaded and every instruction is known to fit, so bad input
    # leaves no trace; an output directory that already exists is locked first, to refuse a second run early.
    lock = _DirectoryLock(run_dir) if is_main else None
    try:
        if lock is not None and run_dir.is_dir():
            lock.acquire()
        # One read of the sidecars serves both the skip decision and the index repair.
        done_records = (
            {} if options.overwrite or not out_dir.is_dir() else outputs.finished_records(out_dir, jobs)
        )
        done = set(done_records)
        pending = [job for job in jobs if job.job_id not in done]
        mine = shard_jobs(pending, processes.index, processes.count)
        runner = Runner(manifest, options, reporter, out_dir, run_dir, processes)
        if mine:
            runner.load()
        problems = [
            problem for found in processes.gather(runner.check_instructions(mine)) for problem in found
        ]
        if problems:
            raise ManifestError(problems)

        summary = _starting_summary(
            options, runner, out_dir, processes.count, len(jobs), len(done), started_at
        )
        # From the first write on, a signal lets the current batch finish and the summary be written.
        stop.graceful = True
        if is_main:
            outputs.ensure_dir(out_dir)
            if not lock.held:
                lock.acquire()
            _open_run_files(out_dir, run_dir, manifest, done_records, pending, summary)
        processes.barrier()

        reporter.run_started(len(pending), out=str(out_dir), processes=processes.count, skipped=len(done))
        write_error: outputs.OutputWriteError | None = None
        try:
            runner.run(mine, stop)
        except outputs.OutputWriteError as error:
            if processes.count > 1:
                raise  # the launcher stops the other processes; every finished image is kept
            write_error = error  # a full disk fails every job after it: stop, record what we can
        processes.barrier()
        stopped = processes.gather(stop.signum)
        results = processes.gather(
            {"succeeded": runner.succeeded, "failures": runner.failures, "timings": runner.timings}
        )
        if not is_main:
            return EXIT_OK
        failures = [failure for result in results for failure in result["failures"]]
        generated = {job_id for result in results for job_id in result["succeeded"]}
        try:
            # Every process's images are on disk now: one read of the sidecars serves the index and grids.
            finished = outputs.finished_records(out_dir, jobs)
            _merge_index(run_dir, finished, pending, failures, already_appended=runner.failures)
            # Grids are a view, redrawn by the next run when out of date: a stopped run skips them.
            if write_error is None and stop.signum is None:
                output = manifest.document.output
                _write_grids(
                    out_dir,
                    jobs,
                    finished,
                    generated,
                    stop,
                    grids=output.grids,
                    contact_sheets=output.contact_sheet,
                )
        except outputs.OutputWriteError as error:
            write_error = write_error or error

        signum = stop.signum if stop.signum is not None else next((s for s in stopped if s is not None), None)
        if write_error is not None:
            status = "failed"
        elif signum is not None:
            status = "interrupted"
        else:
            status = "completed_with_failures" if failures else "completed"
        _finish_summary(summary, status, results, failures, len(generated), started, write_error)
        try:
            outputs.write_run_summary(run_dir, summary)
        except outputs.OutputWriteError as error:
            if write_error is None:
                raise
            raise outputs.OutputWriteError(
                f"{write_error.message}; {outputs.RUN_SUMMARY_NAME} could not be updated either",
                write_error.hint,
                path=write_error.path,
                errno=write_error.errno,
            ) from error
        finally:
            reporter.run_finished(summary)
        if write_error is not None:
            raise write_error
        if signum is not None:
            return _exit_code(signum)
        return EXIT_JOBS_FAILED if failures else EXIT_OK
    finally:
        if lock is not None:
            lock.release()


def _starting_summary(
    options: GenOptions,
    runner: Runner,
    out_dir: Path,
    num_processes: int,
    planned: int,
    skipped: int,
    started_at: str,
) -> dict[str, Any]:
    """`run.json` as written when the run starts: `running` until the end, so one still saying so after
    its process is gone tells of a killed run. See docs/outputs.md for the fields."""
    return {
        "status": "running",
        "command": options.command,
        "pid": os.getpid(),
        "started_at": started_at,
        "finished_at": None,
        "out": str(out_dir),
        "jobs": {"planned": planned, "skipped": skipped, "succeeded": 0, "failed": 0},
        "failures": [],
        "timings": {"total": None, **{name: None for name in runner.timings}},
        "images_per_second": None,
        "preset": runner.preset_name,
        "model": runner.model_info,
        "versions": runner.versions,
        "processes": num_processes,
        "shard": list(options.shard) if options.shard else None,
    }


def _open_run_files(
    out_dir: Path,
    run_dir: Path,
    manifest: LoadedManifest,
    done_records: dict[str, dict[str, Any]],
    pending: Sequence[Job],
    summary: dict[str, Any],
) -> None:
    """The main process's writes before any image: clean up after killed runs, make the index agree with
    the finished images, and record the resolved manifest and the starting summary."""
    outputs.remove_stale_temp_files(out_dir)
    if run_dir != out_dir:
        outputs.remove_stale_temp_files(run_dir)
    outputs.repair_index(run_dir, done_records, pending_job_ids=[job.job_id for job in pending])
    outputs.write_resolved_manifest(run_dir, manifest.resolved_yaml())
    outputs.write_run_summary(run_dir, summary)


def _merge_index(
    run_dir: Path,
    finished: dict[str, dict[str, Any]],
    pending: Sequence[Job],
    failures: list[dict[str, Any]],
    already_appended: list[dict[str, Any]],
) -> None:
    """Bring the other processes' images (from their sidecars) and failures into the main index."""
    outputs.repair_index(run_dir, finished)
    by_id = {job.job_id: job for job in pending}
    for failure in failures:
        if failure not in already_appended:
            outputs.append_index(
                run_dir, outputs.failed_index_entry(by_id[failure["job_id"]], failure["error"])
            )


def _finish_summary(
    summary: dict[str, Any],
    status: str,
    results: list[dict[str, Any]],
    failures: list[dict[str, Any]],
    succeeded: int,
    started: float,
    write_error: outputs.OutputWriteError | None,
) -> None:
    """Fill in the end of the run; per-stage timings are the slowest process's."""
    generate_seconds = max(result["timings"]["generate"] for result in results)
    summary.update(
        status=status,
        finished_at=_now(),
        failures=failures,
        images_per_second=round(succeeded / generate_seconds, 4) if generate_seconds else None,
    )
    summary["jobs"].update(succeeded=succeeded, failed=len(failures))
    summary["timings"] = {
        "total": round(time.perf_counter() - started, 3),
        **{
            name: round(max(result["timings"][name] for result in results), 3)
            for name in results[0]["timings"]
        },
    }
    if write_error is not None:
        summary["error"] = write_error.one_line()


def _report_dry_run(reporter: Reporter, report: dict[str, Any], json_events: bool) -> None:
    if json_events:
        reporter.emit_json(**report)
        return
    lines = [
        f"dry run: {report['jobs']} jobs over {report['subjects']} subjects, {report['done']} already done, "
        f"{report['pending']} to generate → {report['out']}",
        *(f"  {size}: {count} images" for size, count in report["images_per_size"].items()),
        *(
            f"  {key}: steps per stage {counts[0]}/{counts[1]}/{counts[2]}"
            for key, counts in report["steps_per_stage"].items()
        ),
    ]
    print("\n".join(lines))
