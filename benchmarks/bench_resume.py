"""Planning and the resume scan at 1k / 10k / 100k jobs: time and peak memory, with finished images on disk.

    python benchmarks/bench_resume.py [--jobs 1000 10000 100000] [--finished 1000 10000] [--runs 3]
        [--subjects 10 --seeds-per-prompt 10] [--png-px 512 [--verify]] [--reference-kb 300] [--variants]

For each size N it writes a manifest (`--subjects` subjects, `seeds: {count: --seeds-per-prompt}`, tiny
recipe) and times, as fresh processes (median of `--runs`, peak RSS from the kernel):
  - `squeeze gen --dry-run` with no output yet: load + validate + plan;
and for each size in `--finished`, after writing N finished images in the real layout (a PNG and the
real sidecar record per job; 8×8 pixels, so the disk holds what resume reads):
  - `squeeze gen --dry-run`: plan + the scan of what is done;
  - `squeeze gen` (grids and contact sheets off) once, then timed: the whole start of a run whose every
    image exists (scan, index repair, summary), i.e. what a rerun of a finished job list costs;
  - with `--reference-kb`, the same rerun with the reference cache deleted before each run (every photo
    checked and hashed, as every rerun did before `.squeeze-references.json`);
  - with `--verify`, one `squeeze gen --verify`: the same rerun hashing every PNG (what every rerun did
    before the stat fast path).
With `--variants` the manifest has two channel variants (`output.variants`: a 64² JPEG, a 48² WebP) and
its folders are `n<N>-variants`; the first `squeeze gen` (timed apart) makes the variants of the
finished images (a no-op when an earlier run made them), so the timed reruns are the nightly no-op rerun
of a catalog with variants.
In this process it also times `plan_jobs` and `find_finished` alone with their Python peak (tracemalloc).

`--png-px 512` is the copying fixture: the finished images are one real PNG of 512² (~0.42 MB, a
gradient with noise, as hard to compress as a photo) hard-linked under every job's name (a new copy
every 50,000 links, ext4's limit is 65,000), each with its real sidecar: 100k images of 512² without
40 GB of disk. Links share an inode and an mtime, which the sidecars record as squeeze would.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from bench_plan import write_manifest  # benchmarks/: the script's own folder is on sys.path
from PIL import Image

from squeeze_cli import outputs
from squeeze_cli.manifest.reference_facts import REFERENCE_CACHE_NAME
from squeeze_cli.manifest.resolve import load_manifest
from squeeze_cli.outputs.layout import image_path, sidecar_path
from squeeze_cli.outputs.records import PNG_FILE_KEY, encode_png
from squeeze_cli.outputs.resume import png_file_facts
from squeeze_cli.pipelines.stages import stage_plan
from squeeze_cli.plan import plan_jobs


def timed_process(command: list[str]) -> tuple[float, float, float]:
    """(wall seconds, peak RSS in MiB, CPU seconds: user + system) of one fresh process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode not in (0, 1):
        raise RuntimeError(
            f"{' '.join(command)} exited {process.returncode}: {process.stderr.read()[-2000:]}"
        )
    process.stderr.close()
    return wall, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


# Hard links per copy of the fixture's PNG: under ext4's 65,000 links per file.
LINKS_PER_COPY = 50_000


def noisy_png(size_px: int, record: dict) -> bytes:
    """A PNG of `size_px`² that compresses like a photo (~0.42 MB at 512²), with `record` embedded."""
    import numpy as np

    y, x = np.mgrid[0:size_px, 0:size_px]
    base = np.stack([x // 2, y // 2, (x + y) // 4], -1) % 256
    noise = np.random.default_rng(0).integers(0, 12, (size_px, size_px, 3))
    pixels = (base + noise).clip(0, 255).astype("uint8")
    return encode_png(Image.fromarray(pixels), record)


def write_finished(manifest_path: Path, out: Path, png_px: int | None = None) -> int:
    """Every job of the manifest finished in `out`: as `squeeze gen` writes them (PNG, then sidecar), or
    with `png_px` by the copying fixture (one PNG of `png_px`² hard-linked, sidecars written unsynced)."""
    manifest = load_manifest(manifest_path)
    jobs = plan_jobs(manifest, model_identity=manifest.model_identity, max_jobs=manifest.max_jobs)
    model_info = manifest.model.model_dump(mode="json")
    versions = outputs.package_versions()
    image = Image.new("RGB", (8, 8), (120, 60, 30))
    plans = {}
    sources: list[Path] = []
    for number, job in enumerate(jobs):
        p = job.params
        key = (p.num_inference_steps, p.height, p.width, p.stage_thresholds)
        if key not in plans:
            plans[key] = stage_plan(*key).to_dict()
        record = outputs.image_record(
            job,
            preset_name="tiny",
            model_info=model_info,
            stage_plan=plans[key],
            timings={"total": 0.1, "batch": 0.1, "batch_size": 1},
            versions=versions,
        )
        record["process"] = 0
        if png_px is None:
            outputs.save_image(out, job, image, record)
            continue
        if number % LINKS_PER_COPY == 0:
            source = out.parent / f"fixture-{len(sources)}.png"
            source.write_bytes(noisy_png(png_px, record))
            sources.append(source)
            facts = png_file_facts(source)
        png = image_path(out, job)
        png.parent.mkdir(parents=True, exist_ok=True)
        os.link(sources[-1], png)
        sidecar = {**record, PNG_FILE_KEY: facts}
        sidecar_path(out, job).write_text(outputs.strict_json_dumps(sidecar, indent=2) + "\n")
    return len(jobs)


# Two channels, as a catalog's marketplace and social copies (`--variants`).
VARIANTS = [
    {"name": "market", "size": "64x64", "fit": "pad", "format": "jpeg"},
    {"name": "social", "size": "48x48", "fit": "crop", "format": "webp"},
]


def add_variants(manifest_path: Path) -> None:
    import yaml

    manifest = yaml.safe_load(manifest_path.read_text())
    manifest["output"] = {"variants": VARIANTS}
    manifest_path.write_text(yaml.safe_dump(manifest, sort_keys=False))


def median_process(command: list[str], runs: int) -> dict[str, float]:
    samples = [timed_process(command) for _ in range(runs)]
    walls, cpus = [w for w, _, _ in samples], [c for _, _, c in samples]
    return {
        "median_s": statistics.median(walls),
        "min_s": min(walls),
        "max_s": max(walls),
        # CPU time: what the command costs, which other jobs on a shared machine disturb far less.
        "cpu_median_s": statistics.median(cpus),
        "cpu_min_s": min(cpus),
        "cpu_max_s": max(cpus),
        "peak_rss_mib": max(m for _, m, _ in samples),
    }


def in_process(manifest_path: Path, out: Path | None) -> dict[str, float]:
    manifest = load_manifest(manifest_path)
    started = time.perf_counter()
    jobs = plan_jobs(manifest, model_identity=manifest.model_identity, max_jobs=manifest.max_jobs)
    planned = time.perf_counter()
    if out is not None:
        outputs.find_finished(out, jobs)
    scanned = time.perf_counter()
    tracemalloc.start()
    jobs = plan_jobs(manifest, model_identity=manifest.model_identity, max_jobs=manifest.max_jobs)
    plan_peak = tracemalloc.get_traced_memory()[1]
    if out is not None:
        tracemalloc.reset_peak()
        records = outputs.find_finished(out, jobs)
        scan_peak = tracemalloc.get_traced_memory()[1]
        del records
    tracemalloc.stop()
    result = {"plan_s": planned - started, "plan_peak_mib": plan_peak / 2**20}
    if out is not None:
        result.update(scan_s=scanned - planned, scan_peak_mib=scan_peak / 2**20)
    return result


def dump_seconds(manifest_path: Path) -> dict[str, float]:
    """`manifest.resolved.yaml` text with libyaml's dumper (what `squeeze gen` uses) and with pure Python."""
    import yaml

    manifest = load_manifest(manifest_path)
    started = time.perf_counter()
    fast = manifest.resolved_yaml()
    libyaml = time.perf_counter() - started
    dumper = yaml.__dict__.pop("CSafeDumper", None)
    try:
        started = time.perf_counter()
        pure = manifest.resolved_yaml()
        python = time.perf_counter() - started
    finally:
        if dumper is not None:
            yaml.CSafeDumper = dumper
    if fast != pure:
        raise RuntimeError("libyaml and pure-Python dumps of the resolved manifest differ")
    return {"libyaml_s": libyaml, "pure_python_s": python, "bytes": len(fast.encode())}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, nargs="*", default=[1000, 10000, 100000])
    parser.add_argument("--finished", type=int, nargs="*", default=[1000, 10000])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--subjects", type=int, default=10)
    parser.add_argument("--seeds-per-prompt", type=int, default=10)
    parser.add_argument(
        "--png-px", type=int, default=None, help="the copying fixture: finished PNGs of this size, linked"
    )
    parser.add_argument("--verify", action="store_true", help="also time one `gen --verify` rerun")
    parser.add_argument(
        "--reference-kb",
        type=int,
        default=None,
        help="references are JPEG photos of about this size (three per subject, hard-linked), and the "
        "rerun is also timed without the output folder's reference cache (every photo read, as before it)",
    )
    parser.add_argument(
        "--variants", action="store_true", help="two channel variants, made once before the timed reruns"
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="keep the manifests and finished folders here and reuse them on the next run (100k finished "
        "images take minutes to write); a temporary folder by default",
    )
    args = parser.parse_args()
    squeeze = [sys.executable, "-m", "squeeze_cli", "gen"]
    report: dict = {"planning": {}, "resume": {}, "load_average_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for n in sorted(set(args.jobs) | set(args.finished)):
            folder = work / (f"n{n}-variants" if args.variants else f"n{n}")
            reuse = (folder / "written").is_file()  # a complete earlier write
            if not reuse:
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True)
                write_manifest(
                    folder,
                    n,
                    subjects=args.subjects,
                    seeds_per_prompt=args.seeds_per_prompt,
                    reference_kb=args.reference_kb,
                )
            path = folder / "manifest.yaml"
            if args.variants and not reuse:
                add_variants(path)
            if n in args.jobs:
                row = median_process(
                    [*squeeze, str(path), "--dry-run", "--out", str(folder / "none")], args.runs
                )
                row.update(in_process(path, None))
                row["resolved_yaml"] = dump_seconds(path)
                report["planning"][n] = row
                print(
                    f"{n:>7} jobs, nothing done: dry run {row['median_s']:.2f} s ({row['min_s']:.2f}–"
                    f"{row['max_s']:.2f}), peak RSS {row['peak_rss_mib']:.0f} MiB; plan_jobs "
                    f"{row['plan_s']:.3f} s, Python peak {row['plan_peak_mib']:.1f} MiB; resolved YAML "
                    f"{row['resolved_yaml']['libyaml_s']:.3f} s with libyaml, "
                    f"{row['resolved_yaml']['pure_python_s']:.3f} s pure Python",
                    flush=True,
                )
            if n in args.finished:
                out = folder / "out"
                started = time.perf_counter()
                if reuse:
                    written = int((folder / "written").read_text())
                else:
                    written = write_finished(path, out, args.png_px)
                    (folder / "written").write_text(str(written))
                setup = time.perf_counter() - started
                # Grids off: drawing them is another measurement (bench_gen / the grid benchmarks).
                views_off = ["--set", "output.grids=false", "--set", "output.contact_sheet=false"]
                # The first run on the fixture writes the resolved manifest, the reference cache and (with
                # `--variants`) the variants: a rerun of the same plan writes none of them.
                first_wall, first_rss, first_cpu = timed_process(
                    [*squeeze, str(path), "--out", str(out), "--quiet", *views_off]
                )
                print(
                    f"{n:>7} jobs, the first run on the fixture: {first_wall:.2f} s, CPU {first_cpu:.2f} s, "
                    f"{first_rss:.0f} MiB",
                    flush=True,
                )
                dry = median_process([*squeeze, str(path), "--dry-run", "--out", str(out)], args.runs)
                rerun = median_process(
                    [*squeeze, str(path), "--out", str(out), "--quiet", *views_off], args.runs
                )
                if args.reference_kb:
                    uncached = []
                    for _ in range(args.runs):
                        (out / REFERENCE_CACHE_NAME).unlink(missing_ok=True)  # as every rerun was before
                        uncached.append(
                            timed_process([*squeeze, str(path), "--out", str(out), "--quiet", *views_off])
                        )
                    rerun["photos_read"] = {
                        "median_s": statistics.median(wall for wall, _, _ in uncached),
                        "cpu_median_s": statistics.median(cpu for _, _, cpu in uncached),
                        "peak_rss_mib": max(rss for _, rss, _ in uncached),
                    }
                    print(
                        f"{n:>7} jobs, every photo read (no reference cache): gen "
                        f"{rerun['photos_read']['median_s']:.2f} s, CPU "
                        f"{rerun['photos_read']['cpu_median_s']:.2f} s",
                        flush=True,
                    )
                inner = in_process(path, out)
                report["resume"][n] = {"finished": written, "dry_run": dry, "gen_all_done": rerun, **inner}
                report["resume"][n]["first_gen_s"] = first_wall
                print(
                    f"{n:>7} jobs, all {written} done (written in {setup:.0f} s): dry run "
                    f"{dry['median_s']:.2f} s ({dry['min_s']:.2f}–{dry['max_s']:.2f}), "
                    f"{dry['peak_rss_mib']:.0f} MiB; gen {rerun['median_s']:.2f} s ({rerun['min_s']:.2f}–"
                    f"{rerun['max_s']:.2f}), CPU {rerun['cpu_median_s']:.2f} s ({rerun['cpu_min_s']:.2f}–"
                    f"{rerun['cpu_max_s']:.2f}), {rerun['peak_rss_mib']:.0f} MiB; find_finished "
                    f"{inner['scan_s']:.2f} s, Python peak {inner['scan_peak_mib']:.1f} MiB",
                    flush=True,
                )
                if args.verify:
                    verify = median_process(
                        [*squeeze, str(path), "--out", str(out), "--quiet", "--verify", *views_off], 1
                    )
                    report["resume"][n]["gen_verify"] = verify
                    print(
                        f"{n:>7} jobs: gen --verify {verify['median_s']:.2f} s, CPU "
                        f"{verify['cpu_median_s']:.2f} s, {verify['peak_rss_mib']:.0f} MiB",
                        flush=True,
                    )
    report["load_average_after"] = os.getloadavg()
    print(f"load average before {report['load_average_before']}, after {report['load_average_after']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
