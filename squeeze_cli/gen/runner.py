"""`squeeze gen`: load the pipeline once, walk the jobs subject by subject, batch, write, resume.

Data flows one way: the planned jobs come in, the pipeline makes pixels, `outputs` writes every file.
With several processes (`accelerate launch` / `torchrun`) each takes a balanced share of the pending jobs;
the main process alone writes the run-level files (the run index, the summary, grids).

A run has four phases (`GenRun`): prepare (lock, resume scan, load, checks: nothing written), open (the
first writes), execute (each process's `Worker`, gen/worker.py, makes its images), finalize (index, grids,
summary).
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from squeeze_cli import outputs
from squeeze_cli.errors import (
    EXIT_JOBS_FAILED,
    EXIT_OK,
    EXIT_SIGINT,
    EXIT_SIGPIPE,
    EXIT_SIGTERM,
    ManifestError,
    OtherProcessError,
    Problem,
    SqueezeError,
)
from squeeze_cli.gen.lock import DirectoryLock, LayoutLock, OutputInUseError
from squeeze_cli.gen.progress import Reporter
from squeeze_cli.gen.signals import StopNow, StopSignal, exit_code
from squeeze_cli.gen.summary import describe_plan, finish_summary, now, report_dry_run, starting_summary
from squeeze_cli.gen.worker import GenOptions, Worker
from squeeze_cli.logs import log_line
from squeeze_cli.manifest import LoadedManifest
from squeeze_cli.manifest.loaded import RESOLVED_FINGERPRINT_PREFIX
from squeeze_cli.manifest.reference_facts import REFERENCE_CACHE_NAME
from squeeze_cli.pipelines.registry import pipeline_spec
from squeeze_cli.plan import Job, plan_jobs, select_jobs, shard_jobs
from squeeze_cli.processes import Processes, together
from squeeze_cli.reading import open_regular_file


def run_gen(
    manifest: LoadedManifest, options: GenOptions, *, json_events: bool = False, quiet: bool = False
) -> int:
    """Run `squeeze gen` for a loaded manifest; returns the exit code.

    SIGINT/SIGTERM: before anything is written the run stops at once; afterwards it stops after the
    current batch, writes its summary (status `interrupted`) and returns 130/143; a second signal stops at
    once. A stdout or stderr whose reader is gone (`| head -1`) stops it the same way, as SIGPIPE (141).
    A file that cannot be written (disk full, permission denied) stops the run: what finished is kept,
    the summary says `failed` when it can still be written, and `OutputWriteError` is raised.
    """
    stop = StopSignal()
    try:
        with stop:
            planned = plan_jobs(manifest, model_identity=manifest.model_identity, max_jobs=manifest.max_jobs)
            jobs = select_jobs(planned, options.only, options.limit)
            jobs = jobs if options.shard is None else shard_jobs(jobs, *options.shard)
            out_dir = outputs.real_folder(
                options.out or manifest.output_dir, "point it at a folder, or choose another --out"
            )
            if options.dry_run:
                return _dry_run(
                    manifest, options, jobs, planned, out_dir, json_events=json_events, quiet=quiet
                )
            run = GenRun(
                manifest,
                options,
                jobs,
                out_dir,
                stop,
                json_events=json_events,
                quiet=quiet,
                view_jobs=planned,
            )
            try:
                run.prepare()
                run.open()
                run.execute()
                return run.finalize()
            finally:
                run.release()
    except BaseException as error:
        signum = error.signum if isinstance(error, StopNow) else stop.raised
        if signum is None:
            raise
        name = signal.Signals(signum).name
        if stop.graceful:
            again = shlex.join(options.command) if options.command else "the same command"
            note = f"finished images are kept and the run summary was not updated; to resume, run {again}"
        else:
            note = "nothing was generated"
        log_line(f"stopped at once by {name}: {note}")
        return exit_code(signum)


def run_recipes(
    runs: Sequence[tuple[str, LoadedManifest]],
    options: GenOptions,
    *,
    json_events: bool = False,
    quiet: bool = False,
) -> int:
    """`squeeze gen --recipe A,B,C`: each recipe's run in turn, each into its own folder (its manifest's
    output folder), so one model is loaded at a time.

    A run that stops with an error (its model does not load, a file cannot be written) is reported and the
    next recipe runs: every image made is kept, and running the command again resumes each folder. Returns
    0 when every recipe finished every job, 130/143/141 at once when a signal (or a closed pipe) stopped
    one, else 1.
    """
    from dataclasses import replace

    results: dict[str, int] = {}
    for name, manifest in runs:
        if json_events:
            Reporter.emit_json("recipe", recipe=name, out=str(manifest.output_dir))
        elif not quiet:
            log_line(f"recipe {name}: {manifest.output_dir}")
        try:
            code = run_gen(
                manifest, replace(options, out=manifest.output_dir), json_events=json_events, quiet=quiet
            )
        except OtherProcessError as error:  # said by the process that met it
            code = error.exit_code
        except SqueezeError as error:
            if json_events:
                Reporter.emit_json("error", recipe=name, message=error.one_line())
            log_line(f"error: recipe {name}: {error.one_line()}")
            code = error.exit_code
        if code in (EXIT_SIGINT, EXIT_SIGTERM, EXIT_SIGPIPE):
            return code
        results[name] = code
    failed = [name for name, code in results.items() if code != EXIT_OK]
    if json_events:
        Reporter.emit_json("recipes", results=results)
    elif not quiet or failed:
        log_line(
            f"recipes: {len(results) - len(failed)} of {len(results)} finished every job"
            + (f"; not: {', '.join(failed)}" if failed else "")
        )
    return EXIT_JOBS_FAILED if failed else EXIT_OK


def _dry_run(
    manifest: LoadedManifest,
    options: GenOptions,
    jobs: list[Job],
    planned: list[Job],
    out_dir: Path,
    *,
    json_events: bool,
    quiet: bool,
) -> int:
    """Report what a run would do: counts, sizes, steps per stage, the stale images `--prune` would move
    (those of jobs not in the whole plan `planned`); loads and writes nothing."""
    reporter = Reporter(Reporter.choose_mode(json_events=json_events, quiet=quiet), shard=options.shard)
    resume = not options.overwrite and out_dir.is_dir()
    done = outputs.finished_job_ids(out_dir, jobs, verify=options.verify) if resume else set()
    plan = describe_plan(jobs, done, staged=pipeline_spec(manifest.model.pipeline_class).staged)
    stale = len(outputs.find_stale(out_dir, planned)) if out_dir.is_dir() else 0
    report = {"event": "dry_run", "out": str(out_dir), **plan, "stale": stale}
    report_dry_run(reporter, report, json_events)
    return EXIT_OK


class GenRun:
    """One `squeeze gen` over planned `jobs`, from the lock to the run summary."""

    def __init__(
        self,
        manifest: LoadedManifest,
        options: GenOptions,
        jobs: list[Job],
        out_dir: Path,
        stop: StopSignal,
        *,
        json_events: bool,
        quiet: bool,
        view_jobs: list[Job] | None = None,
    ):
        self.manifest, self.options, self.jobs, self.out_dir, self.stop = (
            manifest,
            options,
            jobs,
            out_dir,
            stop,
        )
        self.started_at, self.started = now(), time.perf_counter()
        # A shard's run index and summary live in its own folder, so shards can share one output directory.
        self.run_dir = outputs.run_dir(out_dir, options.shard)
        self.processes = Processes()
        self.is_main = self.processes.is_main
        self.reporter = Reporter(
            Reporter.choose_mode(json_events=json_events, quiet=quiet),
            enabled=self.is_main,
            shard=options.shard,
        )
        stop.notify = self.reporter.interrupted
        self.lock = DirectoryLock(self.run_dir) if self.is_main else None
        # Runs of one --shard layout share OUT; any other run on it is refused (gen/lock.py).
        self.layout_lock = LayoutLock(out_dir, options.shard) if self.is_main else None
        # The views show the whole plan: with --shard (or a slice), every shard's images. A shard draws only
        # the views of the prompts it holds (their grids and contact-sheet pages), so the shard that
        # finishes a prompt's images last leaves its views complete, and `status --merge` draws every view.
        self.view_jobs = jobs if view_jobs is None or not options.part_of_the_plan else view_jobs
        self.view_prompts = (
            None if self.view_jobs is jobs else {(job.subject, job.prompt_index) for job in jobs}
        )
        self.write_error: outputs.OutputWriteError | None = None

    def prepare(self) -> None:
        """Lock, find the finished jobs, load the model and check every instruction: nothing is written, so
        bad input leaves no trace; an output folder that exists is locked first, to refuse a second run
        early."""
        # With several processes, a refusal that only the main process can meet (the locks: another run
        # holds the folder) ends every process (`processes.together`), none left waiting for it at the next
        # collective until the launcher ends it.
        place = (self.processes.index, self.processes.count)
        together(self._check_and_lock, *place)
        # One read of the sidecars serves the skip decision, the moves and the index repair: finished work
        # is found by job id, wherever it sits in its subject's directory.
        resume = not self.options.overwrite and self.out_dir.is_dir()
        self.done = (
            outputs.find_finished(self.out_dir, self.jobs, verify=self.options.verify) if resume else {}
        )
        self.pending = [job for job in self.jobs if job.job_id not in self.done]
        self.mine = shard_jobs(self.pending, self.processes.index, self.processes.count)
        self.worker = Worker(
            self.manifest, self.options, self.reporter, self.out_dir, self.run_dir, self.processes
        )
        if self.pending:  # a rerun with every image done imports no model library at all
            # The main process builds what goes into the cache: another rank's transformers writes no weights.
            with self.processes.main_first():
                self.worker.build_tiny_models()
        # A process without jobs loads nothing: it must not wait at the gather for one whose load failed.
        found = self.processes.gather(together(self._load_and_check, *place))
        problems = [problem for process_problems in found for problem in process_problems]
        if problems:
            raise ManifestError(problems)

    def _check_and_lock(self) -> None:
        """A file, a link or a FIFO in the way is reported now, before the model loads (and before the
        locks, whose files it checks too); then the main process locks an output folder that exists."""
        output = self.manifest.document.output
        outputs.check_output_tree(
            self.out_dir, self.run_dir, self.jobs, output.variants, views_dir=output.views_dir
        )
        if self.lock is not None and self.run_dir.is_dir():
            self.lock.acquire()
        if self.layout_lock is not None and self.out_dir.is_dir():
            self.layout_lock.acquire()

    def _load_and_check(self) -> list[Problem]:
        """Load the model where there are jobs (a process without any loads nothing) and check their
        instructions: this process's problems."""
        if self.mine:
            self.worker.load()
        return self.worker.check_instructions(self.mine)

    def open(self) -> None:
        """The first writes: from here on a signal lets the current batch finish and the summary be
        written. The main process writes them; a refusal there ends every process (`processes.together`,
        which is the processes' barrier too): the others wait for those writes before they make images."""
        self.summary = starting_summary(
            command=self.options.command,
            shard=self.options.shard,
            out_dir=str(self.out_dir),
            model_record=self.worker.model_record,
            timing_names=list(self.worker.timings),
            num_processes=self.processes.count,
            planned=len(self.jobs),
            skipped=len(self.done),
            started_at=self.started_at,
        )
        self.stop.start_graceful()
        together(self._open_run, self.processes.index, self.processes.count)

    def _open_run(self) -> None:
        """The main process's first writes (the others' part is to wait): the locks of a new folder, the
        moves of stale and finished images, the run files."""
        if self.is_main:
            assert self.lock is not None and self.layout_lock is not None  # the main process's (__init__)
            outputs.ensure_dir(self.out_dir)
            new_folder = not self.lock.held  # none at `prepare`: another run may have begun in it since
            if not self.lock.held:
                self.lock.acquire()
            if not self.layout_lock.held:
                self.layout_lock.acquire()
            if new_folder:
                self._find_finished_again()
            # Stale images (jobs the plan does not have) leave the names this run needs (all with --prune);
            # then finished images of prompts that moved take their new position's name, before anything runs.
            self.summary["stale"] = self._move_stale()
            self.done = outputs.move_to_positions(self.out_dir, self.jobs, self.done)
            outputs.record_stamps(self.out_dir, self.jobs, self.done)  # found by hash: not read next time
            _open_run_files(
                self.out_dir,
                self.run_dir,
                self.manifest,
                self.jobs,
                self.done,
                self.pending,
                self.summary,
                self.options.shard,
                keep_job_ids={job.job_id for job in self.view_jobs} if self.options.prune else None,
            )

    def _find_finished_again(self) -> None:
        """The resume scan again, now that the lock is held: a run started on the same new folder while this
        one loaded may have made images since `prepare` found none (they would all be made twice). A
        shard's first run scans twice too (its folder is new): once per shard, cheap beside the load."""
        if self.options.overwrite:
            return
        found = outputs.find_finished(self.out_dir, self.jobs, verify=self.options.verify)
        if found.keys() <= self.done.keys():
            return
        if self.processes.count > 1:  # the other processes split the pending jobs at `prepare`
            raise OutputInUseError(
                f"another squeeze gen made images in {self.out_dir} while this one was loading",
                "run the same command again: it resumes, and makes only what is missing",
            )
        self.done = found
        self.pending = [job for job in self.jobs if job.job_id not in found]
        self.mine = self.pending
        self.summary["jobs"]["skipped"] = len(found)

    def _move_stale(self) -> dict[str, Any]:
        """Move the stale images in the way of this run's names (every stale image and view with
        `--prune`) to `OUT/.stale/<UTC time>/`; returns `run.json`'s `stale`: how many were moved, where,
        and how many are left."""
        # Stale is judged against the whole plan: another shard's images are not stale.
        stale = outputs.find_stale(self.out_dir, self.view_jobs, self.done)
        moving = stale if self.options.prune else outputs.in_the_way(stale, self.jobs)
        views_dir = self.manifest.document.output.views_dir
        views = (
            outputs.find_stale_views(self.out_dir, self.view_jobs, views_dir) if self.options.prune else []
        )
        when = outputs.stale_folder_name()
        moved = outputs.move_stale(self.out_dir, moving, views, folder=when)
        if self.options.prune:
            # The main process, before its other processes start (`together`); a concurrent run into OUT is
            # only a shard of this layout (the layout lock), which writes into the plan's subjects only.
            outputs.remove_emptied_folders(self.out_dir, {job.subject for job in self.view_jobs}, views_dir)
        moved_images = {name for name in moved if name.endswith(".png")}
        moved_count = sum(image.image in moved_images for image in moving)
        return {
            "moved": moved_count,
            "moved_to": f"{outputs.STALE_DIR_NAME}/{when}" if moved else None,
            "left": len(stale) - moved_count,
        }

    def execute(self) -> None:
        self.reporter.run_started(
            len(self.pending),
            out=str(self.out_dir),
            processes=self.processes.count,
            skipped=len(self.done),
            **self.worker.threads.to_dict() if self.worker.threads is not None else {},
        )
        try:
            self.worker.run(self.mine, self.stop)
        except outputs.OutputWriteError as error:
            if self.processes.count > 1:
                raise  # the launcher stops the other processes; every finished image is kept
            self.write_error = error  # a full disk fails every job after it: stop, record what we can

    def finalize(self) -> int:
        """Gather every process's outcome; the main process brings the index and the views up to date and
        writes the summary. Returns the exit code."""
        self.processes.barrier()
        stopped = self.processes.gather(self.stop.signum)
        results = self.processes.gather(
            {
                "succeeded": self.worker.succeeded,
                "failures": self.worker.failures,
                "timings": self.worker.timings,
                "step_cache": self.worker.step_cache,
            }
        )
        if not self.is_main:
            self._make_variants({}, stopped)  # this process's share of the main process's images
            self._draw_views(None)  # this process's share of the main process's list
            return EXIT_OK
        # Every process's images are on disk now, under their positions' names (moves came first).
        finished = {**self.done, **outputs.find_finished(self.out_dir, self.pending, anywhere=False)}
        failures = [failure for result in results for failure in result["failures"]]
        generated = {job_id for result in results for job_id in result["succeeded"]}
        try:
            finished, stopped = self._make_variants(finished, stopped)
            variants = self.summary["variants"]
            # Else `open` left the index agreeing with the images: no second pass, unless variants of images
            # finished before this run changed their lines.
            if self.pending or (variants is not None and variants["made"]):
                _merge_index(
                    self.run_dir,
                    self.jobs,
                    finished,
                    self.pending,
                    failures,
                    already_appended=self.worker.failures,
                )
            quality = self.manifest.document.quality
            self.summary["quality"] = None  # no identity gate: said, not left out (eval reads gated runs)
            if quality is not None:
                from squeeze_cli.gen.gate import quality_summary

                self.summary["quality"] = quality_summary([f.entry for f in finished.values()], quality)
        except outputs.OutputWriteError as error:
            self.write_error = self.write_error or error
        try:
            # Grids are a view, redrawn by the next run when out of date: a stopped or failed run skips them.
            drawable = self.write_error is None and self.stop.signum is None and not any(stopped)
            self._draw_views(finished if drawable else None)
        except outputs.OutputWriteError as error:
            self.write_error = self.write_error or error

        signum = next((s for s in [self.stop.signum, *stopped] if s is not None), None)
        if self.write_error is not None:
            status = "failed"
        elif signum is not None:
            status = "interrupted"
        else:
            status = "completed_with_failures" if failures else "completed"
        finish_summary(
            self.summary, status, results, failures, len(generated), self.started, self.write_error
        )
        try:
            outputs.write_run_summary(self.run_dir, self.summary)
        except outputs.OutputWriteError as error:
            if self.write_error is None:
                raise
            raise outputs.OutputWriteError(
                f"{self.write_error.message}; {outputs.RUN_SUMMARY_NAME} could not be updated either",
                self.write_error.hint,
                path=self.write_error.path,
                errno=self.write_error.errno,
            ) from error
        finally:
            self.reporter.run_finished(self.summary)
        if self.write_error is not None:
            raise self.write_error
        if signum is not None:
            return exit_code(signum)
        return EXIT_JOBS_FAILED if failures else EXIT_OK

    def _make_variants(
        self, finished: dict[str, outputs.Finished], stopped: list[int | None]
    ) -> tuple[dict[str, outputs.Finished], list[int | None]]:
        """The channel variants (`output.variants`) of this run's finished images that are missing or of
        another spec. Every process calls this and makes those of its share of the main process's
        `finished` (the others pass `{}`): made by one process alone, a catalog's first run's hundreds of
        thousands of files would keep the others waiting in a collective past torch.distributed's timeout.
        A stopped run leaves them to the next.

        Returns, on the main process, `finished` with the new index lines and `stopped` with the signals
        that came meanwhile; on the others `({}, stopped)`.

        Raises:
            `OutputWriteError` (main process only): the first process's, once every process is done; the
            others send theirs to the main process instead, so that none is left waiting in a collective.
        """
        output = self.manifest.document.output
        count = self.processes.count
        if self.is_main:  # run.json: how many files each process made (none when stopped before)
            self.summary["variants"] = {"made": 0, "by_process": [0] * count} if output.variants else None
        # Alike on every process (`stopped` was gathered): all of them reach the collectives below, or none.
        if not output.variants or any(stopped):
            return finished, stopped
        shares = None
        if self.is_main:
            shares = [finished] if count == 1 else variant_shares(self.jobs, finished, count)
        mine: dict[str, outputs.Finished] = self.processes.scatter(shares)
        result, made, error = mine, 0, None
        if self.stop.signum is None and self.write_error is None:
            try:
                result, made = outputs.make_variants(
                    self.out_dir,
                    self.jobs if count == 1 else [job for job in self.jobs if job.job_id in mine],
                    mine,
                    output.variants,
                    output.metadata,
                    should_stop=lambda: self.stop.signum is not None,
                    verify=self.options.verify,
                )
            except outputs.OutputWriteError as write_error:
                if count == 1:
                    raise
                error = write_error  # raised by the main process, after this gather
        # Only the index lines that changed go back to the main process (`make_variants` makes new ones).
        changed = result if count == 1 else {k: v for k, v in result.items() if v is not mine[k]}
        reports = self.processes.gather((changed, made, error, self.stop.signum))
        if not self.is_main:
            return {}, stopped
        counts = [report[1] for report in reports]
        self.summary["variants"] = {"made": sum(counts), "by_process": counts}
        first_error = next((report[2] for report in reports if report[2] is not None), None)
        if first_error is not None:
            raise first_error
        if count == 1:
            finished = changed
        else:
            finished = {**finished}
            for report in reports:
                finished.update(report[0])
        if sum(counts):
            names = ", ".join(v.name for v in output.variants)
            by_process = f", by process: {', '.join(map(str, counts))}" if count > 1 else ""
            self.reporter.status(f"variants: {sum(counts)} files made ({names}){by_process}")
        return finished, [*stopped, *(report[3] for report in reports)]

    def _draw_views(self, finished: dict[str, Any] | None) -> None:
        """Grids and contact sheets, from the images on disk: of the whole plan, or a shard's prompts (from
        every shard's images, one shard at a time, so the shard that finishes a prompt last leaves its views
        complete). Every process
        calls this: the main process finds the stale views under the layout lock (none when `finished` is
        None) and each process draws its share; a process alone draws with a pool when there is much."""
        output = self.manifest.document.output
        should_stop = lambda: self.stop.signum is not None  # noqa: E731
        # Only the main process has the layout lock (`__init__`): it plans the views, when given `finished`.
        layout_lock = self.layout_lock if self.is_main and finished is not None else None
        with layout_lock.drawing_views() if layout_lock is not None else contextlib.nullcontext():
            work: list[outputs.PageViews] = []
            failure: outputs.OutputWriteError | None = None
            if layout_lock is not None and finished is not None:
                try:
                    if self.view_prompts is not None:  # other shards' images: read inside the lock
                        shown = outputs.views_jobs(self.view_jobs, self.view_prompts)
                        finished = outputs.find_finished(self.out_dir, shown, anywhere=False)
                    work = outputs.plan_views(
                        self.out_dir,
                        self.view_jobs,
                        finished,
                        grids=output.grids,
                        contact_sheets=output.contact_sheet,
                        prompts=self.view_prompts,
                        views_dir=output.views_dir,
                    )
                except outputs.OutputWriteError as error:
                    failure = error  # raised once the other processes have their (empty) list and are done
                except outputs.UnsafeOutputPathError as error:
                    failure = self._views_write_error(error)
            work = self.processes.gather(work)[0]
            try:
                views = outputs.views_root(self.out_dir, output.views_dir)
                if self.processes.count == 1:
                    outputs.draw_views(views, work, should_stop)
                else:
                    try:
                        mine = outputs.share_views(work, self.processes.index, self.processes.count)
                        outputs.draw_views(views, mine, should_stop, workers=1)  # no pool per process
                    finally:  # the lock is held until every process has drawn its share
                        self.processes.barrier()
            except outputs.UnsafeOutputPathError as error:
                raise failure or self._views_write_error(error) from error
            if failure is not None:
                raise failure

    def _views_write_error(self, error: outputs.UnsafeOutputPathError) -> outputs.OutputWriteError:
        """A views path refused after the images are made (`check_output_tree` passed it: the views folder
        was replaced by a link since) is a failed write, so `run.json` is finished and the exit code is 1:
        exit 2 says nothing was generated."""
        views_dir = self.manifest.document.output.views_dir
        folder = self.out_dir / views_dir if views_dir else self.out_dir
        return outputs.OutputWriteError(error.message, error.hint, path=folder)

    def release(self) -> None:
        if self.layout_lock is not None:
            self.layout_lock.release()
        if self.lock is not None:
            self.lock.release()


def variant_shares(
    jobs: Sequence[Job], finished: Mapping[str, outputs.Finished], count: int
) -> list[dict[str, outputs.Finished]]:
    """`finished` (of `jobs`, in plan order) cut into `count` shares, one per process, as `shard_jobs` cuts
    a plan: contiguous runs of about equal cost (a variant's cost follows its master's size), whole subjects
    where it can. An image's files (its variants and its sidecar) are in one share: no two processes write
    one file."""
    done = [job for job in jobs if job.job_id in finished]
    return [{job.job_id: finished[job.job_id] for job in shard_jobs(done, i, count)} for i in range(count)]


def _open_run_files(
    out_dir: Path,
    run_dir: Path,
    manifest: LoadedManifest,
    jobs: Sequence[Job],
    done: dict[str, outputs.Finished],
    pending: Sequence[Job],
    summary: dict[str, Any],
    shard: tuple[int, int] | None = None,
    keep_job_ids: set[str] | None = None,
) -> None:
    """The main process's writes before any image: clean up after killed runs, make the index agree with
    the finished images, and record the resolved manifest and the starting summary."""
    outputs.remove_stale_temp_files(out_dir)
    if run_dir != out_dir:
        outputs.remove_stale_temp_files(run_dir)
    outputs.repair_index(
        run_dir,
        {job_id: found.entry for job_id, found in done.items()},
        pending_job_ids=[job.job_id for job in pending],
        planned_images=outputs.planned_images(jobs),
        keep_job_ids=keep_job_ids,
    )
    if _recorded_fingerprint(run_dir) != manifest.resolved_fingerprint(shard):
        outputs.write_resolved_manifest(run_dir, manifest.resolved_yaml(shard))
    if shard is None:  # shards, perhaps on several machines at once, only read it
        _save_reference_facts(out_dir, manifest)
    outputs.write_run_summary(run_dir, summary)


def _save_reference_facts(out_dir: Path, manifest: LoadedManifest) -> None:
    """Keep the references' checks and digests for the next run (`ReferenceFacts`): a cache, so a failed
    write costs the next run time, not this one its images."""
    facts = manifest.reference_facts
    if not facts.changed:
        return
    try:
        outputs.atomic_write_text(out_dir / REFERENCE_CACHE_NAME, facts.cache_json())
    except outputs.OutputWriteError as error:
        log_line(f"warning: {error.one_line()} (the reference photos will be read again next run)")


def _recorded_fingerprint(run_dir: Path) -> str | None:
    """The fingerprint in the header of the run's `manifest.resolved.yaml`, or None (none there, or not a
    regular file: then it is written again)."""
    try:
        with open_regular_file(outputs.resolved_manifest_path(run_dir), follow_symlinks=False) as file:
            head = file.read(4096).decode("utf-8", errors="replace")
    except OSError:
        return None
    for line in head.splitlines()[:4]:
        if line.startswith(RESOLVED_FINGERPRINT_PREFIX):
            return line[len(RESOLVED_FINGERPRINT_PREFIX) :].strip()
    return None


def _merge_index(
    run_dir: Path,
    jobs: Sequence[Job],
    finished: dict[str, outputs.Finished],
    pending: Sequence[Job],
    failures: list[dict[str, Any]],
    already_appended: list[dict[str, Any]],
) -> None:
    """Bring the other processes' images (from their sidecars) and failures into the main index."""
    outputs.repair_index(
        run_dir,
        {job_id: found.entry for job_id, found in finished.items()},
        planned_images=outputs.planned_images(jobs),
    )
    by_id = {job.job_id: job for job in pending}
    for failure in failures:
        if failure not in already_appended:
            outputs.append_index(
                run_dir, outputs.failed_index_entry(by_id[failure["job_id"]], failure["error"])
            )
