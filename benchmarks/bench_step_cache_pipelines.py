"""What `step_cache` saves and costs on each pipeline other than squeeze's, on its tiny twin, in one process.

    OMP_NUM_THREADS=1 python benchmarks/bench_step_cache_pipelines.py [--pipelines kontext ...] [--rounds 5]

Per pipeline: the tiny twin at `--size`² and `--steps` steps, one subject encoded once, `--images` prompts
per call (one seed each); for exact sampling and each cache the pipeline takes (its registry row's
`step_cache_methods`), `--rounds` rounds after a warm-up, each calling every variant (the order rotated).
Printed per variant: CPU seconds per image (median, min–max over the rounds), exact's CPU time over the
variant's (median, min–max of the per-round ratios), full transformer passes per image
(`pipelines.contract.TransformerPasses`), and against the exact images of the same seeds
the largest pixel difference in levels of 255 and the PSNR. The twins' weights are random and their
transformers two blocks deep, so the speed-up says little about full size (where the transformer's share of
the time is larger, and First Block Cache's first block is one of dozens, not half the model), and the
pixel difference only that the cache acts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_step_cache_pipelines import reference  # noqa: E402 - the tests' reference image

from squeeze_cli.loading import load_pipeline  # noqa: E402
from squeeze_cli.manifest.schema import ModelSpec  # noqa: E402
from squeeze_cli.params import StepCache  # noqa: E402
from squeeze_cli.pipelines.contract import TransformerPasses  # noqa: E402
from squeeze_cli.pipelines.registry import PIPELINES  # noqa: E402

VARIANTS = {
    "exact": None,
    "first_block 0.08": StepCache("first_block", threshold=0.08),
    "first_block 0.5": StepCache("first_block", threshold=0.5),
    "taylorseer 5:3:1": StepCache("taylorseer", interval=5, warmup_steps=3, order=1),
    "taylorseer 4:2:1": StepCache("taylorseer", interval=4, warmup_steps=2, order=1),
}
PROMPTS = ("a dog in the snow", "a dog on the beach", "a dog on a sofa", "a dog in a forest")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def measure(name: str, args: argparse.Namespace) -> list[str]:
    pipe = load_pipeline(ModelSpec(builtin="tiny", pipeline_class=name, dtype="float32"), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    subject = pipe.encode_subject([reference()], reference_size=64)
    prompts = list(PROMPTS[: args.images])

    def call(step_cache: StepCache | None) -> np.ndarray:
        images = pipe(
            prompts,
            subject_condition=subject,
            height=args.size,
            width=args.size,
            num_inference_steps=args.steps,
            generator=[torch.Generator().manual_seed(seed) for seed in range(len(prompts))],
            output_type="np",
            step_cache=step_cache,
        ).images
        return np.round(images * 255).astype(np.float64)  # the PNG's levels

    variants = {
        label: step_cache
        for label, step_cache in VARIANTS.items()
        if step_cache is None or step_cache.method in PIPELINES[name].step_cache_methods
    }
    images, passes, seconds = {}, {}, {label: [] for label in variants}
    for label, step_cache in variants.items():  # warm-up, and the images and passes of each variant
        counter = TransformerPasses(pipe.transformer)
        images[label] = call(step_cache)
        counter.remove()
        passes[label] = counter.full  # one pass runs the whole batch: per call is per image
    labels = list(variants)
    for round_ in range(args.rounds):  # side by side: every variant in each round, the order rotated
        for label in labels[round_ % len(labels) :] + labels[: round_ % len(labels)]:
            started = time.process_time()
            call(variants[label])
            seconds[label].append((time.process_time() - started) / len(prompts))
    rows = []
    for label in labels:
        ratios = [exact / cached for exact, cached in zip(seconds["exact"], seconds[label], strict=True)]
        difference = np.abs(images[label] - images["exact"])
        rows.append(
            f"{name:22} {label:17} {statistics.median(seconds[label]):.3f} s "
            f"({min(seconds[label]):.3f}–{max(seconds[label]):.3f})  ×{statistics.median(ratios):.2f} "
            f"({min(ratios):.2f}–{max(ratios):.2f})  {passes[label]}/{args.steps} full passes"
            f"  max |Δ| {difference.max():.0f}  PSNR {psnr(images[label], images['exact']):.1f} dB"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pipelines", nargs="+", default=[n for n in sorted(PIPELINES) if n != "squeeze"])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--images", type=int, default=2, choices=range(1, len(PROMPTS) + 1))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"{args.size}², {args.steps} steps, {args.images} images per call, {args.rounds} rounds")
    print(
        "pipeline  variant  CPU s/image median (min–max)  speed-up by CPU time, per round  passes  vs exact"
    )
    for name in args.pipelines:
        for row in measure(name, args):
            print(row, flush=True)


if __name__ == "__main__":
    main()
