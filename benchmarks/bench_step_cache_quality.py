"""What a step cache costs in identity, measured with `squeeze eval`: the same jobs sampled exactly and with
each cache, scored against the references with the same metric models.

    python benchmarks/bench_step_cache_quality.py [--metrics tiny|dreambench] [--variants exact ...]

Each variant is one `squeeze gen` of the same manifest (small random checkpoint, 4 subjects with 2-3
references, `--prompts` prompts x `--seeds` seeds, 128², 28 steps, stage plan on) with `defaults.step_cache`
set through `--set`; then one `squeeze eval` of all the runs side by side. Printed per variant: images/s, the
overall DINO / CLIP-I / CLIP-T means and their difference from exact sampling (same seeds), and the mean
absolute pixel difference from the exact images.

`--metrics tiny` (the default here: nothing is downloaded) runs the whole path with random tiny metric
models, so its scores mean nothing; `--metrics dreambench` uses DINO ViT-S/16 and CLIP ViT-B/32 (downloaded
once) and gives the real identity cost. On the random small checkpoint even real metrics only say how far
the cached images drift from the exact ones; the cost on a trained model needs its weights (`--recipe`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from bench_naive_loop import write_project  # noqa: E402 - benchmarks/: the script's own folder

from squeeze_cli.pipelines.tiny import build_small_pipeline  # noqa: E402

VARIANTS = {
    "exact": "null",
    "first_block-0.6": "{method: first_block, threshold: 0.6}",
    "taylorseer-5:3:1": "{method: taylorseer, interval: 5, warmup_steps: 3, order: 1}",
    # Targets instead of thresholds: calibrated on a probe image once (in the first batch's time).
    "first_block-skip0.4": "{method: first_block, skip: 0.4}",
    "first_block-skip0.6": "{method: first_block, skip: 0.6}",
}
METRICS = ("dino", "clip_i", "clip_t")


def squeeze(*argv: str) -> str:
    done = subprocess.run([sys.executable, "-m", "squeeze_cli", *argv], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"squeeze {' '.join(argv)} exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def pixels(out: Path) -> dict[str, np.ndarray]:
    return {
        f"{p.parent.name}/{p.name}": np.asarray(Image.open(p).convert("RGB"), dtype=np.float64)
        for p in out.glob("*/[0-9]*-s*.png")
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--metrics", default="tiny", choices=["tiny", "dreambench"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if "exact" not in args.variants:
        args.variants.insert(0, "exact")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint = build_small_pipeline(work / "ckpt")
        project = work / "project"
        project.mkdir()
        settings = argparse.Namespace(
            family="internvl",
            subjects=4,
            prompts=args.prompts,
            seeds=args.seeds,
            size_px=128,
            reference_size=128,
            steps=28,
        )
        manifest, _ = write_project(project, checkpoint, settings)
        runs = {}
        for name in args.variants:
            out = work / name
            squeeze(
                "gen",
                str(manifest),
                "--out",
                str(out),
                "--quiet",
                "--set",
                f"defaults.step_cache={VARIANTS[name]}",
            )
            runs[name] = out
        scores = json.loads(squeeze("eval", "--metrics", args.metrics, "--json", *map(str, runs.values())))
        exact_pixels = pixels(runs["exact"])
        report = {"metrics": args.metrics, "variants": {}}
        exact_scores = scores["runs"][0]["overall"]
        for (name, out), summary in zip(runs.items(), scores["runs"], strict=True):
            run = json.loads((out / "run.json").read_text())
            mine = pixels(out)
            difference = float(
                np.mean([np.abs(mine[key] - exact_pixels[key]).mean() for key in exact_pixels])
            )
            overall = summary["overall"]
            report["variants"][name] = {
                "images_per_second": run["images_per_second"],
                "scores": {m: overall.get(m) for m in METRICS},
                "minus_exact": {
                    m: overall.get(m) - exact_scores.get(m) for m in METRICS if overall.get(m) is not None
                },
                "mean_abs_pixel_difference": difference,
                "step_cache": run.get("step_cache"),
            }
            row = report["variants"][name]
            scored = ", ".join(
                f"{m} {row['scores'][m]:.4f} ({row['minus_exact'][m]:+.4f})"
                for m in METRICS
                if m in row["minus_exact"]
            )
            passes = row["step_cache"] or {"skipped": 0, "transformer_passes": 1}
            print(
                f"{name:<20} {row['images_per_second']:.3f} img/s; {scored}; "
                f"|Δ| vs exact {difference:.2f} levels; "
                f"{passes['skipped'] / passes['transformer_passes']:.0%} of passes skipped",
                flush=True,
            )
    if args.metrics == "tiny":
        print("(tiny metric models: random weights, the scores check the plumbing only)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
