"""`squeeze export` at scale: time and peak memory of exporting N finished images, per format.

    python benchmarks/bench_export.py [--images 100000] [--formats imagefolder ...] [--work DIR]

Writes a run of N finished images in the real layout (10 subjects, 10 seeds a prompt, the tiny recipe; a
PNG of 8×8 pixels and the real sidecar record each, as `bench_resume.py` does, without fsync; its
`manifest.resolved.yaml` and a `metrics.jsonl` with a score per image, as `squeeze eval` writes it), then
times, as fresh processes (peak RSS from the kernel): `squeeze export RUN -o DIR --format F --where
'dino >= 0'` into a new folder, then the same again (a rerun with nothing new: the cost of reading the run
alone). The images are tiny, so the time is squeeze's own work, not copying bytes. `--work DIR` keeps the
run between invocations.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench_plan import write_manifest  # benchmarks/: the script's own folder is on sys.path
from bench_resume import timed_process, write_finished

from squeeze_cli import outputs
from squeeze_cli.manifest.resolve import load_manifest
from squeeze_cli.outputs import records
from squeeze_cli.plan import plan_jobs


@contextlib.contextmanager
def unsynced_writes() -> Iterator[None]:
    """`save_image` writing the same bytes without its atomic, fsynced writes: setting up 100,000 images
    takes minutes instead of most of an hour on a loaded machine. The set-up only, never the timed export."""

    def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(data)
        return Path(path)

    def write_json(path: str | os.PathLike, obj: Any) -> Path:
        return write_bytes(path, (outputs.strict_json_dumps(obj, indent=2) + "\n").encode())

    saved = records.atomic_write_bytes, records.atomic_write_json
    records.atomic_write_bytes, records.atomic_write_json = write_bytes, write_json
    try:
        yield
    finally:
        records.atomic_write_bytes, records.atomic_write_json = saved


def write_run(work: Path, images: int) -> Path:
    """A finished run of `images` images in `work/run` (kept when it is already there)."""
    run = work / "run"
    if (run / outputs.METRICS_JSONL_NAME).is_file():
        return run
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    manifest = write_manifest(work, images, subjects=10, seeds_per_prompt=10)
    started = time.perf_counter()
    with unsynced_writes():
        write_finished(manifest, run)
    loaded = load_manifest(manifest)
    outputs.write_resolved_manifest(run, loaded.resolved_yaml())
    jobs = plan_jobs(loaded, model_identity=loaded.model_identity, max_jobs=loaded.max_jobs)
    scores = ({"job_id": job.job_id, "dino": (job.index % 100) / 100, "clip_t": 0.3} for job in jobs)
    lines = (json.dumps(score) + "\n" for score in scores)
    (run / outputs.METRICS_JSONL_NAME).write_text("".join(lines))
    print(f"wrote {len(jobs)} finished images in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--formats", nargs="+", default=["imagefolder", "parquet", "webdataset"])
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-export-"))
    run = write_run(work, args.images)
    squeeze = [sys.executable, "-m", "squeeze_cli", "export", str(run)]
    results = {}
    for export_format in args.formats:
        folder = work / f"export-{export_format}"
        shutil.rmtree(folder, ignore_errors=True)
        command = [*squeeze, "-o", str(folder), "--format", export_format, "--where", "dino >= 0"]
        first = timed_process(command)
        again = timed_process(command)
        results[export_format] = {
            "export_s": round(first[0], 1),
            "export_peak_rss_mib": round(first[1]),
            "rerun_s": round(again[0], 1),
            "rerun_peak_rss_mib": round(again[1]),
        }
        print(export_format, results[export_format], file=sys.stderr)
        shutil.rmtree(folder)
    print(json.dumps({"images": args.images, "results": results}, indent=2))
    if args.work is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
