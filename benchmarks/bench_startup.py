"""Cold start of the CLI against a bare `python -c pass`: `squeeze --help`, `squeeze validate` (the demo
manifest, and one whose references are WebP and TIFF), `squeeze status` of a finished demo run and a
cached `squeeze eval --metrics tiny --no-report` of it (every score already in its cache).

    python benchmarks/bench_startup.py [--runs 10]

Each command runs as a fresh process. A warm-up round first, then `--runs` rounds, the order rotating
each round so machine noise hits all alike; it prints the median and min–max of the wall time and of the
child's CPU time (user + system, far less disturbed by other jobs on a shared machine), and the excess
over the bare interpreter, taken round by round. The status run folder is made once first by
`squeeze gen` (the tiny model, ~10 s) and scored once by `squeeze eval` (its cache filled).

squeeze's bytecode is compiled first, as `pip install` does: in a fresh clone with PYTHONDONTWRITEBYTECODE
set, every start would otherwise compile squeeze's own modules again (~50 ms more). None of these commands
imports torch, diffusers or transformers (tests/test_architecture.py and
tests/test_eval.py::test_a_cached_eval_and_status_import_no_model_library check `sys.modules`).
"""

from __future__ import annotations

import argparse
import compileall
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples/demo.yaml"

WEBP_TIFF_MANIFEST = """\
version: 1
recipe: tiny
output: {dir: out}
subjects:
  - name: dog
    class: dog
    references: [dog-0.webp, dog-1.tiff]
    prompts:
      - a {class} in the snow
"""


EVAL_FLAGS = ["--metrics", "tiny", "--no-report"]


def make_inputs(folder: Path) -> tuple[Path, Path]:
    """A finished demo run (for `status`) and a manifest with WebP and TIFF references."""
    run = folder / "demo-run"
    squeeze = [sys.executable, "-m", "squeeze_cli"]
    subprocess.run([*squeeze, "gen", str(DEMO), "--out", str(run), "--quiet"], check=True)
    subprocess.run([*squeeze, "eval", str(run), *EVAL_FLAGS], check=True, stdout=subprocess.DEVNULL)
    for index, suffix in enumerate(("webp", "tiff")):
        with Image.open(ROOT / f"examples/images/dog/0{2 * index}.jpg") as image:
            image.save(folder / f"dog-{index}.{suffix}")
    manifest = folder / "webp-tiff.yaml"
    manifest.write_text(WEBP_TIFF_MANIFEST)
    return run, manifest


def run_once(command: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of one run of `command`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    compileall.compile_dir(ROOT / "squeeze_cli", quiet=1)
    print(f"load average {os.getloadavg()}")
    with tempfile.TemporaryDirectory(prefix="squeeze-startup-") as tmp:
        run, webp_tiff = make_inputs(Path(tmp))
        squeeze = [sys.executable, "-m", "squeeze_cli"]
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "squeeze --help": [*squeeze, "--help"],
            "squeeze validate demo": [*squeeze, "validate", str(DEMO)],
            "squeeze validate webp/tiff": [*squeeze, "validate", str(webp_tiff)],
            "squeeze status demo run": [*squeeze, "status", str(run)],
            "squeeze eval, cached": [*squeeze, "eval", str(run), *EVAL_FLAGS],
        }
        names = list(commands)
        wall: dict[str, list[float]] = {name: [] for name in names}
        cpu: dict[str, list[float]] = {name: [] for name in names}
        for round_index in range(args.runs + 1):  # round 0 is the warm-up
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                seconds, cpu_seconds = run_once(commands[name])
                if round_index:
                    wall[name].append(seconds * 1000)
                    cpu[name].append(cpu_seconds * 1000)
    print(f"{args.runs} rounds; ms, median (min-max); over: minus python -c pass in the same round")
    for name in names[1:]:
        print(f"{name:<28} wall {summary(wall[name])}, over {summary(per_round_excess(wall, name))}")
        print(f"{'':<28} cpu  {summary(cpu[name])}, over {summary(per_round_excess(cpu, name))}")
    print(f"{names[0]:<28} wall {summary(wall[names[0]])}; cpu {summary(cpu[names[0]])}")
    print(f"load average {os.getloadavg()}")


def per_round_excess(samples: dict[str, list[float]], name: str) -> list[float]:
    return [value - bare for value, bare in zip(samples[name], samples["python -c pass"], strict=True)]


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


if __name__ == "__main__":
    main()
