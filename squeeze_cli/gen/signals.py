"""SIGINT/SIGTERM during a run, or a closed stdout or stderr (taken as SIGPIPE): stop at once before
anything is written, after the current batch afterwards."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

from squeeze_cli import logs
from squeeze_cli.errors import EXIT_SIGINT, EXIT_SIGPIPE, EXIT_SIGTERM
from squeeze_cli.logs import log_line


class StopNow(BaseException):
    """Raised by the signal handler to stop at once. A BaseException, like KeyboardInterrupt, so that no
    `except Exception` on the way (model loading wraps its errors) can swallow it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class StopSignal:
    """SIGINT/SIGTERM handling for the whole run.

    Until `graceful` is set (planning, locking, loading the model: nothing written yet) a signal stops at
    once. From then on the first one asks the run to stop after the current batch and still write its
    summary; a second one stops at once (atomic writes clean up their temporary file on the way out).

    A stdout or stderr whose reader is gone (`squeeze gen ... | head -1`) stops the run as a signal does,
    as SIGPIPE (which Python ignores: the write fails instead), but never at once after `graceful`.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        # The signal a StopNow was raised for: a library may lose it (an import it cut short, then failing
        # another way), and the run is stopped by that signal all the same.
        self.raised: int | None = None
        self.graceful = False
        self.notify: Callable[[str], None] | None = None  # told the signal's name on the first signal
        self._previous: dict[int, Any] = {}
        self._previous_closed_stream_handler: Callable[[], None] | None = None

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
            self._previous_closed_stream_handler = logs.closed_stream_handler
            logs.closed_stream_handler = self._stream_closed
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            # One set meanwhile stays: `processes.together` ignores SIGTERM once every process is ending.
            if signal.getsignal(signum) == self._handle:
                signal.signal(signum, handler)
        if self._previous:
            logs.closed_stream_handler = self._previous_closed_stream_handler

    def start_graceful(self) -> None:
        """From now on a first signal stops the run after the current batch. A signal that was to stop it
        at once before, but that a library lost on the way (it caught the StopNow and went on loading),
        stops it now: nothing is written yet."""
        if self.raised is not None:
            raise StopNow(self.raised)
        self.graceful = True

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.graceful or self.signum is not None:
            self.raised = signum
            raise StopNow(signum)
        self.signum = signum
        if self.notify is not None:  # the reporter writes above its bars instead of over them
            self.notify(signal.Signals(signum).name)
        else:
            log_line("stopping after the current batch (signal again to stop now)")

    def _stream_closed(self) -> None:
        """A line to stdout or stderr found its reader gone (`logs.write_line` pointed it at os.devnull).
        Unlike a second signal it never stops at once: a closed pipe says nothing about urgency."""
        if not self.graceful:
            self.raised = signal.SIGPIPE
            raise StopNow(signal.SIGPIPE)
        if self.signum is None:
            self.signum = signal.SIGPIPE


def exit_code(signum: int) -> int:
    codes: dict[int, int] = {signal.SIGINT: EXIT_SIGINT, signal.SIGPIPE: EXIT_SIGPIPE}
    return codes.get(signum, EXIT_SIGTERM)
