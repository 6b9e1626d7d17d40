"""This process's place among the processes of a run: alone, or one of `accelerate launch`'s / torchrun's."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from squeeze_cli.logs import log_line


def threads_per_process(environ: Mapping[str, str], num_processes: int) -> int | None:
    """Each of several processes gets its share of the cores (torch's default is all of them in every
    process, which oversubscribes), on CPU and for CPU work beside a GPU; None when the user set
    `OMP_NUM_THREADS` (theirs wins)."""
    if environ.get("OMP_NUM_THREADS"):
        return None
    local = int(environ.get("LOCAL_WORLD_SIZE", num_processes))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, local))


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


def end_process_group() -> None:
    """Leave torch.distributed's process group, if this process joined one, before the interpreter exits.

    Left to the interpreter's exit, the gloo backend's threads can abort the process ("terminate called
    without an active exception", exit -6) after all its work is done. Imports nothing: a command that
    never loaded torch.distributed has nothing to end.
    """
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


class Processes:
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
            threads = threads_per_process(os.environ, self.count)
            if threads is not None:
                torch.set_num_threads(threads)

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
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.count
        dist.all_gather_object(gathered, value)
        return gathered
