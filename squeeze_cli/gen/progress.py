"""How a run shows where it is: tqdm bars on a terminal, sparse lines off one, JSON events for scripts.

Every event the runner emits goes through one `Reporter`, so the three modes can never disagree.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

# Off a terminal (cron, CI) a progress line is printed at most this often, plus the first and last.
PLAIN_INTERVAL_SECONDS = 30.0


def _job_fields(job: Any) -> dict[str, Any]:
    return {"job_id": job.job_id, "subject": job.subject, "prompt_index": job.prompt_index, "seed": job.seed}


class Reporter:
    """Receives run events and shows them in the chosen mode.

    Args:
        mode: `tty` (tqdm bars), `plain` (a line on stderr now and then), `json` (one event per line on
            stdout), or `quiet` (errors only).
        enabled: False on every process but the main one, so a multi-process run prints once.
    """

    def __init__(self, mode: str, enabled: bool = True, stream: TextIO | None = None):
        self.mode = mode if enabled else "quiet"
        self.stream = stream or sys.stderr
        self.total = 0
        self.done = 0
        self.failed = 0
        self.started = time.monotonic()
        self._last_line = 0.0
        self._bar = None
        self._step_bar = None

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
            self.emit_json("warning", message=text)
        else:
            self._write(f"warning: {text}")

    def run_started(self, total: int, **info: Any) -> None:
        self.total = total
        self.started = time.monotonic()
        if self.mode == "json":
            self.emit_json("run_started", jobs=total, **info)
        elif self.mode == "tty":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc="images", unit="img", file=self.stream, dynamic_ncols=True)

    def batch_started(self, jobs: list[Any], num_steps: int) -> None:
        if self.mode == "json":
            for job in jobs:
                self.emit_json("job_started", **_job_fields(job))
        elif self.mode == "tty":
            from tqdm.auto import tqdm

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
            self.emit_json("job_finished", **_job_fields(job), image=image, seconds=round(seconds, 3))
        self._advance()

    def job_failed(self, job: Any, error: str) -> None:
        self.failed += 1
        if self.mode == "json":
            self.emit_json("job_failed", **_job_fields(job), error=error)
        elif self.mode != "quiet":
            self._write(f"failed: {job.subject} prompt {job.prompt_index} seed {job.seed}: {error}")
        self._advance()

    def batch_finished(self) -> None:
        if self._step_bar is not None:
            self._step_bar.close()
            self._step_bar = None

    def run_finished(self, summary: dict[str, Any]) -> None:
        self.batch_finished()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.mode == "json":
            self.emit_json("run_summary", **summary)
        elif self.mode in ("tty", "plain"):
            jobs = summary["jobs"]
            self._write(
                f"{summary['status']}: {jobs['succeeded']} generated, {jobs['skipped']} already done, "
                f"{jobs['failed']} failed, in {summary['timings']['total']:.1f}s → {summary['out']}"
            )
            if quality := summary.get("quality"):  # the identity gate (squeeze_cli/eval/gate.py)
                self._write(
                    f"quality: {quality['gated']} images gated (DINO >= {quality['min_dino']:g}), "
                    f"{quality['regenerated']} remade, {quality['still_failing']} still below"
                )

    # Output ----------------------------------------------------------------------------------------------

    def _advance(self) -> None:
        if self._bar is not None:
            self._bar.update(1)
            if self.failed:
                self._bar.set_postfix(failed=self.failed)
        elif self.mode == "plain":
            now = time.monotonic()
            finished = self.done + self.failed
            if finished in (1, self.total) or now - self._last_line >= PLAIN_INTERVAL_SECONDS:
                self._last_line = now
                elapsed = now - self.started
                rate = finished / elapsed if elapsed > 0 else 0.0
                eta = (self.total - finished) / rate if rate > 0 else float("nan")
                self._write(
                    f"[{finished}/{self.total}] {self.failed} failed, {rate:.2f} img/s, ETA {eta:.0f}s"
                )

    def _write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    @staticmethod
    def emit_json(event: str, **fields: Any) -> None:
        print(
            json.dumps({"event": event, **fields}, ensure_ascii=False, default=str),
            file=sys.stdout,
            flush=True,
        )
