"""Drawing grids and contact sheets at scale: from scratch, after one new image, and when nothing changed.

    python benchmarks/bench_views.py [--images 1000] [--subjects 2] [--seeds 2] [--size 512] [--rounds 3]
        [--workers 1 auto] [--compare /path/to/other/checkout]

Builds one output folder the way a merge run after `--shard` finds it: every image of the plan on disk
(`--size`² PNGs of smooth noise, like generated images; 3 JPEG references of 1024 × 768 per subject, like
photos), no grids or sheets. Sidecars are not written: `update_views` is given the finished mapping
directly (the scan that finds them is `bench_resume.py`'s measurement). Then, per round and per variant
(the order rotates every round), a fresh process imports squeeze from the variant's checkout and times
`outputs.update_views` three times:

  - all: every view drawn from scratch (the merge run);
  - one: one image of subject 0 replaced (new pixels, new hash), then the views brought up to date;
  - none: nothing changed (what every later run pays to check the views).

Variants: this checkout with each `--workers` value (`1`: this process alone; `auto`: the default, a pool
of the available cores when there is enough to draw), and with `--compare DIR` another checkout's code (a
worktree of an older commit: `git worktree add /tmp/squeeze-main main`), called as it is (its own default).
Reported: median (min–max) wall seconds per phase, ms per image for `all`, the process's CPU seconds
(itself and its worker processes) and peak RSS (the largest of the process and its workers).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------------
# The folder (built once, with this checkout's code)
# ----------------------------------------------------------------------------------------------------


def _smooth_noise(seed: int, size: tuple[int, int]):
    """An RGB image with the statistics of a photo or a generated image: blurred noise plus fine grain."""
    import numpy as np
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8))
    image = coarse.resize(size, Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(4))
    grain = rng.integers(-6, 7, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + grain, 0, 255).astype(np.uint8))


def build(folder: Path, images: int, subjects: int, seeds: int, size: int) -> None:
    import hashlib

    import yaml

    from squeeze_cli.manifest.resolve import load_manifest
    from squeeze_cli.outputs.layout import image_path
    from squeeze_cli.plan import plan_jobs

    prompts = max(1, images // (subjects * seeds))
    entries = []
    for s in range(subjects):
        image_dir = folder / "refs" / f"subject{s}"
        image_dir.mkdir(parents=True)
        for r in range(3):
            _smooth_noise(1000 * s + r, (1024, 768)).save(image_dir / f"{r}.jpg", quality=90)
        entries.append(
            {
                "name": f"subject{s}",
                "class": "thing",
                "references": [f"refs/subject{s}/*.jpg"],
                "prompts": [
                    f"a {{class}} number {p} in scene {s}, in the evening light" for p in range(prompts)
                ],
            }
        )
    manifest = {
        "version": 1,
        "recipe": "tiny",
        "defaults": {"seeds": {"count": seeds, "base": 0}},
        "subjects": entries,
    }
    (folder / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    loaded = load_manifest(folder / "manifest.yaml")
    jobs = plan_jobs(loaded, model_identity=loaded.model_identity, max_jobs=loaded.max_jobs)
    variants = []
    for v in range(9):  # 8 to share among the jobs, the 9th is the "new image"
        path = folder / f"variant{v}.png"
        _smooth_noise(v, (size, size)).save(path)
        data = path.read_bytes()
        variants.append((data, hashlib.sha256(data).hexdigest()))
    finished = {}
    for number, job in enumerate(jobs):
        data, digest = variants[number % 8]
        target = image_path(folder / "out", job)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        finished[job.job_id] = digest
    middle = jobs[len([j for j in jobs if j.subject == jobs[0].subject]) // 2]  # subject 0, mid-way
    (folder / "finished.json").write_text(
        json.dumps({"finished": finished, "new_image": middle.job_id, "new_sha256": variants[8][1]})
    )


# ----------------------------------------------------------------------------------------------------
# One measurement (a fresh process, importing squeeze from the variant's checkout)
# ----------------------------------------------------------------------------------------------------


def child(folder: Path, workers: str | None) -> None:
    import inspect
    import resource
    from types import SimpleNamespace

    from squeeze_cli import outputs
    from squeeze_cli.manifest.resolve import load_manifest
    from squeeze_cli.outputs.layout import image_path
    from squeeze_cli.plan import plan_jobs

    loaded = load_manifest(folder / "manifest.yaml")
    jobs = plan_jobs(loaded, model_identity=loaded.model_identity, max_jobs=loaded.max_jobs)
    recorded = json.loads((folder / "finished.json").read_text())
    finished = {job.job_id: SimpleNamespace(sha256=recorded["finished"][job.job_id]) for job in jobs}
    out = folder / "out"
    for subject in {job.subject for job in jobs}:
        for view in [*(out / subject).glob("grid-*.png"), *(out / subject).glob("contact-sheet*.png")]:
            view.unlink()
    options = {}
    if workers is not None:
        if "workers" not in inspect.signature(outputs.update_views).parameters:
            raise SystemExit("this checkout's update_views has no `workers`: run it without --workers")
        options["workers"] = None if workers == "auto" else int(workers)

    def cpu() -> float:
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    def timed() -> tuple[float, float]:
        wall, used = time.perf_counter(), cpu()
        outputs.update_views(out, jobs, finished, lambda: False, **options)
        return time.perf_counter() - wall, cpu() - used

    result = {}
    result["all_s"], result["all_cpu_s"] = timed()
    new_job = next(job for job in jobs if job.job_id == recorded["new_image"])
    image = image_path(out, new_job)
    original = image.read_bytes()
    image.write_bytes((folder / "variant8.png").read_bytes())
    finished[new_job.job_id] = SimpleNamespace(sha256=recorded["new_sha256"])
    try:
        result["one_s"], result["one_cpu_s"] = timed()
    finally:
        image.write_bytes(original)
    result["none_s"], result["none_cpu_s"] = timed()
    print(json.dumps(result))


def measure(folder: Path, code: Path, workers: str | None) -> dict[str, float]:
    """One variant's phases in a fresh process, with the peak RSS of it and its workers (wait4's rusage
    covers both)."""
    command = [sys.executable, __file__, "--child", str(folder)]
    if workers is not None:
        command += ["--child-workers", workers]
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0), stderr.seek(0)
        if process.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} (code {code}) exited {process.returncode}: {stderr.read()[-2000:]}"
            )
        result = json.loads(stdout.read().strip().splitlines()[-1])
    result["peak_rss_mib"] = usage.ru_maxrss / 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--subjects", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", nargs="*", default=["1", "auto"], help="this checkout's variants")
    parser.add_argument("--compare", type=Path, default=None, help="another checkout to time side by side")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-workers", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.child_workers)
        return

    variants = [(f"workers={w}", REPO, w) for w in args.workers]
    if args.compare is not None:
        variants.insert(0, (f"{args.compare.name} (default)", args.compare.resolve(), None))
    samples: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in variants}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        build(folder, args.images, args.subjects, args.seeds, args.size)
        images = len(json.loads((folder / "finished.json").read_text())["finished"])
        print(
            f"{images} images ({args.subjects} subjects, {args.seeds} seeds, {args.size}²) written in "
            f"{time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        for round_number in range(args.rounds):
            shift = round_number % len(variants)
            for name, code, workers in variants[shift:] + variants[:shift]:
                result = measure(folder, code, workers)
                samples[name].append(result)
                print(
                    f"round {round_number + 1} {name}: all {result['all_s']:.1f} s "
                    f"({1000 * result['all_s'] / images:.1f} ms/image, CPU {result['all_cpu_s']:.1f} s), "
                    f"one {result['one_s']:.2f} s, none {result['none_s']:.2f} s, "
                    f"peak RSS {result['peak_rss_mib']:.0f} MiB; load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
    report = {"images": images, "args": {k: str(v) for k, v in vars(args).items()}, "variants": {}}
    print(f"\n{images} images, median (min–max) of {args.rounds} rounds:")
    for name, rows in samples.items():
        summary = {}
        for key in ("all_s", "all_cpu_s", "one_s", "none_s", "peak_rss_mib"):
            values = [row[key] for row in rows]
            summary[key] = (statistics.median(values), min(values), max(values))
        report["variants"][name] = {"summary": summary, "rounds": rows}
        (a, a0, a1), (c, _, _) = summary["all_s"], summary["all_cpu_s"]
        print(
            f"  {name}: all {a:.1f} s ({a0:.1f}–{a1:.1f}) = {1000 * a / images:.1f} ms/image "
            f"(CPU {1000 * c / images:.1f} ms/image); one new image {summary['one_s'][0]:.2f} s "
            f"({summary['one_s'][1]:.2f}–{summary['one_s'][2]:.2f}); "
            f"nothing new {summary['none_s'][0]:.2f} s; "
            f"peak RSS {summary['peak_rss_mib'][0]:.0f} MiB"
        )
    first = variants[0][0]
    for name, rows in list(samples.items())[1:]:  # per round, against the first variant (`--compare`'s)
        ratios = {}
        for key in ("all_s", "all_cpu_s", "one_s"):
            values = [base[key] / row[key] for base, row in zip(samples[first], rows, strict=True)]
            ratios[key] = (statistics.median(values), min(values), max(values))
        report["variants"][name]["ratio_to_first"] = ratios
        text = ", ".join(
            f"{label} ×{ratios[key][0]:.2f} ({ratios[key][1]:.2f}–{ratios[key][2]:.2f})"
            for label, key in [("all", "all_s"), ("all by CPU time", "all_cpu_s"), ("one new image", "one_s")]
        )
        print(f"  {first} / {name}, per round: {text}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
