"""This process's place among the processes of a run: alone, or one of `accelerate launch`'s / torchrun's."""

from __future__ import annotations

import os
from typing import Any


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
            # Each process its share of the cores (torch's default is all of them in every process, which
            # oversubscribes), on CPU and for CPU work beside a GPU; a user's OMP_NUM_THREADS wins.
            if not os.environ.get("OMP_NUM_THREADS"):
                local = int(os.environ.get("LOCAL_WORLD_SIZE", self.count))
                cores = (
                    len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
                )
                torch.set_num_threads(max(1, cores // max(1, local)))

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
