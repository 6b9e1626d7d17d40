"""This process's place among the processes of a run: alone, or one of `accelerate launch`'s / torchrun's."""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn, TypeVar

from squeeze_cli.errors import OtherProcessError, SqueezeError
from squeeze_cli.logs import log_line

T = TypeVar("T")


@dataclass(frozen=True)
class ThreadChoice:
    """How many threads torch uses in this process, and why (`--threads`, `OMP_NUM_THREADS`, the cores)."""

    threads: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"threads": self.threads, "threads_from": self.reason}


def choose_threads(
    cores: int, load: float, environ: Mapping[str, str], processes: int = 1, requested: int | None = None
) -> ThreadChoice:
    """The torch thread count of one process: `requested` (`--threads`), else `OMP_NUM_THREADS`, else each
    of several local processes gets its share of the `cores`, and a lone process the cores the `load`
    (the 1-minute load average, other processes' work) leaves idle, at least one.

    torch's default, every core in every process, oversubscribes a busy machine: one `squeeze gen` on 2
    busy cores ran ×3.0–3.4 slower with 2 threads than with 1, ×49 at a load of 8–10 (BENCHMARKS.md, 17).
    """
    if requested is not None:
        return ThreadChoice(requested, "--threads")
    omp = environ.get("OMP_NUM_THREADS", "")
    if omp.isdecimal() and int(omp) > 0:
        return ThreadChoice(int(omp), "OMP_NUM_THREADS")
    local = environ.get("LOCAL_WORLD_SIZE", "")
    local_processes = int(local) if local.isdecimal() and int(local) > 0 else processes
    if local_processes > 1:
        return ThreadChoice(max(1, cores // local_processes), f"{cores} cores, {local_processes} processes")
    idle = round(cores - load)
    return ThreadChoice(max(1, min(cores, idle)), f"{cores} cores, load {load:.1f}")


def usable_cores() -> int:
    """The cores this process may run on (its affinity: a container's or taskset's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def load_average() -> float:
    """The 1-minute load average; 0 where the platform has none (Windows)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


# How often a worker looks whether its launcher is still there.
LAUNCHER_CHECK_SECONDS = 1.0


def exit_with_launcher(environ: Mapping[str, str]) -> bool:
    """Under `accelerate launch` or torchrun (`WORLD_SIZE` > 1), end this process when its launcher dies.

    torchrun starts each worker in a session of its own, so a SIGKILL of the launcher (or of its process
    group) does not reach the workers: they would go on alone, holding the output folder's lock. A thread
    watches the parent process instead (portable, unlike Linux's parent-death signal, which also fires
    when the launcher's spawning *thread* ends) and ends this process at once: as with kill -9, what is
    finished is kept and the same command resumes. Returns whether it watches.
    """
    launcher = os.getppid()
    world_size = environ.get("WORLD_SIZE", "1")
    # One process (WORLD_SIZE unset or 1) has no launcher to outlive: under `nohup` its parent may go.
    if not world_size.isdecimal() or int(world_size) < 2 or launcher <= 1:
        return False

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(LAUNCHER_CHECK_SECONDS)
        log_line(
            f"error: the launcher of this process (pid {launcher}) is gone: stopping "
            "(hint: run the same command again: finished images are kept and skipped)"
        )
        os._exit(1)

    threading.Thread(target=watch, name="squeeze-launcher-watch", daemon=True).start()
    return True


def one_process_launch_warning(environ: Mapping[str, str]) -> str | None:
    """The warning for `accelerate launch --num_processes N` without `--multi_gpu` (or `--use_cpu` with
    mpirun): accelerate then starts one plain process, which sets `MASTER_ADDR` for the N it was asked for
    but no `WORLD_SIZE`, so the run would quietly use one process."""
    launched_by_accelerate = "ACCELERATE_MIXED_PRECISION" in environ
    if launched_by_accelerate and "MASTER_ADDR" in environ and "WORLD_SIZE" not in environ:
        return (
            "accelerate launch started 1 process, not --num_processes: add --multi_gpu "
            "(accelerate launch --multi_gpu --num_processes N -m squeeze_cli ...), also on a CPU machine"
        )
    return None


def end_process_group() -> bool:
    """Leave torch.distributed's process group, if this process joined one, before the interpreter exits;
    returns whether it had joined one. Imports nothing: a command that never loaded torch.distributed has
    nothing to end."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()
        return True
    return False


def exit_without_teardown(code: int) -> NoReturn:
    """End a process that was in a process group: Python's exit handlers run and the output is flushed,
    then the process ends with `code`, skipping the interpreter's teardown.

    There, what torch.distributed leaves behind can abort the process ("terminate called without an
    active exception", SIGABRT, no Python frame left) after `destroy_process_group` returned and all its
    work was done: 5 of 36 two-process evals on a busy 2-core machine, none of 40 since. The launcher
    then counts the run as failed (exit 1) and stops the other processes with SIGTERM, wherever they are.
    """
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: as Python's own exit, status 120
            code = code or 120
    os._exit(code)


def this_machine() -> str:
    """Where a pid names a process: the host's name and this process's pid namespace (two containers of one
    host, such as pods on the host's network, share the name, not the pids). Recorded with a pid."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")  # `pid:[4026531836]`; Linux only
    except OSError:
        return socket.gethostname()
    return f"{socket.gethostname()} {namespace}"


def process_alive(pid: Any, machine: Any, started_at: Any = None) -> bool | None:
    """Whether process `pid`, recorded on `machine` (`this_machine()`) by a run that started at `started_at`
    (ISO 8601), still runs; None when that cannot be told from here (another machine, an older record
    without one)."""
    if machine != this_machine() or not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 2**31:
        return None
    try:
        os.kill(pid, 0)  # signal 0: only whether it exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    except OSError:
        return None
    # A pid is reused once the machine has made enough processes: one started after the run is not the run.
    return not _started_after(pid, started_at)


def _started_after(pid: int, when: Any) -> bool:
    """Whether process `pid` started after the time `when` (ISO 8601); False when that cannot be told (no
    `/proc`, no time)."""
    try:
        since = datetime.fromisoformat(when).timestamp()
        with open(f"/proc/{pid}/stat", "rb") as file:  # the fields after `(comm)`; starttime is the 22nd
            ticks = int(file.read().rsplit(b")", 1)[1].split()[19])
        with open("/proc/stat", "rb") as file:
            boot = next(int(line.split()[1]) for line in file if line.startswith(b"btime "))
    except (TypeError, ValueError, OverflowError, IndexError, StopIteration, OSError):
        return False
    # Both clocks are in whole seconds (`started_at` is taken after the process started): a margin.
    return boot + ticks / os.sysconf("SC_CLK_TCK") > since + 2


def accelerate_cpu() -> bool:
    """accelerate's `cpu` argument: True for several processes on a machine without CUDA. Without it,
    accelerate runs `accelerate launch --multi_gpu` there as that many lone processes, each its own main
    process (imports torch)."""
    import torch

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def _all_gather(value: Any, count: int) -> list[Any]:
    import torch.distributed as dist

    gathered: list[Any] = [None] * count
    dist.all_gather_object(gathered, value)
    return gathered


def together(check: Callable[[], T], index: int, count: int) -> T:
    """Run `check` in each of the `count` processes (`index` is this one), then wait for the others (a
    barrier): when a process's check raised a `SqueezeError` (a refusal that only the main process may
    meet: a lock), every process raises it, the first by index as it is and the others as an
    `OtherProcessError` with its exit code, which they do not print again. Without this, the processes
    that passed would wait at their next barrier for one that has gone, until the launcher ends them."""
    if count == 1:
        return check()
    result, error = None, None
    try:
        result = check()
    except SqueezeError as caught:
        error = caught
    errors = _all_gather(error, count)
    first = next((i for i, other in enumerate(errors) if other is not None), None)
    if first is not None and threading.current_thread() is threading.main_thread():
        # Every process ends now. The launcher sends SIGTERM to those left once one has exited with an
        # error: it must not replace their exit code (-15 in its summary of the failed processes).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if first == index and error is not None:
        raise error  # its own, with its cause: the gathered one is a copy (all_gather_object pickles)
    if first is not None:
        raise OtherProcessError(errors[first]) from None
    return result  # type: ignore[return-value]  # `check` returned


class Processes:
    """This process's place among the processes of the run: one, or one of `accelerate launch`'s."""

    def __init__(self) -> None:
        self.state = None
        self.index, self.count = 0, 1
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            self.state = PartialState(cpu=accelerate_cpu())
            self.index, self.count = self.state.process_index, self.state.num_processes
            self.set_threads()

    def set_threads(self, requested: int | None = None) -> ThreadChoice:
        """Give torch the thread count `choose_threads` picks for this process (imports torch)."""
        import torch

        choice = choose_threads(usable_cores(), load_average(), os.environ, self.count, requested)
        torch.set_num_threads(choice.threads)
        return choice

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

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """The main process runs the block first (filling caches the others then read), then the others."""
        if self.state is None:
            yield
        else:
            with self.state.main_process_first():
                yield

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def gather(self, value: Any) -> list[Any]:
        if self.state is None:
            return [value]
        return _all_gather(value, self.count)

    def scatter(self, values: list[Any] | None) -> Any:
        """Process `i` gets `values[i]`, the main process's list (the others pass None): each receives only
        its own share, where `gather` would send every share to every process."""
        if self.state is None:
            return None if values is None else values[0]
        import torch.distributed as dist

        received: list[Any] = [None]
        dist.scatter_object_list(received, values if self.is_main else None, src=0)
        return received[0]
