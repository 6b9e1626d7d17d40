"""Cold start of the CLI: `squeeze --help` and `squeeze validate` against a bare `python -c pass`.

    python benchmarks/bench_startup.py [--runs 10]

Runs each command as a fresh process, interleaved (so machine noise hits all alike), and prints medians
and the difference to the bare interpreter. Neither command may import torch, diffusers or transformers.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "squeeze --help": [sys.executable, "-m", "squeeze_cli", "--help"],
    "squeeze validate demo": [
        sys.executable,
        "-m",
        "squeeze_cli",
        "validate",
        str(ROOT / "examples/demo.yaml"),
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.runs):
        for name, command in COMMANDS.items():
            started = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - started)
    base = statistics.median(times["python -c pass"])
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"{name:<24} {median * 1000:7.1f} ms   (+{(median - base) * 1000:.1f} ms over python -c pass)")


if __name__ == "__main__":
    main()
