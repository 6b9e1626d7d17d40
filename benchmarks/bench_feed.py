"""How long `squeeze validate` takes on a product feed of 10,000 rows (`subjects_from`), as a user runs it.

    python benchmarks/bench_feed.py [--rows 10000] [--scenes 10] [--runs 5] [--format csv|jsonl|parquet]

Writes a feed in a temporary folder (one small JPEG per row, as a shop's export points at one photo per
product; `color` and `title` columns used by the scenes), then runs `squeeze validate` in a fresh process
`--runs` times (imports, the feed read, every reference's header checked, every row's prompts, the plan
hashed) and prints the median and min–max wall and CPU time, with the load average. No model is involved.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image


def write_feed(folder: Path, rows: int, scenes: int, format: str) -> Path:
    photos = folder / "photos"
    photos.mkdir()
    records = []
    for row in range(rows):
        Image.new("RGB", (32, 32), (row % 256, row // 256 % 256, 90)).save(photos / f"{row:05d}.jpg")
        records.append(
            {
                "sku": f"SKU-{row:05d}",
                "category": ("mug", "teapot", "vase", "lamp")[row % 4],
                "color": ("white", "sage green", "black")[row % 3],
                "title": f"Product number {row}",
                "images": f"photos/{row:05d}.jpg",
            }
        )
    feed = folder / f"products.{format}"
    if format == "csv":
        with feed.open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    elif format == "jsonl":
        feed.write_text("".join(json.dumps(record) + "\n" for record in records))
    else:
        import pyarrow
        from pyarrow import parquet

        parquet.write_table(pyarrow.Table.from_pylist(records), feed)
    scene_lines = "".join(f"    - a {{class}} in {{color}}, {{title}}, scene {s}\n" for s in range(scenes))
    manifest = folder / "catalog.yaml"
    manifest.write_text(
        "version: 1\nrecipe: tiny\ndefaults: {seeds: [0]}\n"
        f"subjects_from:\n  path: {feed.name}\n  name: sku\n  class: category\n  references: images\n"
        f"  scenes:\n{scene_lines}"
    )
    return manifest


def _children_cpu() -> float:
    """CPU seconds (user + system) of the finished child processes: what a loaded machine disturbs least."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--scenes", type=int, default=10)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--format", choices=("csv", "jsonl", "parquet"), default="csv")
    args = parser.parse_args()
    squeeze = [sys.executable, "-m", "squeeze_cli", "validate"]
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_feed(Path(tmp), args.rows, args.scenes, args.format)
        subprocess.run([*squeeze, str(manifest)], check=True, capture_output=True)  # warm-up: page cache
        times, cpu_times = [], []
        for _ in range(args.runs):
            start, cpu_start = time.perf_counter(), _children_cpu()
            result = subprocess.run([*squeeze, str(manifest)], capture_output=True, text=True)
            times.append(time.perf_counter() - start)
            cpu_times.append(_children_cpu() - cpu_start)
            if result.returncode != 0:
                sys.exit(result.stderr)
        jobs = next(line for line in result.stdout.splitlines() if line.startswith("jobs"))
    print(
        f"{args.rows:,} rows x {args.scenes} scenes ({args.format}), {jobs.split()[1]} jobs: validate "
        f"{statistics.median(times):.2f} s ({min(times):.2f}-{max(times):.2f}) wall, CPU "
        f"{statistics.median(cpu_times):.2f} s ({min(cpu_times):.2f}-{max(cpu_times):.2f}), over {args.runs} "
        f"runs; load average {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
