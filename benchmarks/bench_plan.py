"""How long loading and planning a 100,000-job manifest takes, and how much memory it needs.

    python benchmarks/bench_plan.py [--jobs 100000] [--subjects 10] [--runs 5]

Builds a manifest in a temporary folder (tiny PNG references, prompts x `seeds: {count: N}`), then times
`load_manifest` and `plan_jobs` separately and prints the median of several runs and the peak Python
memory of one run (tracemalloc). No model is involved: this is the cost `squeeze validate` and every
rank of `squeeze gen` pay before the first image.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from squeeze_cli.manifest.resolve import load_manifest
from squeeze_cli.plan import plan_jobs, shard_jobs


def write_manifest(
    folder: Path, jobs: int, subjects: int, seeds_per_prompt: int, reference_kb: int | None = None
) -> Path:
    """A manifest of `jobs` jobs over `subjects` subjects with three reference images each: tiny PNGs, or
    with `reference_kb` JPEG photos of about that size (three photos hard-linked into every subject's
    folder, so 10,000 subjects cost three photos of disk; every path is a reference of its own)."""
    prompts_per_subject = max(1, jobs // (subjects * seeds_per_prompt))
    photos = write_photos(folder / "photos", reference_kb) if reference_kb else []
    entries = []
    for s in range(subjects):
        image_dir = folder / f"subject{s}"
        image_dir.mkdir()
        for r in range(3):
            if photos:
                os.link(photos[r], image_dir / f"{r}.jpg")
            else:
                Image.new("RGB", (32, 32), (s * 7 % 256, r * 50, 0)).save(image_dir / f"{r}.png")
        entries.append(
            {
                "name": f"subject{s}",
                "class": "thing",
                "references": [f"subject{s}/*.{'jpg' if photos else 'png'}"],
                "prompts": [f"a {{class}} number {p} in scene {s}" for p in range(prompts_per_subject)],
            }
        )
    manifest = {
        "version": 1,
        "recipe": "tiny",
        "max_jobs": jobs,
        "defaults": {"seeds": {"count": seeds_per_prompt, "base": 0}},
        "subjects": entries,
    }
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


def write_photos(folder: Path, kilobytes: int) -> list[Path]:
    """Three JPEG photos of about `kilobytes` each: noise over a gradient compresses like a photo."""
    folder.mkdir(parents=True)
    side = int((kilobytes * 1024 / 0.28) ** 0.5)  # ~0.28 bytes per pixel at quality 90 for this content
    y, x = np.mgrid[0:side, 0:side]
    paths = []
    for number in range(3):
        noise = np.random.default_rng(number).integers(0, 24, (side, side, 3))
        pixels = (np.stack([x % 256, y % 256, (x + y) % 256], -1) + noise).clip(0, 255).astype("uint8")
        path = folder / f"photo{number}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--subjects", type=int, default=10)
    parser.add_argument("--seeds-per-prompt", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = write_manifest(Path(tmp), args.jobs, args.subjects, args.seeds_per_prompt)
        load_times, plan_times, shard_times = [], [], []
        for _ in range(args.runs):
            start = time.perf_counter()
            manifest = load_manifest(path)
            loaded = time.perf_counter()
            jobs = plan_jobs(manifest, model_identity=manifest.model_identity, max_jobs=manifest.max_jobs)
            planned = time.perf_counter()
            shard_jobs(jobs, 3, 8)
            load_times.append(loaded - start)
            plan_times.append(planned - loaded)
            shard_times.append(time.perf_counter() - planned)

        tracemalloc.start()
        manifest = load_manifest(path)
        jobs = plan_jobs(manifest, model_identity=manifest.model_identity, max_jobs=manifest.max_jobs)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()

    print(
        f"jobs planned      {len(jobs):,} "
        f"({args.subjects} subjects, {args.seeds_per_prompt} seeds per prompt)"
    )
    print(f"load_manifest     median {statistics.median(load_times):.3f} s over {args.runs} runs")
    print(f"plan_jobs         median {statistics.median(plan_times):.3f} s")
    print(f"shard_jobs (1/8)  median {statistics.median(shard_times):.3f} s")
    totals = [a + b for a, b in zip(load_times, plan_times, strict=True)]
    print(f"total             median {statistics.median(totals):.3f} s")
    print(f"peak memory       {peak / 2**20:.1f} MiB (tracemalloc, load + plan)")


if __name__ == "__main__":
    main()
