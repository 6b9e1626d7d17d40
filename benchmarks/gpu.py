"""Full-size speed and memory on a GPU, each figure beside its lower bound from the transformer's FLOPs.

    python benchmarks/gpu.py --out results/                 # GPU: FLUX.1-dev + InternVL3-8B, random bf16
    python benchmarks/gpu.py --small --out /tmp/gpu-small   # CPU, the `small` random model: runs end to end

Builds the real architectures (configs in `gpu_configs.json` beside this file; nothing is downloaded)
with random weights, encodes one subject (one reference) once, then measures seconds per image with 28
steps at 512² and 1024²: stage plan on (τ 0.95 / 0.85) and off (every step sees the MLLM condition and
the reference tokens), batch 1 and larger batches, and with `enable_model_cpu_offload`. Each case: one
warm-up call, then the median (min–max) of `--repeats` calls, and the peak GPU memory.

The lower bound of a case is the transformer's FLOPs per image (counted with torch's FlopCounterMode over
one real call, every step) divided by the measured dense matmul rate in the same dtype; "× limit" is
measured / bound, so 1.0 would be a transformer running at peak matmul speed with everything else free.
Results go to `OUT/gpu_results.json` (and a table on stdout).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
PROMPTS = ["a dog on the beach", "a dog in the snow", "a dog on a wooden floor", "a purple dog"]


# ------------------------------------------------------------------------------------------------------
# Building


def _bf16_on(module: torch.nn.Module, device: str, dtype: torch.dtype) -> torch.nn.Module:
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def build_full_size(device: str, dtype: torch.dtype):
    """SqueezePipeline with FLUX.1-dev's transformer + VAE and InternVL3-8B, random weights on `device`."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import GotOcr2ImageProcessorPil, InternVLConfig, InternVLModel

    from squeeze_cli.pipelines.aggregator import DualLayerAggregator
    from squeeze_cli.pipelines.mllm.tiny import build_tiny_tokenizer
    from squeeze_cli.pipelines.squeeze import SqueezePipeline
    from squeeze_cli.pipelines.stages import DEFAULT_SCHEDULER_CONFIG

    configs = json.loads((HERE / "gpu_configs.json").read_text())
    # The tiny tokenizer has InternVL3's special tokens and chat template (the real vocabulary would be a
    # download); the model's image token id is set to its id. Text token counts differ slightly from the
    # real tokenizer's; the 256 image tokens per reference do not.
    tokenizer = build_tiny_tokenizer("internvl")
    mllm_config = dict(configs["internvl3_8b"])
    mllm_config["image_token_id"] = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    torch.manual_seed(0)
    # Built one at a time on the device in float32 (fast random init there), then cast.
    with torch.device(device):
        # The base model, as squeeze loads it (no LM head).
        mllm = _bf16_on(InternVLModel(InternVLConfig(**mllm_config)), device, dtype)
        aggregator = _bf16_on(DualLayerAggregator(**configs["aggregator"]), device, dtype)
        transformer = _bf16_on(FluxTransformer2DModel(**configs["flux_transformer"]), device, dtype)
        vae = _bf16_on(AutoencoderKL(**configs["flux_vae"]), device, dtype)
    return SqueezePipeline(
        mllm=mllm,
        tokenizer=tokenizer,
        image_processor=GotOcr2ImageProcessorPil(**configs["internvl_image_processor"]),
        aggregator=aggregator,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(**DEFAULT_SCHEDULER_CONFIG),
    )


def build_small(device: str, dtype: torch.dtype):
    from squeeze_cli.pipelines.squeeze import SqueezePipeline
    from squeeze_cli.pipelines.tiny import build_tiny_components

    pipe = SqueezePipeline(**build_tiny_components("internvl", seed=0, size="small"))
    return pipe.to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------------------
# Measuring


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_flops_per_second(device: str, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    """Dense (n × n) @ (n × n) rate in `dtype`: the best of `repeats` timed batches of matmuls."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    calls = 20 if device.startswith("cuda") else 2
    best = float("inf")
    for _ in range(repeats + 1):
        synchronize(device)
        started = time.perf_counter()
        for _ in range(calls):
            a @ b
        synchronize(device)
        best = min(best, (time.perf_counter() - started) / calls)
    return 2 * n**3 / best


def transformer_flops_per_image(pipe, condition, params: dict, device: str) -> float:
    """FLOPs of every transformer forward of one image (batch 1), counted over one real call."""
    from torch.utils.flop_counter import FlopCounterMode

    total = 0.0
    modes: list[FlopCounterMode] = []

    def before(module, args, kwargs):
        modes.append(FlopCounterMode(display=False))
        modes[-1].__enter__()

    def after(module, args, kwargs, output):
        nonlocal total
        mode = modes.pop()
        mode.__exit__(None, None, None)
        total += mode.get_total_flops()

    handles = [
        pipe.transformer.register_forward_pre_hook(before, with_kwargs=True),
        pipe.transformer.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        pipe(
            PROMPTS[0],
            subject_condition=condition,
            generator=[torch.Generator().manual_seed(0)],
            output_type="latent",
            **params,
        )
    finally:
        for handle in handles:
            handle.remove()
    synchronize(device)
    return total


def peak_memory_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS (never reset)


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def time_case(pipe, condition, params: dict, batch: int, repeats: int, device: str) -> dict:
    prompts = (PROMPTS * batch)[:batch]

    def one() -> float:
        synchronize(device)
        started = time.perf_counter()
        pipe(
            prompts,
            subject_condition=condition,
            generator=[torch.Generator().manual_seed(i) for i in range(batch)],
            **params,
        )
        synchronize(device)
        return (time.perf_counter() - started) / batch

    reset_peak(device)
    one()  # warm-up: kernels chosen, allocator grown
    samples = [one() for _ in range(repeats)]
    return {
        "seconds_per_image": {"median": statistics.median(samples), "min": min(samples), "max": max(samples)},
        "images_per_second": 1 / statistics.median(samples),
        "peak_memory_gib": round(peak_memory_gib(device), 3),
    }


# ------------------------------------------------------------------------------------------------------


PLANS = {
    "on": {"stage_thresholds": (0.95, 0.85)},
    "off": {"stage_thresholds": (1.0, 0.0), "keep_mllm_condition": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_results.json")
    parser.add_argument("--small", action="store_true", help="the small random model on the CPU (CI)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--steps", type=int, default=None, help="default 28 (4 with --small)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="default 512 1024 (64 128 small)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="default 2 4 (2 small)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per case (3; 1 small)")
    parser.add_argument("--no-offload", action="store_true", help="skip the model-offload cases")
    args = parser.parse_args()

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not args.small and not device.startswith("cuda"):
        sys.exit("gpu.py: no GPU here; the full-size run needs one (use --small for the CPU check)")
    dtype = torch.float32 if args.small else torch.bfloat16
    steps = args.steps or (4 if args.small else 28)
    sizes = args.sizes or ([64, 128] if args.small else [512, 1024])
    batches = args.batches or ([2] if args.small else [2, 4])
    repeats = args.repeats or (1 if args.small else 3)
    args.out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    pipe = (build_small if args.small else build_full_size)(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    build_seconds = time.perf_counter() - started
    rate = matmul_flops_per_second(device, dtype, n=1024 if args.small else 8192)
    reference = Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8))
    environment = {
        "device": torch.cuda.get_device_name()
        if device.startswith("cuda")
        else platform.processor() or "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "matmul_tflops": round(rate / 1e12, 3),
        "build_seconds": round(build_seconds, 1),
        "transformer_parameters": sum(p.numel() for p in pipe.transformer.parameters()),
        "mllm_parameters": sum(p.numel() for p in pipe.mllm.parameters()),
        "steps": steps,
        "references": 1,
    }
    try:
        import diffusers
        import transformers

        environment.update(diffusers=diffusers.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    print(json.dumps(environment), flush=True)

    cases = []

    def run(size: int, plan: str, batch: int, offload: bool) -> None:
        try:
            measure(size, plan, batch, offload)
        except Exception as error:  # one failing case (e.g. out of memory) must not lose the others
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            cases.append(
                {
                    "size": size,
                    "stage_plan": plan,
                    "batch": batch,
                    "offload": "model" if offload else "none",
                    "error": message,
                }
            )
            print(f"{size}² plan {plan} batch {batch} offload {offload}: {message}", flush=True)

    def measure(size: int, plan: str, batch: int, offload: bool) -> None:
        reference_size = min(size, 512)
        params = {"height": size, "width": size, "num_inference_steps": steps, **PLANS[plan]}
        encode_started = time.perf_counter()
        condition = pipe.encode_subject([reference], reference_size=reference_size)
        synchronize(device)
        encode_seconds = time.perf_counter() - encode_started
        flops = transformer_flops_per_image(pipe, condition, params, device)
        result = time_case(pipe, condition, params, batch, repeats, device)
        bound = flops / rate
        case = {
            "size": size,
            "stage_plan": plan,
            "batch": batch,
            "offload": "model" if offload else "none",
            "reference_size": reference_size,
            "encode_subject_seconds": round(encode_seconds, 4),
            "transformer_tflops_per_image": round(flops / 1e12, 4),
            "lower_bound_seconds": round(bound, 4),
            "x_limit": round(result["seconds_per_image"]["median"] / bound, 2) if bound else None,
            **result,
        }
        cases.append(case)
        s = case["seconds_per_image"]
        print(
            f"{size}² plan {plan:<3} batch {batch} offload {case['offload']:<5} "
            f"{s['median']:8.3f} s/img ({s['min']:.3f}–{s['max']:.3f})  bound {bound:7.3f} s  "
            f"×{case['x_limit']} the limit  peak {case['peak_memory_gib']:.2f} GiB",
            flush=True,
        )
        (args.out / "gpu_results.json").write_text(
            json.dumps({"environment": environment, "cases": cases}, indent=2)
        )

    for size in sizes:
        for plan in PLANS:
            run(size, plan, 1, offload=False)
        for batch in batches:
            if size >= 1024 and batch > 2:
                continue  # 1024² batches above 2 add memory, not speed
            run(size, "on", batch, offload=False)
    if device.startswith("cuda") and not args.no_offload:
        pipe.to("cpu")
        pipe.enable_model_cpu_offload(device=device)
        for size in sizes:
            run(size, "on", 1, offload=True)

    best = {}
    for case in cases:
        if "error" in case:
            continue
        key = f"{case['size']} offload {case['offload']} plan {case['stage_plan']}"
        if key not in best or case["images_per_second"] > best[key]["images_per_second"]:
            best[key] = {"batch": case["batch"], "images_per_second": case["images_per_second"]}
    (args.out / "gpu_results.json").write_text(
        json.dumps({"environment": environment, "cases": cases, "best_batch": best}, indent=2)
    )
    print(f"best batch: {json.dumps(best)}")
    print(f"wrote {args.out / 'gpu_results.json'} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
