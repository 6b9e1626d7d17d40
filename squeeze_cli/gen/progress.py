"""How a run shows where it is: tqdm bars on a terminal, sparse lines off one, JSON events for scripts.

Every event the runner emits goes through one `Reporter`, so the three modes can never disagree.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

from squeeze_cli.logs import PLAIN_INTERVAL_SECONDS, stamped, write_line

if TYPE_CHECKING:
    from tqdm import tqdm

__all__ = ["PLAIN_INTERVAL_SECONDS", "Reporter", "plan_line"]


def plan_line(
    pending: int,
    skipped: int,
    processes: int = 1,
    out: str | None = None,
    threads: int | None = None,
    threads_from: str | None = None,
) -> str:
    """``120 jobs, 30 already done, 90 to generate, 1 thread (2 cores, load 7.6)``: what a run is about to
    do, printed before the bars."""
    total = pending + skipped
    line = f"{total:,} job{'' if total == 1 else 's'}, {skipped:,} already done, {pending:,} to generate"
    if processes > 1:
        line += f" by {processes} processes"
    if threads is not None:
        each = " each" if processes > 1 else ""
        line += f", {threads} thread{'' if threads == 1 else 's'}{each} ({threads_from})"
    return line + (f" → {out}" if out else "")


def _job_fields(job: Any) -> dict[str, Any]:
    return {"job_id": job.job_id, "subject": job.subject, "prompt_index": job.prompt_index, "seed": job.seed}


class Reporter:
    """Receives run events and shows them in the chosen mode.

    Args:
        mode: `tty` (tqdm bars), `plain` (a line on stderr now and then), `json` (one event per line on
            stdout), or `quiet` (errors only).
        enabled: False on every process but the main one, so a multi-process run prints once.
        shard: `(I, N)` for a `--shard I/N` run: every text line starts with `shard I/N: ` and every JSON
            event carries `"shard": [I, N]`, so the logs of a job array's tasks say whose they are.
    """

    def __init__(
        self,
        mode: str,
        enabled: bool = True,
        stream: TextIO | None = None,
        shard: tuple[int, int] | None = None,
    ):
        self.mode = mode if enabled else "quiet"
        self.shard = shard
        self.stream = stream or sys.stderr
        self.total = 0
        self.done = 0
        self.failed = 0
        self.started = time.monotonic()
        self._last_line = 0.0
        self._bar: tqdm[Any] | None = None
        self._step_bar: tqdm[Any] | None = None

    @staticmethod
    def choose_mode(*, json_events: bool, quiet: bool, stream: TextIO | None = None) -> str:
        if json_events:
            return "json"
        if quiet:
            return "quiet"
        return "tty" if (stream or sys.stderr).isatty() else "plain"

    # Events ----------------------------------------------------------------------------------------------

    def status(self, text: str) -> None:
        """What the run is busy with, for a person at a terminal (logs off a terminal stay terse)."""
        if self.mode == "tty":
            self._write(text)

    def warning(self, text: str) -> None:
        if self.mode == "json":
            self._event("warning", message=text)
        else:
            self._write(f"warning: {text}")

    def run_started(self, total: int, **info: Any) -> None:
        self.total = total
        self.started = time.monotonic()
        if self.mode == "json":
            self._event("run_started", jobs=total, **info)
            return
        if self.mode in ("tty", "plain"):  # the plan, before any bar
            shown = {key: info[key] for key in ("processes", "out", "threads", "threads_from") if key in info}
            self._write(plan_line(total, info.get("skipped", 0), **shown))
        if self.mode == "tty":
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total, desc=f"{self._prefix}images", unit="img", file=self.stream, dynamic_ncols=True
            )

    def batch_started(self, jobs: list[Any], num_steps: int) -> None:
        if self.mode == "json":
            for job in jobs:
                self._event("job_started", **_job_fields(job))
        elif self.mode == "tty":
            from tqdm.auto import tqdm

            if self._bar is not None:  # which subject is being drawn, and how many jobs failed so far
                self._bar.set_postfix(self._postfix(jobs[0].subject), refresh=True)
            self._step_bar = tqdm(
                total=num_steps,
                desc="  steps",
                unit="step",
                leave=False,
                file=self.stream,
                dynamic_ncols=True,
            )

    def step(self) -> None:
        if self._step_bar is not None:
            self._step_bar.update(1)

    def job_finished(self, job: Any, image: str, seconds: float) -> None:
        self.done += 1
        if self.mode == "json":
            self._event("job_finished", **_job_fields(job), image=image, seconds=round(seconds, 3))
        self._advance(job.subject)

    def job_failed(self, job: Any, error: str) -> None:
        self.failed += 1
        if self.mode == "json":
            self._event("job_failed", **_job_fields(job), error=error)
        elif self.mode != "quiet":
            self._write(f"failed: {job.subject} prompt {job.prompt_index} seed {job.seed}: {error}")
        self._advance(job.subject)

    def batch_finished(self) -> None:
        if self._step_bar is not None:
            self._step_bar.close()
            self._step_bar = None

    def interrupted(self, signal_name: str) -> None:
        """The first Ctrl-C: said above the bars (tqdm.write), never over them."""
        self._write(f"{signal_name}: stopping after the current batch (signal again to stop now)")

    def run_finished(self, summary: dict[str, Any]) -> None:
        """The last progress line (all processes' images counted), then the summary: a JSON event, or the
        one-line text summary on stdout (logs and bars stay on stderr, so `> summary.txt` keeps it)."""
        self.batch_finished()
        jobs = summary["jobs"]
        finished = jobs["succeeded"] + jobs["failed"]
        if self._bar is not None:
            self._bar.n = finished  # other processes' images too: the bar ends at the run's total
            if jobs["failed"]:
                self._bar.set_postfix(failed=jobs["failed"], refresh=False)
            self._bar.refresh()
            self._bar.close()
            self._bar = None
        elif self.mode == "plain" and finished != self.done + self.failed:
            self.done, self.failed = jobs["succeeded"], jobs["failed"]
            self._progress_line()
        if self.mode == "json":
            self._event("run_summary", **summary)
        elif self.mode in ("tty", "plain"):
            self._result(
                f"{summary['status']}: {jobs['succeeded']} generated, "
                f"{jobs['skipped']} already done, {jobs['failed']} failed, "
                f"in {summary['timings']['total']:.1f}s → {summary['out']}"
            )
            if quality := summary.get("quality"):  # the identity gate (squeeze_cli/gen/gate.py)
                self._result(
                    f"quality: {quality['gated']} images gated "
                    f"(DINO >= {quality['min_dino']:g}), {quality['regenerated']} remade, "
                    f"{quality['still_failing']} still below"
                )
            stale = summary.get("stale") or {}
            if stale.get("moved"):
                self._write(f"moved {stale['moved']} stale images to {stale['moved_to']}")
            if stale.get("left"):
                self._write(
                    f"stale: {stale['left']} images in {summary['out']} are of jobs this manifest does not "
                    "plan (`squeeze status OUT` lists them; `--prune` moves them to OUT/.stale/)"
                )
            if summary["status"] in ("interrupted", "failed") and summary.get("command"):
                self._write(f"to resume, run the same command again: {shlex.join(summary['command'])}")

    # Output ----------------------------------------------------------------------------------------------

    def _postfix(self, subject: str | None) -> dict[str, Any]:
        postfix: dict[str, Any] = {"subject": subject} if subject else {}
        return {**postfix, "failed": self.failed} if self.failed else postfix

    def _advance(self, subject: str | None = None) -> None:
        if self._bar is not None:
            self._bar.set_postfix(self._postfix(subject), refresh=False)
            self._bar.update(1)
        elif self.mode == "plain":
            now = time.monotonic()
            finished = self.done + self.failed
            if finished in (1, self.total) or now - self._last_line >= PLAIN_INTERVAL_SECONDS:
                self._last_line = now
                self._progress_line()

    def _progress_line(self) -> None:
        finished = self.done + self.failed
        elapsed = time.monotonic() - self.started
        rate = finished / elapsed if elapsed > 0 else 0.0
        eta = max(self.total - finished, 0) / rate if rate > 0 else float("nan")
        self._write(f"[{finished}/{self.total}] {self.failed} failed, {rate:.2f} img/s, ETA {eta:.0f}s")

    @property
    def _prefix(self) -> str:
        return f"shard {self.shard[0]}/{self.shard[1]}: " if self.shard is not None else ""

    def _write(self, text: str) -> None:
        text = self._prefix + text
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:  # off a terminal (plain), every line starts with its UTC time
            write_line(stamped(text) if self.mode == "plain" else text, self.stream)

    def _result(self, text: str) -> None:
        """The run's outcome, on stdout (time-stamped off a terminal, as every log line)."""
        text = self._prefix + text
        write_line(stamped(text) if self.mode == "plain" else text, sys.stdout)

    def _event(self, event: str, **fields: Any) -> None:
        if self.shard is not None:
            fields = {"shard": list(self.shard), **fields}
        self.emit_json(event, **fields)

    @staticmethod
    def emit_json(event: str, **fields: Any) -> None:
        write_line(json.dumps({"event": event, **fields}, ensure_ascii=False, default=str), sys.stdout)
