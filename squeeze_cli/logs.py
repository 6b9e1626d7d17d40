"""Lines for logs: off a terminal (cron, CI, a scheduler's log file) every progress line starts with a UTC
time stamp, and a progress bar becomes a few plain lines instead of carriage-return redraws.

`gen`'s reporter, `eval` and `train` all show progress through here, so the three can never disagree.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, TextIO

# Off a terminal a progress line is printed at most this often, plus the first and the last.
PLAIN_INTERVAL_SECONDS = 30.0


def utc_stamp() -> str:
    """``2026-12-07T07:29:06Z``: ISO 8601, UTC, to the second."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def counted(count: int, noun: str) -> str:
    """``1 subject``, ``2 subjects``, ``1,000 jobs`` (`noun` singular, made plural with an `s`)."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def stamped(text: str) -> str:
    """`text` with a UTC time stamp before each of its lines."""
    stamp = utc_stamp()
    return "\n".join(f"{stamp} {line}" for line in text.split("\n"))


def is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def log_line(text: str, stream: TextIO | None = None) -> None:
    """Print `text`: as it is on a terminal, time-stamped off one."""
    stream = stream or sys.stderr
    write_line(text if is_terminal(stream) else stamped(text), stream)


# Told when a line's stream has lost its reader, while a run wants to stop then (gen's `StopSignal`).
closed_stream_handler: Callable[[], None] | None = None


def write_line(text: str, stream: TextIO) -> None:
    """`text` and a newline, flushed. A stream whose reader is gone (`squeeze gen ... | head -1`) is
    pointed at os.devnull and `closed_stream_handler` told, when a run set one: the run stops as if by
    SIGPIPE. Else the BrokenPipeError goes on to `squeeze`'s `main`, which exits 141."""
    try:
        print(text, file=stream, flush=True)
    except BrokenPipeError:
        if closed_stream_handler is None:
            raise
        to_devnull(stream)
        closed_stream_handler()


def closed_streams() -> list[TextIO]:
    """`sys.stdout` and `sys.stderr` where their reader is gone: the write end of a pipe or a socket with
    no reader polls POLLERR (a file or a terminal never does)."""
    import select

    closed = []
    for stream in (sys.stdout, sys.stderr):
        try:
            fd = stream.fileno()
        except (OSError, ValueError):  # not a file (a test's StringIO)
            continue
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        if any(events & select.POLLERR for _, events in poller.poll(0)):
            closed.append(stream)
    return closed


def to_devnull(stream: TextIO) -> None:
    """Point a stream whose reader is gone at os.devnull: what is still written to it, the interpreter's
    own flush at exit included, goes nowhere instead of failing again (the advice of Python's `signal`
    documentation, "Note on SIGPIPE")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, stream.fileno())
    finally:
        os.close(devnull)


class PlainProgress:
    """The part of tqdm's interface squeeze uses (`update`, `set_postfix`, `close`), printed off a terminal
    as time-stamped lines: the first step, the last, and at most one every `PLAIN_INTERVAL_SECONDS`."""

    def __init__(self, total: int, desc: str, unit: str, stream: TextIO, initial: int = 0):
        self.total, self.desc, self.unit, self.stream = total, desc, unit, stream
        self.n = initial
        self.started_at = initial
        self.started = time.monotonic()
        self.last_line = self.started
        self.postfix = ""
        self.closed = False

    def set_postfix(self, refresh: bool = True, **fields: Any) -> None:
        self.postfix = ", ".join(f"{key}={value}" for key, value in fields.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        first = self.n - n == self.started_at
        if first or self.n >= self.total or now - self.last_line >= PLAIN_INTERVAL_SECONDS:
            self.last_line = now
            self._line()

    def close(self) -> None:
        self.closed = True

    def _line(self) -> None:
        elapsed = time.monotonic() - self.started
        rate = (self.n - self.started_at) / elapsed if elapsed > 0 else 0.0
        eta = max(self.total - self.n, 0) / rate if rate > 0 else float("nan")
        line = f"{self.desc} [{self.n}/{self.total}] {rate:.2f} {self.unit}/s, ETA {eta:.0f}s"
        log_line(line + (f", {self.postfix}" if self.postfix else ""), self.stream)


class NoProgress:
    """Nothing shown (`--no-progress`, `--json`, processes other than the main one)."""

    def set_postfix(self, refresh: bool = True, **fields: Any) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(
    total: int,
    desc: str,
    *,
    unit: str = "it",
    enabled: bool = True,
    initial: int = 0,
    leave: bool = True,
    stream: TextIO | None = None,
) -> Any:
    """A tqdm bar on a terminal, `PlainProgress` lines off one, `NoProgress` when not `enabled`."""
    stream = stream or sys.stderr
    if not enabled:
        return NoProgress()
    if not is_terminal(stream):
        return PlainProgress(total, desc, unit, stream, initial=initial)
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, desc=desc, unit=unit, leave=leave, file=stream, dynamic_ncols=True
    )
