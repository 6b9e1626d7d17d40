"""`squeeze gen` against the loops a user writes with the documented Python API, same manifest.

    python benchmarks/bench_naive_loop.py                 # small model, 4 subjects × 6 prompts × 2 seeds
    python benchmarks/bench_naive_loop.py --quick         # CI size: a minute or two
    python benchmarks/bench_naive_loop.py --json out.json

The naive loop loads `SqueezePipeline` once, then makes one `pipe(prompt, references, generator=...)`
call per image (batch 1, nothing cached across calls) and saves a PNG. The competent loop is the one a
user writes after reading docs/pipeline.md: `encode_subject` once per subject, then one
`pipe(prompt, subject_condition=..., generator=...)` call per image, and a PNG. `squeeze gen` runs in
this process on a manifest of the same jobs (grids and contact sheets off: the loops draw none). Each
round runs every variant once, in rotating order, so machine noise hits all alike; the first round is a
warm-up. All include loading the pipeline; "after load" figures leave it out. Prints images/s (median,
min–max), the ratio to each loop per round (by wall time, and by this process's CPU time, which other
jobs on a shared machine disturb less), where the time goes, and whether the images are identical.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from forward_timers import ForwardTimers  # benchmarks/: the script's own folder is on sys.path
from PIL import Image

from squeeze_cli import outputs
from squeeze_cli.images import load_rgb
from squeeze_cli.pipelines.squeeze import SqueezePipeline
from squeeze_cli.pipelines.tiny import build_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
SUBJECTS = {"dog": "dog", "backpack": "backpack", "cat": "cat", "teapot": "teapot"}  # 2, 2, 2, 3 references
PROMPTS = (
    "a {} on the beach",
    "a {} in the snow",
    "a {} on top of a wooden floor",
    "a {} with a city in the background",
    "a purple {}",
    "a {} floating on top of water",
)


def write_project(folder: Path, checkpoint: Path, args: argparse.Namespace) -> tuple[Path, list[dict]]:
    """The manifest and recipe on disk, and the same jobs as a list for the naive loop."""
    params = {
        "height": args.size_px,
        "width": args.size_px,
        "num_inference_steps": args.steps,
        "reference_size": args.reference_size,
    }
    recipe = {
        "name": "bench-small",
        "description": "random small checkpoint for benchmarks",
        "model": {"pipeline": str(checkpoint), "family": args.family, "dtype": "float32"},
        "defaults": params,
    }
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    subjects, jobs = [], []
    for name in list(SUBJECTS)[: args.subjects]:
        shutil.copytree(ROOT / "examples" / "images" / name, folder / "images" / name)
        references = sorted(str(p) for p in (folder / "images" / name).glob("*.jpg"))
        # Past the six scenes, the same scenes again with a take number: a longer run, every prompt distinct.
        prompts = [
            PROMPTS[i % len(PROMPTS)].format(SUBJECTS[name])
            + (f", take {i // len(PROMPTS) + 1}" if i >= 6 else "")
            for i in range(args.prompts)
        ]
        subjects.append({"name": name, "references": [f"images/{name}/*.jpg"], "prompts": prompts})
        for p, prompt in enumerate(prompts):
            for seed in range(args.seeds):
                jobs.append(
                    {
                        "subject": name,
                        "prompt_index": p,
                        "prompt": prompt,
                        "seed": seed,
                        "references": references,
                    }
                )
    manifest = {
        "version": 1,
        "recipe": str(folder / "recipe.yaml"),
        "output": {"grids": False, "contact_sheet": False},
        "defaults": {**params, "seeds": list(range(args.seeds))},
        "subjects": subjects,
    }
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path, jobs


def run_naive(checkpoint: Path, jobs: list[dict], out: Path, params: dict) -> dict[str, float]:
    cpu_started = time.process_time()
    started = time.perf_counter()
    pipe = SqueezePipeline.from_pretrained(checkpoint)
    pipe.set_progress_bar_config(disable=True)
    loaded = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    references: dict[str, list[Image.Image]] = {}
    for job in jobs:
        if job["subject"] not in references:  # a user reads a subject's photos once
            references[job["subject"]] = [load_rgb(p) for p in job["references"]]
        image = pipe(
            job["prompt"],
            references[job["subject"]],
            generator=torch.Generator().manual_seed(job["seed"]),
            **params,
        ).images[0]
        image.save(out / f"{job['subject']}-{job['prompt_index']:03d}-s{job['seed']}.png")
    finished = time.perf_counter()
    return {"total": finished - started, "load": loaded - started, "cpu": time.process_time() - cpu_started}


def run_competent(checkpoint: Path, jobs: list[dict], out: Path, params: dict) -> dict[str, float]:
    """docs/pipeline.md's loop: each subject encoded once (`encode_subject`), then one call per image."""
    cpu_started = time.process_time()
    started = time.perf_counter()
    pipe = SqueezePipeline.from_pretrained(checkpoint)
    pipe.set_progress_bar_config(disable=True)
    loaded = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    sampling = {key: value for key, value in params.items() if key != "reference_size"}
    conditions: dict[str, Any] = {}
    for job in jobs:
        if job["subject"] not in conditions:
            references = [load_rgb(p) for p in job["references"]]
            conditions[job["subject"]] = pipe.encode_subject(
                references, reference_size=params["reference_size"]
            )
        image = pipe(
            job["prompt"],
            subject_condition=conditions[job["subject"]],
            generator=torch.Generator().manual_seed(job["seed"]),
            **sampling,
        ).images[0]
        image.save(out / f"{job['subject']}-{job['prompt_index']:03d}-s{job['seed']}.png")
    finished = time.perf_counter()
    return {"total": finished - started, "load": loaded - started, "cpu": time.process_time() - cpu_started}


def run_gen(manifest: Path, out: Path, batch_size: int) -> dict[str, float]:
    from squeeze_cli.cli import main

    cpu_started = time.process_time()
    started = time.perf_counter()
    argv = [
        "gen",
        str(manifest),
        "--out",
        str(out),
        "--overwrite",
        "--quiet",
        "--batch-size",
        str(batch_size),
    ]
    try:
        main(argv)
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise RuntimeError(f"squeeze {' '.join(argv)} exited with {exit_.code}") from None
    total = time.perf_counter() - started
    summary = json.loads((out / "run.json").read_text())
    return {"total": total, "load": summary["timings"]["load"], "cpu": time.process_time() - cpu_started}


def gen_images(out: Path) -> dict[str, np.ndarray]:
    images = {}
    for path in out.glob("*/[0-9]*-s*.png"):
        prompt_index, seed = path.stem.split("-")[0], path.stem.split("-s")[1].split("-")[0]
        images[f"{path.parent.name}-{prompt_index}-s{seed}"] = np.asarray(Image.open(path).convert("RGB"))
    return images


def naive_images(out: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.asarray(Image.open(p).convert("RGB")) for p in out.glob("*.png")}


def compare(first: dict[str, np.ndarray], second: dict[str, np.ndarray]) -> dict[str, object]:
    if first.keys() != second.keys():
        return {"same_jobs": False}
    differing = [int((first[k] != second[k]).sum()) for k in first]
    largest = max(int(np.abs(first[k].astype(int) - second[k].astype(int)).max()) for k in first)
    return {
        "same_jobs": True,
        "identical_images": sum(d == 0 for d in differing),
        "images": len(first),
        "differing_channel_values": sum(differing),
        "channel_values": sum(a.size for a in first.values()),
        "largest_difference": largest,
    }


def summarise(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="CI size: 2 subjects × 2 prompts, 3 rounds")
    parser.add_argument("--model-size", default="small", choices=["small", "tiny"])
    parser.add_argument("--family", default="internvl", choices=["internvl", "qwen2_5_vl"])
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (after one warm-up)")
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--size-px", type=int, default=128)
    parser.add_argument("--reference-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[2], help="extra gen batch sizes")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.subjects, args.prompts, args.rounds, args.steps = 2, 2, 3, 4
    if args.threads:
        torch.set_num_threads(args.threads)
    params = {
        "height": args.size_px,
        "width": args.size_px,
        "num_inference_steps": args.steps,
        "reference_size": args.reference_size,
    }

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = build_tiny_pipeline(tmp / "ckpt", family=args.family, size=args.model_size)
        manifest, jobs = write_project(tmp, checkpoint, args)
        variants = {
            "naive": lambda out: run_naive(checkpoint, jobs, out, params),
            "competent": lambda out: run_competent(checkpoint, jobs, out, params),
        }
        variants["gen b1"] = lambda out: run_gen(manifest, out, 1)
        for size in args.batch_sizes:
            variants[f"gen b{size}"] = lambda out, size=size: run_gen(manifest, out, size)
        names = list(variants)
        results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
        breakdown: dict[str, dict[str, float]] = {name: {} for name in names}
        for round_ in range(args.rounds + 1):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            for name in order:
                out = tmp / "out" / name.replace(" ", "-")
                shutil.rmtree(out, ignore_errors=True)
                with ForwardTimers() as timers:
                    times = variants[name](out)
                if round_ == 0:
                    continue  # warm-up
                results[name].append(times)
                for part, seconds in timers.seconds.items():
                    breakdown[name][part] = breakdown[name].get(part, 0.0) + seconds / args.rounds
                breakdown[name]["total"] = breakdown[name].get("total", 0.0) + times["total"] / args.rounds
                breakdown[name]["load"] = breakdown[name].get("load", 0.0) + times["load"] / args.rounds
            print(f"round {round_}{' (warm-up)' if round_ == 0 else ''} done", file=sys.stderr, flush=True)

        naive = naive_images(tmp / "out" / "naive")
        identity = {
            "gen b1 vs naive": compare(naive, gen_images(tmp / "out" / "gen-b1")),
            "competent vs naive": compare(naive, naive_images(tmp / "out" / "competent")),
        }
        for size in args.batch_sizes:
            identity[f"gen b{size} vs gen b1"] = compare(
                gen_images(tmp / "out" / "gen-b1"), gen_images(tmp / "out" / f"gen-b{size}")
            )

    n = len(jobs)
    report = {
        "setup": {
            "model": args.model_size,
            "family": args.family,
            "jobs": n,
            "subjects": args.subjects,
            "prompts_per_subject": args.prompts,
            "seeds": args.seeds,
            "params": params,
            "rounds": args.rounds,
            "threads": torch.get_num_threads(),
            "versions": outputs.package_versions(),
        },
        "images_per_second": {},
        "images_per_second_after_load": {},
        "ratio_vs_naive": {},
        "ratio_vs_competent": {},
        "breakdown_seconds": breakdown,
        "identity": identity,
    }
    for name in names:
        report["images_per_second"][name] = summarise([n / r["total"] for r in results[name]])
        report["images_per_second_after_load"][name] = summarise(
            [n / (r["total"] - r["load"]) for r in results[name]]
        )
        for loop in ("naive", "competent"):
            if name == loop or (loop == "competent" and name == "naive"):
                continue
            ratios = report[f"ratio_vs_{loop}"]  # per round: the two ran back to back
            pairs = list(zip(results[loop], results[name], strict=True))
            ratios[name] = summarise([a["total"] / b["total"] for a, b in pairs])
            # CPU time of this process: what the work costs, whatever other jobs on the machine take.
            ratios[name + " cpu"] = summarise([a["cpu"] / b["cpu"] for a, b in pairs])
            ratios[name + " after load"] = summarise(
                [(a["total"] - a["load"]) / (b["total"] - b["load"]) for a, b in pairs]
            )
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


def print_report(report: dict) -> None:
    setup = report["setup"]
    print(
        f"{setup['model']} {setup['family']}: {setup['jobs']} images ({setup['subjects']} subjects × "
        f"{setup['prompts_per_subject']} prompts × {setup['seeds']} seeds), {setup['params']}, "
        f"{setup['threads']} threads, median of {setup['rounds']} rounds (min–max)"
    )
    for name, stats in report["images_per_second"].items():
        after = report["images_per_second_after_load"][name]
        line = (
            f"  {name:<10} {stats['median']:6.3f} img/s ({stats['min']:.3f}–{stats['max']:.3f})   "
            f"after load {after['median']:6.3f} ({after['min']:.3f}–{after['max']:.3f})"
        )
        for loop in ("naive", "competent"):
            ratios = report[f"ratio_vs_{loop}"]
            if name not in ratios:
                continue
            ratio, ratio_after, ratio_cpu = (ratios[name + suffix] for suffix in ("", " after load", " cpu"))
            line += (
                f"\n      ×{ratio['median']:.2f} ({ratio['min']:.2f}–{ratio['max']:.2f}) vs {loop}, "
                f"after load ×{ratio_after['median']:.2f}, by CPU time ×{ratio_cpu['median']:.2f} "
                f"({ratio_cpu['min']:.2f}–{ratio_cpu['max']:.2f})"
            )
        print(line)
    print("where the time goes (mean seconds per run):")
    for name, parts in report["breakdown_seconds"].items():
        total = parts["total"]
        shown = {k: v for k, v in parts.items() if k not in ("total",)}
        model = sum(v for k, v in shown.items() if k not in ("load", "png_write"))
        rest = total - model - shown.get("load", 0.0) - shown.get("png_write", 0.0)
        text = ", ".join(f"{k} {v:.2f} ({100 * v / total:.0f} %)" for k, v in sorted(shown.items()))
        print(f"  {name:<10} total {total:.2f} s: {text}, other {rest:.2f} ({100 * rest / total:.0f} %)")
    for name, result in report["identity"].items():
        print(f"  {name}: {result}")


if __name__ == "__main__":
    main()
