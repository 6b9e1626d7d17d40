"""What the runner's exact shortcuts buy, measured side by side in one process on the tiny pipeline.

    python benchmarks/bench_gen.py [--family internvl|qwen2_5_vl] [--repeats 5] [--jobs 8]

For one subject with `--jobs` prompts it times, per image (median of `--repeats` runs):
  - fresh:    every call re-encodes the references (MLLM prefix, VAE latents), as a naive loop would;
  - cached:   `encode_subject` once, then every prompt on the cached condition (what `squeeze gen` does);
  - batched:  the cached condition, 4 prompts per call.
The tiny model's numbers show overheads, not full-size speed: the ratios grow with the MLLM's size.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from PIL import Image
from timing import median_seconds  # benchmarks/timing.py: the script's own folder is on sys.path

from squeeze_cli.pipelines.squeeze import SqueezePipeline
from squeeze_cli.pipelines.tiny import build_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
PARAMS = {"height": 64, "width": 64, "num_inference_steps": 4, "reference_size": 64, "output_type": "np"}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", default="internvl", choices=["internvl", "qwen2_5_vl"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    with tempfile.TemporaryDirectory() as folder:
        pipe = SqueezePipeline.from_pretrained(build_tiny_pipeline(Path(folder) / "tiny", family=args.family))
    pipe.set_progress_bar_config(disable=True)
    references = [
        Image.open(path).convert("RGB") for path in sorted((ROOT / "examples/images/dog").glob("*.jpg"))
    ]
    prompts = [f"a dog in scene number {i}" for i in range(args.jobs)]

    def generators(n: int, start: int = 0) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(start + i) for i in range(n)]

    def fresh() -> None:
        for i, prompt in enumerate(prompts):
            pipe(prompt, references, generator=generators(1, i), **PARAMS)

    def cached() -> None:
        condition = pipe.encode_subject(references, reference_size=PARAMS["reference_size"])
        for i, prompt in enumerate(prompts):
            pipe(prompt, subject_condition=condition, generator=generators(1, i), **PARAMS)

    def batched() -> None:
        condition = pipe.encode_subject(references, reference_size=PARAMS["reference_size"])
        for start in range(0, len(prompts), 4):
            chunk = prompts[start : start + 4]
            pipe(chunk, subject_condition=condition, generator=generators(len(chunk), start), **PARAMS)

    results = {
        name: median_seconds(run, args.repeats) / args.jobs
        for name, run in [("fresh", fresh), ("cached", cached), ("batched", batched)]
    }
    print(
        f"tiny {args.family}, {args.jobs} prompts of one subject with {len(references)} references, "
        f"{PARAMS['width']}x{PARAMS['height']}, {PARAMS['num_inference_steps']} steps, "
        f"median of {args.repeats}, {torch.get_num_threads()} threads"
    )
    for name, seconds in results.items():
        print(f"  {name:<8} {seconds * 1000:8.1f} ms/image   x{results['fresh'] / seconds:.2f} vs fresh")


if __name__ == "__main__":
    main()
