"""Micro-ratios on the small random model, each measured side by side (A/B alternated) in one run.

    python benchmarks/bench_micro.py [--only prefix stages overhead processes threads cost step_cache
                                             compile]
                                      [--rounds 5] [--quick]

- prefix:    prefix-cached MLLM encoding (one `encode_prefix`, then `encode_instruction` per prompt) against
             a full `encode` per prompt, K prompts of a subject with 3 references of 448 px (InternVL-style
             448-px tiles, 256 image tokens each). Ratio = cached / full (target <= 0.35).
- stages:    one transformer step of stage 1 (latents only) against a step with the reference tokens, and
             per image the stage plan (τ 0.95/0.85) against every step with both conditions, 28 steps.
- overhead:  share of `squeeze gen` wall time after loading spent outside model forwards (target <= 10 %),
             and a profile of that rest (this process, cProfile, squeeze/PIL/yaml/json functions only).
- processes: `squeeze gen` as 1 process (1 thread) against 2 under `accelerate launch` (target >= 1.6x on 2
             cores); with --all-process-variants also 1 process on all cores, and 2 processes with
             OMP_NUM_THREADS = all cores each (what torch does when nobody sets it).
- threads:   one `squeeze gen` process with the threads it picks itself (`processes.choose_threads`: the
             cores the load leaves idle) against `--threads <all cores>` (torch's default) and
             `OMP_NUM_THREADS=1`; images/s of generation (run.json) and wall time, side by side.
- cost:      transformer CPU seconds per image with 1, 2 and 4 references (28 steps) against the cost model
             (`pipelines/cost.py`, the pipeline's registry row) with the model's real width and condition
             tokens; `--pipelines squeeze kontext qwen-image-edit-plus` (the others on their tiny twins with
             a small transformer).
- step_cache: images/s with `step_cache` (diffusers' First Block Cache, thresholds --cache-thresholds;
             TaylorSeer, --taylorseer INTERVAL:WARMUP:ORDER ...) against exact sampling, 28 steps, the
             stage plan on; the pixel difference of the same seeds (mean and max |Δ| in 0–255 levels,
             PSNR) and the full transformer passes per image.
- compile:   images/s with `model.compile: true` (regional torch.compile) against eager, the compiled
             pipeline's first round (compiling included) apart, and the pixel difference.
Each ratio is the median (min–max) of per-round ratios; the first round is a warm-up.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def summary(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def fmt(stats: dict[str, float], unit: str = "", scale: float = 1.0, digits: int = 3) -> str:
    m, lo, hi = (stats[k] * scale for k in ("median", "min", "max"))
    return f"{m:.{digits}f}{unit} ({lo:.{digits}f}–{hi:.{digits}f})"


def alternate(
    variants: dict[str, Callable[[], object]], rounds: int, cpu: dict[str, list[float]] | None = None
) -> dict[str, list[float]]:
    """Seconds of each variant per round, in rotating order; round 0 is a warm-up and not kept.

    `cpu`, when given, gets this process's CPU seconds per kept round too (less disturbed by other jobs)."""
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds + 1):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            started, started_cpu = time.perf_counter(), time.process_time()
            variants[name]()
            if round_:
                times[name].append(time.perf_counter() - started)
                if cpu is not None:
                    cpu.setdefault(name, []).append(time.process_time() - started_cpu)
    return times


def ratios(times: dict[str, list[float]], numerator: str, denominator: str) -> dict[str, float]:
    return summary([a / b for a, b in zip(times[numerator], times[denominator], strict=True)])


# ------------------------------------------------------------------------------------------------------


def bench_prefix(args: argparse.Namespace) -> dict:
    from transformers import GotOcr2ImageProcessorPil

    from squeeze_cli.pipelines.mllm import MLLMEncoder
    from squeeze_cli.pipelines.mllm.tiny import build_tiny_mllm

    model, tokenizer, _ = build_tiny_mllm("internvl", size="small")
    config = model.config
    # InternVL's real tile: 448 px in 14-px patches → 32×32 → 256 tokens after the 2×2 pixel shuffle.
    config.vision_config.image_size = [448, 448]
    config.vision_config.patch_size = [14, 14]
    config.image_seq_length = 256
    torch.manual_seed(0)
    model = type(model)(config).eval()
    processor = GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, crop_to_patches=False)
    encoder = MLLMEncoder(model, tokenizer, processor)
    rng = np.random.default_rng(0)
    references = [Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)) for _ in range(3)]
    prompts = [f"a backpack in scene number {i}, on a table" for i in range(args.prompts)]

    def full() -> None:
        for prompt in prompts:
            encoder.encode(references, prompt)

    def cached() -> None:
        prefix = encoder.encode_prefix(references)
        for prompt in prompts:
            encoder.encode_instruction(prefix, prompt)

    times = alternate({"full": full, "cached": cached}, args.rounds)
    sample = encoder.encode(references, prompts[0])
    return {
        "prompts": args.prompts,
        "references": 3,
        "sequence": int(sample.input_ids.shape[0]),
        "image_tokens": int(sample.image_mask.sum()),
        "full_seconds": summary(times["full"]),
        "cached_seconds": summary(times["cached"]),
        "cached_over_full": ratios(times, "cached", "full"),
    }


def _teapot_subject(checkpoint: Path, size: int):
    """The checkpoint's pipeline (no progress bars) and the teapot example encoded as its subject."""
    from squeeze_cli.pipelines.squeeze import SqueezePipeline

    pipe = SqueezePipeline.from_pretrained(checkpoint)
    pipe.set_progress_bar_config(disable=True)
    references = [Image.open(p).convert("RGB") for p in sorted((ROOT / "examples/images/teapot").glob("*"))]
    return pipe, pipe.encode_subject(references, reference_size=size)


def bench_stages(args: argparse.Namespace, checkpoint: Path) -> dict:
    from squeeze_cli.pipelines.stages import stage_plan

    pipe, subject = _teapot_subject(checkpoint, args.size_px)
    size = args.size_px
    embeds, pooled, _ = pipe.encode_prompt("a teapot on the beach", subject)
    latents, latent_ids = pipe.prepare_latents(1, 16, size, size, torch.float32, "cpu", None)
    reference_tokens, reference_ids = pipe._prepare_reference_tokens(
        subject.reference_latents, "cpu", torch.float32
    )
    with_refs = torch.cat([latents, reference_tokens[None]], dim=1)
    with_ids = torch.cat([latent_ids, reference_ids])

    def step(hidden_states, ids) -> None:
        with torch.no_grad():
            pipe.transformer(
                hidden_states=hidden_states,
                timestep=torch.tensor([0.9]),
                guidance=torch.tensor([2.5]),
                pooled_projections=pooled,
                encoder_hidden_states=embeds,
                txt_ids=torch.zeros(embeds.shape[1], 3),
                img_ids=ids,
                return_dict=False,
            )

    step_times = alternate(
        {
            "stage1": lambda: [step(latents, latent_ids) for _ in range(5)],
            "with_references": lambda: [step(with_refs, with_ids) for _ in range(5)],
        },
        args.rounds,
    )
    steps = 28
    common = {"height": size, "width": size, "num_inference_steps": steps, "output_type": "np"}

    def image(**kwargs) -> None:
        pipe(
            "a teapot on the beach",
            subject_condition=subject,
            generator=[torch.Generator().manual_seed(0)],
            **common,
            **kwargs,
        )

    image_times = alternate(
        {
            "plan": lambda: image(stage_thresholds=(0.95, 0.85)),
            "no_plan": lambda: image(stage_thresholds=(1.0, 0.0), keep_mllm_condition=True),
        },
        args.rounds,
    )
    plan = stage_plan(steps, size, size, (0.95, 0.85))
    return {
        "size": size,
        "latent_tokens": int(latents.shape[1]),
        "reference_tokens": int(reference_tokens.shape[0]),
        "condition_tokens": int(embeds.shape[1]),
        "stage1_step_seconds": summary([t / 5 for t in step_times["stage1"]]),
        "reference_step_seconds": summary([t / 5 for t in step_times["with_references"]]),
        "stage1_over_reference_step": ratios(step_times, "stage1", "with_references"),
        "steps_per_stage": list(plan.counts),
        "image_seconds_plan": summary(image_times["plan"]),
        "image_seconds_every_step_full": summary(image_times["no_plan"]),
        "plan_over_full": ratios(image_times, "plan", "no_plan"),
    }


def _cost_pipeline(name: str, checkpoint: Path, work: Path):
    """The pipeline `bench_cost` measures: the squeeze pipeline's small checkpoint, or another registered
    pipeline's tiny twin with its transformer swapped for one of the small size (width 256, 4 blocks of
    attention), so that, as with the small squeeze model, the transformer's arithmetic dominates its time."""
    from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel

    from squeeze_cli.pipelines.registry import pipeline_spec
    from squeeze_cli.pipelines.tiny import _TRANSFORMER_SIZES

    spec = pipeline_spec(name)
    if spec.takes_components:
        return spec.load_class().from_pretrained(checkpoint)
    pipe = spec.load_class().from_pretrained(spec.build_tiny(work / f"tiny-{name}"))
    config = pipe.transformer.config
    torch.manual_seed(0)
    if isinstance(pipe.transformer, FluxTransformer2DModel):
        small = {**_TRANSFORMER_SIZES["small"], "joint_attention_dim": config.joint_attention_dim}
        small["pooled_projection_dim"] = config.pooled_projection_dim
        pipe.transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, guidance_embeds=True, **small)
    else:
        pipe.transformer = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=64,
            out_channels=16,
            num_layers=4,
            attention_head_dim=64,
            num_attention_heads=4,
            joint_attention_dim=config.joint_attention_dim,
            axes_dims_rope=(16, 24, 24),
        )
    return pipe


def _condition_tokens(pipe, subjects: dict, prompt: str) -> dict[int, int]:
    """The condition length the transformer reads with n references, from the pipeline's own encoders."""
    if hasattr(pipe, "encode_instruction") and hasattr(pipe, "_batch_encodings"):  # Qwen-Image-Edit
        return {n: pipe.encode_instruction(subject, prompt).shape[0] for n, subject in subjects.items()}
    if hasattr(pipe, "max_sequence_length"):  # FLUX.1 Kontext: T5 padded to its length
        return dict.fromkeys(subjects, pipe.max_sequence_length)
    embeds, _, _ = pipe.encode_prompt(prompt, next(iter(subjects.values())))
    per_reference = subjects[1].image_tokens.shape[0]
    return {n: embeds.shape[1] + (n - 1) * per_reference for n in subjects}


def bench_cost(args: argparse.Namespace, checkpoint: Path, work: Path, name: str = "squeeze") -> dict:
    """Transformer seconds per image with 1, 2 and 4 references against the pipeline's cost model
    (`registry.PIPELINES[name].estimate_cost`), given the model's real width and condition tokens: does the
    cost model rank jobs right?"""
    from squeeze_cli.params import SamplingParams
    from squeeze_cli.pipelines.cost import StepTokens, estimate_cost
    from squeeze_cli.pipelines.registry import pipeline_spec

    spec = pipeline_spec(name)
    pipe = _cost_pipeline(name, checkpoint, work)
    pipe.set_progress_bar_config(disable=True)
    size, prompt, counts = args.size_px, "a teapot on the beach", (1, 2, 4)
    rng = np.random.default_rng(0)
    photos = [
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(max(counts))
    ]
    subjects = {n: pipe.encode_subject(photos[:n], reference_size=size) for n in counts}
    transformer_seconds = {n: [] for n in counts}
    active: list[int] = []

    def timed(module, inputs, output) -> None:
        transformer_seconds[active[0]][-1] += time.process_time() - started[0]

    started = [0.0]
    pre = pipe.transformer.register_forward_pre_hook(lambda *_: started.__setitem__(0, time.process_time()))
    post = pipe.transformer.register_forward_hook(timed)

    def image(n: int) -> Callable[[], None]:
        def run() -> None:
            active[:] = [n]
            transformer_seconds[n].append(0.0)
            pipe(
                prompt,
                subject_condition=subjects[n],
                height=size,
                width=size,
                num_inference_steps=28,
                generator=[torch.Generator().manual_seed(0)],
                output_type="np",
            )

        return run

    alternate({f"{n} references": image(n) for n in counts}, args.rounds)
    pre.remove()
    post.remove()
    config = pipe.transformer.config
    width = config.num_attention_heads * config.attention_head_dim
    condition = _condition_tokens(pipe, subjects, prompt)
    per_reference = condition[2] - condition[1]
    tokens = StepTokens(width, per_reference, condition[1] - per_reference, counts_instruction=False)
    params = SamplingParams(height=size, width=size, num_inference_steps=28, reference_size=size)
    predicted = {n: estimate_cost(params, n, prompt, tokens=tokens, staged=spec.staged) for n in counts}
    measured = {n: times[1:] for n, times in transformer_seconds.items()}  # the first round warms up
    return {
        "pipeline": name,
        "size": size,
        "transformer_width": width,
        "condition_tokens": condition,
        "transformer_cpu_seconds": {n: summary(times) for n, times in measured.items()},
        "measured_over_one_reference": {
            n: summary([a / b for a, b in zip(measured[n], measured[1], strict=True)]) for n in counts[1:]
        },
        "predicted_over_one_reference": {n: predicted[n] / predicted[1] for n in counts[1:]},
        "predicted_full_size_over_one_reference": {
            n: spec.estimate_cost(params, n, prompt) / spec.estimate_cost(params, 1, prompt)
            for n in counts[1:]
        },
    }


def _teapot_images(pipe, subject, size: int, prompts: list[str], **kwargs) -> np.ndarray:
    """One image per prompt of the teapot subject at 28 steps, seed 0, as floats in [0, 1]."""
    with torch.no_grad():
        return np.stack(
            [
                pipe(
                    prompt,
                    subject_condition=subject,
                    height=size,
                    width=size,
                    num_inference_steps=28,
                    generator=[torch.Generator().manual_seed(0)],
                    output_type="np",
                    **kwargs,
                ).images[0]
                for prompt in prompts
            ]
        )


def pixel_difference(pixels: np.ndarray, exact: np.ndarray) -> dict[str, float]:
    """Mean and max |Δ| in 0–255 levels and PSNR (dB) of images in [0, 1] against the exact ones."""
    difference = np.abs(pixels.astype(np.float64) - exact)
    mse = float((difference**2).mean())
    return {
        "mean_abs_levels": float(difference.mean() * 255),
        "max_abs_levels": float(difference.max() * 255),
        "psnr_db": float("inf") if mse == 0 else float(10 * np.log10(1 / mse)),
    }


def parse_taylorseer(text: str):
    """`INTERVAL:WARMUP:ORDER` (e.g. `5:3:1`) as a taylorseer `StepCache`."""
    from squeeze_cli.params import StepCache

    interval, warmup, order = (int(part) for part in text.split(":"))
    return StepCache("taylorseer", interval=interval, warmup_steps=warmup, order=order)


def bench_step_cache(args: argparse.Namespace, checkpoint: Path) -> dict:
    from squeeze_cli.params import StepCache

    pipe, subject = _teapot_subject(checkpoint, args.size_px)
    size = args.size_px
    prompts = ["a teapot on the beach", "a teapot in the snow"][: max(1, min(args.prompts, 2))]
    passes = {"count": 0}
    tail = pipe.transformer.single_transformer_blocks[-1].proj_out
    tail.register_forward_hook(lambda *_: passes.__setitem__("count", passes["count"] + 1))

    def images(step_cache) -> np.ndarray:
        return _teapot_images(pipe, subject, size, prompts, step_cache=step_cache)

    caches = {f"first_block {t}": StepCache("first_block", t) for t in args.cache_thresholds}
    caches |= {f"taylorseer {text}": parse_taylorseer(text) for text in args.taylorseer}
    variants = {"exact": None, **caches}
    cpu: dict[str, list[float]] = {}
    times = alternate(
        {name: (lambda c=cache: images(c)) for name, cache in variants.items()}, args.rounds, cpu
    )
    exact = images(None)
    report: dict = {"size": size, "images_per_round": len(prompts), "variants": {}}
    for name, cache in variants.items():
        passes["count"] = 0
        pixels = images(cache)
        report["variants"][name] = {
            "images_per_second": summary([len(prompts) / t for t in times[name]]),
            "speed_up": ratios(times, "exact", name),
            "speed_up_cpu": ratios(cpu, "exact", name),
            "transformer_passes_per_image": passes["count"] / len(prompts),
            **pixel_difference(pixels, exact),
        }
    return report


def bench_compile(args: argparse.Namespace, checkpoint: Path) -> dict:
    """`model.compile: true` (regional torch.compile, through `load_pipeline`) against eager, side by side."""
    from squeeze_cli.loading import load_pipeline
    from squeeze_cli.manifest.schema import ModelSpec

    size = args.size_px
    prompts = ["a teapot on the beach", "a teapot in the snow"][: max(1, min(args.prompts, 2))]
    references = [Image.open(p).convert("RGB") for p in sorted((ROOT / "examples/images/teapot").glob("*"))]
    pipes = {
        name: load_pipeline(ModelSpec(pipeline=str(checkpoint), dtype="float32", compile=name == "compiled"))
        for name in ("eager", "compiled")
    }
    subjects = {name: pipe.encode_subject(references, reference_size=size) for name, pipe in pipes.items()}

    def images(name: str) -> np.ndarray:
        return _teapot_images(pipes[name], subjects[name], size, prompts)

    # The first round of each, apart: the compiled one pays for compiling every sequence length it meets.
    first: dict[str, float] = {}
    for name in pipes:
        started = time.perf_counter()
        images(name)
        first[name] = time.perf_counter() - started
    cpu: dict[str, list[float]] = {}
    times = alternate({name: (lambda n=name: images(n)) for name in pipes}, args.rounds, cpu)
    return {
        "size": size,
        "images_per_round": len(prompts),
        "first_round_seconds": first,
        "warm_up_seconds": first["compiled"] - statistics.median(times["compiled"]),
        "images_per_second": {n: summary([len(prompts) / t for t in times[n]]) for n in pipes},
        "speed_up": ratios(times, "eager", "compiled"),
        "speed_up_cpu": ratios(cpu, "eager", "compiled"),
        **pixel_difference(images("compiled"), images("eager")),
    }


def write_gen_project(folder: Path, checkpoint: Path, args: argparse.Namespace) -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_naive_loop import write_project

    settings = argparse.Namespace(
        family="internvl",
        subjects=4,
        prompts=args.prompts,
        seeds=2,
        size_px=args.size_px,
        reference_size=args.size_px,
        steps=args.steps,
    )
    manifest, _ = write_project(folder, checkpoint, settings)
    return manifest


def bench_overhead(args: argparse.Namespace, manifest: Path, work: Path) -> dict:
    from forward_timers import ForwardTimers

    from squeeze_cli.cli import main

    def gen(out: Path) -> dict:
        try:
            main(["gen", str(manifest), "--out", str(out), "--overwrite", "--quiet"])
        except SystemExit as exit_:
            if exit_.code not in (0, None):
                raise RuntimeError(f"squeeze gen exited with {exit_.code}") from None
        return json.loads((out / "run.json").read_text())

    gen(work / "warm")
    shares, totals = [], []
    for round_ in range(args.rounds):
        with ForwardTimers() as timers:
            started = time.perf_counter()
            run = gen(work / f"overhead{round_}")
            total = time.perf_counter() - started
        after_load = total - run["timings"]["load"]
        shares.append((after_load - timers.model_seconds()) / after_load)
        totals.append(after_load)
    profiler = cProfile.Profile()
    profiler.enable()
    gen(work / "profiled")
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text).sort_stats("tottime")
    stats.print_stats(r"squeeze_cli|PIL|yaml|json|png|zlib", 15)
    return {
        "share_outside_forwards": summary(shares),
        "after_load_seconds": summary(totals),
        "profile_top_tottime": [line for line in text.getvalue().splitlines() if line.strip()][-17:],
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_processes(args: argparse.Namespace, manifest: Path, work: Path) -> dict:
    base_env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    base_env["HF_HUB_OFFLINE"] = "1"
    cores = len(os.sched_getaffinity(0))

    def command(processes: int, out: Path) -> list[str]:
        gen = ["-m", "squeeze_cli", "gen", str(manifest), "--out", str(out), "--overwrite", "--quiet"]
        if processes == 1:
            return [sys.executable, *gen]
        return [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(processes),
            "--num_machines",
            "1",
            "--main_process_port",
            str(_free_port()),
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            *gen,
        ]

    results: dict[str, list[float]] = {}

    def variant(name: str, processes: int, env: dict) -> Callable[[], None]:
        def run() -> None:
            out = work / name.replace(" ", "-")
            done = subprocess.run(
                command(processes, out), env=env, capture_output=True, text=True, timeout=1800
            )
            if done.returncode != 0:
                raise RuntimeError(f"{name} exited {done.returncode}: {done.stderr[-3000:]}")
            summary_ = json.loads((out / "run.json").read_text())
            results.setdefault(name, []).append(summary_["images_per_second"])

        return run

    variants = {
        "1 process": variant("1 process", 1, {**base_env, "OMP_NUM_THREADS": "1"}),
        "2 processes": variant("2 processes", 2, base_env),
    }
    if args.all_process_variants:  # slow on a loaded machine: all-core threads spin against other jobs
        variants["1 process, all cores"] = variant("1 process, all cores", 1, base_env)
        variants[f"2 processes, {cores} threads each"] = variant(
            f"2 processes, {cores} threads each", 2, {**base_env, "OMP_NUM_THREADS": str(cores)}
        )
    wall = alternate(variants, args.rounds)
    for name in results:
        results[name] = results[name][1:]  # the warm-up round
    return {
        "cores": cores,
        "wall_seconds": {name: summary(times) for name, times in wall.items()},
        "generate_images_per_second": {name: summary(v) for name, v in results.items()},
        "speed_up_wall": {name: ratios(wall, "1 process", name) for name in wall if name != "1 process"},
    }


def bench_threads(args: argparse.Namespace, manifest: Path, work: Path) -> dict:
    base_env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    base_env["HF_HUB_OFFLINE"] = "1"
    cores = len(os.sched_getaffinity(0))
    speeds: dict[str, list[float]] = {}
    chosen: list[dict] = []

    def variant(name: str, flags: list[str], env: dict) -> Callable[[], None]:
        def run() -> None:
            out = work / f"threads-{name.replace(' ', '-')}"
            command = [sys.executable, "-m", "squeeze_cli", "gen", str(manifest), "--out", str(out)]
            done = subprocess.run(
                [*command, "--overwrite", "--json", *flags], env=env, capture_output=True, text=True
            )
            if done.returncode != 0:
                raise RuntimeError(f"{name} exited {done.returncode}: {done.stderr[-3000:]}")
            events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
            started = next(event for event in events if event["event"] == "run_started")
            if name == "chosen":
                chosen.append({key: started[key] for key in ("threads", "threads_from")})
            speeds.setdefault(name, []).append(
                json.loads((out / "run.json").read_text())["images_per_second"]
            )

        return run

    variants = {
        "chosen": variant("chosen", [], base_env),
        f"{cores} threads": variant(f"{cores} threads", ["--threads", str(cores)], base_env),
        "1 thread": variant("1 thread", [], {**base_env, "OMP_NUM_THREADS": "1"}),
    }
    wall = alternate(variants, args.rounds)
    speeds = {name: values[1:] for name, values in speeds.items()}  # the warm-up round
    return {
        "cores": cores,
        "chosen": chosen[1:],
        "wall_seconds": {name: summary(times) for name, times in wall.items()},
        "generate_images_per_second": {name: summary(values) for name, values in speeds.items()},
        "speed_up_wall": {name: ratios(wall, name, "chosen") for name in wall if name != "chosen"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="+", default=["prefix", "stages", "overhead", "processes"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--size-px", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--cache-thresholds", type=float, nargs="+", default=[0.08, 0.2])
    parser.add_argument(
        "--taylorseer",
        nargs="*",
        default=["5:3:1"],
        metavar="INTERVAL:WARMUP:ORDER",
        help="step_cache: taylorseer settings to measure (none: first_block only)",
    )
    parser.add_argument("--quick", action="store_true", help="3 rounds, 2 prompts per subject")
    parser.add_argument(
        "--all-process-variants",
        action="store_true",
        help="processes: also 1 process with all cores, and 2 processes with all cores each",
    )
    parser.add_argument(
        "--pipelines",
        nargs="+",
        default=["squeeze"],
        help="cost: the registered pipelines to measure (squeeze, kontext, qwen-image-edit-plus)",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.prompts = 3, 2
    sys.path.insert(0, str(Path(__file__).parent))
    from squeeze_cli.pipelines.tiny import build_small_pipeline

    report: dict = {"threads": torch.get_num_threads(), "rounds": args.rounds}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint = build_small_pipeline(work / "ckpt")
        project = work / "project"
        project.mkdir()
        manifest = write_gen_project(project, checkpoint, args)
        if "prefix" in args.only:
            report["prefix"] = r = bench_prefix(args)
            print(
                f"prefix cache: {r['prompts']} prompts, 3 × 448-px references ({r['image_tokens']} image "
                f"tokens, sequence {r['sequence']}): full {fmt(r['full_seconds'], ' s')}, cached "
                f"{fmt(r['cached_seconds'], ' s')}, cached/full {fmt(r['cached_over_full'])}",
                flush=True,
            )
        if "stages" in args.only:
            report["stages"] = r = bench_stages(args, checkpoint)
            print(
                f"stages at {r['size']}² ({r['latent_tokens']} latent + {r['reference_tokens']} reference + "
                f"{r['condition_tokens']} condition tokens): stage-1 step "
                f"{fmt(r['stage1_step_seconds'], ' s')}, "
                f"with references {fmt(r['reference_step_seconds'], ' s')}, ratio "
                f"{fmt(r['stage1_over_reference_step'])}; per image (28 steps, {r['steps_per_stage']}) plan "
                f"{fmt(r['image_seconds_plan'], ' s')} vs every step full "
                f"{fmt(r['image_seconds_every_step_full'], ' s')}: {fmt(r['plan_over_full'])}",
                flush=True,
            )
        if "cost" in args.only:
            report["cost"] = {}
            for name in args.pipelines:
                report["cost"][name] = r = bench_cost(args, checkpoint, work, name)
                for n, stats in r["measured_over_one_reference"].items():
                    print(
                        f"cost model, {name}, at {r['size']}², 28 steps, {n} references / 1: transformer CPU "
                        f"time ×{fmt(stats, digits=2)}, "
                        f"predicted ×{r['predicted_over_one_reference'][n]:.2f} "
                        f"(width {r['transformer_width']}, condition tokens by references "
                        f"{r['condition_tokens']})",
                        flush=True,
                    )
        if "step_cache" in args.only:
            report["step_cache"] = r = bench_step_cache(args, checkpoint)
            for name, v in r["variants"].items():
                print(
                    f"step cache at {r['size']}², 28 steps, {name}: {fmt(v['images_per_second'], ' img/s')}, "
                    f"speed-up ×{fmt(v['speed_up'], digits=2)} "
                    f"(CPU time ×{fmt(v['speed_up_cpu'], digits=2)}), "
                    f"{v['transformer_passes_per_image']:.1f} full "
                    f"passes/image, |Δ| mean {v['mean_abs_levels']:.2f} max {v['max_abs_levels']:.1f} lv, "
                    f"PSNR {v['psnr_db']:.1f} dB",
                    flush=True,
                )
        if "compile" in args.only:
            report["compile"] = r = bench_compile(args, checkpoint)
            print(
                f"compile at {r['size']}², 28 steps: first round (compiling) "
                f"{r['first_round_seconds']['compiled']:.1f} s vs eager "
                f"{r['first_round_seconds']['eager']:.1f} s "
                f"(warm-up ≈ {r['warm_up_seconds']:.1f} s); then eager "
                f"{fmt(r['images_per_second']['eager'], ' img/s')}, compiled "
                f"{fmt(r['images_per_second']['compiled'], ' img/s')}: ×{fmt(r['speed_up'], digits=2)} "
                f"(CPU time ×{fmt(r['speed_up_cpu'], digits=2)}); |Δ| mean {r['mean_abs_levels']:.4f} max "
                f"{r['max_abs_levels']:.3f} lv",
                flush=True,
            )
        if "overhead" in args.only:
            report["overhead"] = r = bench_overhead(args, manifest, work)
            print(
                f"gen after load: {fmt(r['after_load_seconds'], ' s')}, outside model forwards "
                f"{fmt(r['share_outside_forwards'], ' %', 100, 1)}",
                flush=True,
            )
            print("\n".join("    " + line for line in r["profile_top_tottime"]), flush=True)
        if "processes" in args.only:
            shutil.rmtree(project / "squeeze-out", ignore_errors=True)
            report["processes"] = r = bench_processes(args, manifest, work)
            for name, stats in r["wall_seconds"].items():
                line = f"{name:<28} wall {fmt(stats, ' s', digits=1)}"
                if name in r["speed_up_wall"]:
                    line += f", speed-up ×{fmt(r['speed_up_wall'][name], digits=2)}"
                if name in r["generate_images_per_second"]:
                    line += f", generate {fmt(r['generate_images_per_second'][name], ' img/s')}"
                print(line, flush=True)
        if "threads" in args.only:
            load_before = os.getloadavg()
            report["threads"] = r = bench_threads(args, manifest, work)
            r["load_average"] = {"before": load_before, "after": os.getloadavg()}
            print(f"threads: {r['cores']} cores, chosen {r['chosen']}, load average {r['load_average']}")
            for name, stats in r["wall_seconds"].items():
                line = f"{name:<12} wall {fmt(stats, ' s', digits=1)}"
                line += f", generate {fmt(r['generate_images_per_second'][name], ' img/s')}"
                if name in r["speed_up_wall"]:
                    line += f"; chosen is ×{fmt(r['speed_up_wall'][name], digits=2)} faster by wall time"
                print(line, flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
