"""The one timing rule the benchmarks share: a warm-up call, then the median of `repeats` calls."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up: first calls pay for lazy imports, allocator growth and caches
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)
