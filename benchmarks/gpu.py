"""Full-size speed, memory and MFU of every shipped recipe on one GPU, with random weights.

    python benchmarks/gpu.py --quick --out results/        # GPU: one recipe per transformer, ≤ 4 minutes
    python benchmarks/gpu.py --out results/                # GPU: every recipe, the recipes' own step counts
    python benchmarks/gpu.py --small --out /tmp/gpu-small  # CPU: every recipe's tiny twin, end to end

Each recipe's pipeline is its tiny twin's (tokenizers, scheduler, processors) with the networks replaced by
full-size ones built from `gpu_configs.json` beside this file, random bf16 weights initialised on the GPU
(nothing is downloaded; `benchmarks/gpu/run.sh` runs this on a machine without network). It encodes one
subject (one reference) per reference size, then measures at 512² and 1024²: batch 1 and 2, the squeeze
stage plan on (τ 0.95 / 0.85) and off (every step sees the MLLM condition and the reference tokens), and,
without `--quick`, larger batches and `enable_model_cpu_offload`. Each case: one warm-up call that also
counts the transformer's FLOPs of each step (torch's FlopCounterMode), then `--repeats` timed calls, the
peak GPU memory, and the time of every step (from its first transformer forward to the step callback,
synchronised).

`--quick` runs fewer steps than the recipe (4; 6 for the staged squeeze plan, so that all three stages run)
and gives seconds per image at the recipe's own step count: the measured call plus, per stage, the missing
steps at that stage's median step time. MFU is the transformer's FLOPs per image (at the recipe's steps)
over seconds per image and the card's dense bf16 peak (H100 SXM and H200: 989 TFLOP/s; an unknown card:
the measured matmul rate); `transformer MFU` divides by the transformer steps' time alone.
Results go to `OUT/gpu_results.json` (written after every case) and a table on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib
import json
import platform
import resource
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
import transformers
from PIL import Image

HERE = Path(__file__).resolve().parent
CONFIGS = json.loads((HERE / "gpu_configs.json").read_text())
PROMPTS = ["a dog on the beach", "a dog in the snow", "a dog on a wooden floor", "a purple dog"]
# Dense bf16 tensor-core peaks (TFLOP/s) from NVIDIA's datasheets, matched in this order against the
# card's name; the H200 is the H100 SXM's chip with more memory.
CARD_PEAKS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
# The squeeze pipeline's stage plan: the recipe's own thresholds, or every step with every condition.
PLAN_OFF = {"stage_thresholds": (1.0, 0.0), "keep_mllm_condition": True}
# Sampling keys a case sets itself, not taken from the recipe.
CASE_KEYS = ("height", "width", "num_inference_steps", "reference_size")


def _load(path: str) -> Any:
    module, name = path.split(":", 1)
    return getattr(importlib.import_module(module), name)


# ------------------------------------------------------------------------------------------------------
# Building


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Parameters created in `dtype`: a 20B+ model never exists in float32 (which would not fit)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(
    name: str,
    device: str,
    dtype: torch.dtype,
    *,
    class_path: str | None = None,
    token_ids: dict[str, int] | None = None,
    layers: int | None = None,
) -> torch.nn.Module:
    """The network `name` of `gpu_configs.json` with random weights on `device` (`meta`: no memory).

    `token_ids` are set in its config (the tokenizer it runs with is the tiny twin's); `layers` builds a
    stand-in with that many decoder layers and the real width.
    """
    entry = CONFIGS["models"][name]
    cls = _load(class_path or entry["class"])
    config = copy.deepcopy(entry["config"])
    if layers is not None:
        (config.get("text_config") or config)["num_hidden_layers"] = layers
    with torch.device(device), _default_dtype(dtype):
        if issubclass(cls, transformers.PreTrainedModel):
            model = cls(cls.config_class(**config, **(token_ids or {})))
        else:
            model = cls(**config)
    return model.to(dtype=dtype).eval().requires_grad_(False)


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_models(recipe: str, device: str, dtype: torch.dtype, tiny: dict[str, Any] | None = None) -> dict:
    """The full-size networks of `recipe` (stand-ins where its entry says so); `tiny` gives token ids."""
    entry = CONFIGS["recipes"][recipe]
    models = {}
    for part, name in entry["models"].items():
        token_ids = None
        if tiny is not None and isinstance(tiny.get(part), transformers.PreTrainedModel):
            token_ids = {
                key: value
                for key, value in tiny[part].config.to_dict().items()
                if key.endswith(("_token_id", "_token_index")) and isinstance(value, int)
            }
        models[part] = build_model(
            name,
            device,
            dtype,
            class_path=entry.get("model_classes", {}).get(part),
            token_ids=token_ids,
            layers=entry.get("stand_in", {}).get(part, {}).get("layers"),
        )
    return models


def stand_in_parameter_counts(recipe: str) -> dict[str, int]:
    """Parameters each stand-in of `recipe` has at its real size, counted on `meta` (no memory)."""
    entry = CONFIGS["recipes"][recipe]
    return {
        part: parameter_count(build_model(entry["models"][part], "meta", torch.bfloat16))
        for part in entry.get("stand_in", {})
    }


def build_pipeline(recipe_name: str, device: str, dtype: torch.dtype, small: bool):
    """`recipe_name`'s pipeline: its tiny twin, with full-size random networks unless `small`."""
    from squeeze_cli.manifest.recipes import load_recipe
    from squeeze_cli.pipelines.registry import pipeline_spec

    recipe = load_recipe(recipe_name)
    entry = CONFIGS["recipes"][recipe_name]
    options = {**entry.get("tiny_options", {}), **(entry.get("small_options", {}) if small else {})}
    components = _load(entry["tiny"])(seed=0, **options)
    if not small:
        torch.manual_seed(0)
        components.update(build_models(recipe_name, device, dtype, tiny=components))
        for part, processor in entry.get("processors", {}).items():
            components[part] = _load(processor["class"])(**processor["config"])
        for part, length in entry.get("tokenizer_max_length", {}).items():
            components[part].model_max_length = length
    pipe = pipeline_spec(recipe.model.pipeline_class).load_class()(**components)
    if small:
        pipe.to(device=device, dtype=dtype)
    if recipe.model.mllm is not None and not small:  # the real processors' options, not the twin's
        pipe.set_mllm_options(**recipe.model.mllm.encoder_options())
    pipe.set_progress_bar_config(disable=True)
    return pipe, recipe


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


def card_peak(device: str, measured: float) -> tuple[float, str]:
    """The card's dense bf16 peak in FLOP/s and where it came from (its datasheet, else measured)."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        for key, tflops in CARD_PEAKS:
            if key in name:
                return tflops * 1e12, f"datasheet ({key} dense bf16)"
    return measured, "measured matmul rate"


def peak_memory_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS (never reset)


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class StepClock:
    """Each denoising step's time, from its first transformer forward to the pipeline's step callback (both
    synchronised), and with `count_flops` the FLOPs it ran (FlopCounterMode, which slows it)."""

    def __init__(self, transformer: torch.nn.Module, device: str, count_flops: bool = False):
        self.transformer, self.device, self.count_flops = transformer, device, count_flops
        self.seconds: list[float] = []
        self.flops: list[float] = []
        self._started: float | None = None
        self._mode: Any = None

    def __enter__(self) -> StepClock:
        self._handle = self.transformer.register_forward_pre_hook(self._start)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()
        if self._mode is not None:
            self._mode.__exit__(None, None, None)

    def _start(self, module: torch.nn.Module, args: Any) -> None:
        if self._started is not None:
            return  # a later forward of the same step (true CFG)
        synchronize(self.device)
        self._started = time.perf_counter()
        if self.count_flops:
            from torch.utils.flop_counter import FlopCounterMode

            self._mode = FlopCounterMode(display=False)
            self._mode.__enter__()

    def callback(self, pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self.flops.append(float(self._mode.get_total_flops()))
            self._mode = None
        synchronize(self.device)
        assert self._started is not None, "a step callback before any transformer forward"
        self.seconds.append(time.perf_counter() - self._started)
        self._started = None
        return {}


def step_stages(pipe: Any, output: Any, steps: int, params: dict) -> list[int]:
    """The stage of each of `steps` steps: the squeeze stage plan's (1, 2, 3), else 0 for every step.
    With `output` the plan the call ran; without, the plan for `steps` steps with `params`."""
    if output is not None:
        plan = getattr(output, "stage_plan", None)
        return list(plan.stages) if plan is not None else [0] * steps
    if "stage_thresholds" not in params:
        return [0] * steps
    from squeeze_cli.pipelines.stages import stage_plan

    return list(
        stage_plan(
            steps,
            params["height"],
            params["width"],
            params["stage_thresholds"],
            pipe.scheduler.config,
            pipe.vae_scale_factor,
        ).stages
    )


def project(
    calls: list[tuple[float, list[float]]], ran: list[int], planned: list[int], batch: int
) -> tuple[dict[int, float], list[float]]:
    """Seconds per image of each timed call (its wall time and its steps' times, the steps of stages `ran`)
    had it run the steps of stages `planned`: plus, per stage, each missing step at that stage's median step
    time over every call (minus each extra one). Returns those medians and the projections."""
    missing = set(planned) - set(ran)
    if missing:
        raise ValueError(f"stages {sorted(missing)} do not run in {len(ran)} steps; run more steps")
    step_seconds = {
        stage: statistics.median(
            s for _, seconds in calls for st, s in zip(ran, seconds, strict=True) if st == stage
        )
        for stage in set(ran)
    }
    extra = sum((planned.count(st) - ran.count(st)) * step_seconds[st] for st in set(ran))
    return step_seconds, [(wall + extra) / batch for wall, _ in calls]


def measure(pipe, condition, params: dict, batch: int, steps: int, repeats: int, device: str) -> dict:
    """One case: warm-up (FLOPs counted), then `repeats` timed calls of `params["num_inference_steps"]`
    steps; seconds per image projected to `steps` steps, stage by stage."""
    prompts = (PROMPTS * batch)[:batch]

    def call(clock: StepClock) -> tuple[Any, float]:
        synchronize(device)
        started = time.perf_counter()
        with clock:
            output = pipe(
                prompts,
                subject_condition=condition,
                generator=[torch.Generator().manual_seed(i) for i in range(batch)],
                callback_on_step_end=clock.callback,
                **params,
            )
        synchronize(device)
        return output, time.perf_counter() - started

    reset_peak(device)
    counter = StepClock(pipe.transformer, device, count_flops=True)
    output, _ = call(counter)
    ran = step_stages(pipe, output, params["num_inference_steps"], params)
    flops = dict(zip(ran, counter.flops, strict=True))  # every step of a stage runs the same shapes
    calls = []
    for _ in range(repeats):
        clock = StepClock(pipe.transformer, device)
        calls.append((call(clock)[1], clock.seconds))
    planned = step_stages(pipe, None, steps, params)
    step_seconds, per_image = project(calls, ran, planned, batch)
    measured = [wall / batch for wall, _ in calls]
    flops_per_image = sum(flops[st] for st in planned) / batch
    transformer_seconds = sum(step_seconds[st] for st in planned) / batch
    return {
        "steps_run": len(ran),
        "stages_run": ran if any(ran) else None,
        "seconds_per_image": _spread(per_image),
        "measured_seconds_per_image": _spread(measured),
        "step_seconds": {str(st): round(s, 5) for st, s in sorted(step_seconds.items())},
        "transformer_tflops_per_image": round(flops_per_image / 1e12, 4),
        "peak_memory_gib": round(peak_memory_gib(device), 3),
        "_flops_per_image": flops_per_image,
        "_transformer_seconds": transformer_seconds,
    }


def _spread(samples: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(samples), 5),
        "min": round(min(samples), 5),
        "max": round(max(samples), 5),
    }


# ------------------------------------------------------------------------------------------------------


def case_plan(staged: bool, sizes: list[int], batches: list[int]) -> list[tuple[int, str | None, int]]:
    """(size, stage plan, batch) of every case: batch 1 (plan on and off where there is a plan), then the
    larger batches (plan on); at 1024² no batch above 2 (memory, not speed)."""
    cases: list[tuple[int, str | None, int]] = []
    for size in sizes:
        cases += [(size, plan, 1) for plan in (("on", "off") if staged else (None,))]
        cases += [(size, "on" if staged else None, b) for b in batches if b > 1 and (size < 1024 or b <= 2)]
    return cases


@dataclass
class Bench:
    """One run's settings and results; `recipe` measures one recipe, writing the report after each case."""

    out: Path
    device: str
    dtype: torch.dtype
    small: bool
    quick: bool
    sizes: list[int]
    batches: list[int]
    repeats: int
    steps: int | None
    offload: bool
    budget: float | None
    peak: float
    environment: dict
    started: float = field(default_factory=time.perf_counter)
    models: dict[str, dict] = field(default_factory=dict)
    cases: list[dict] = field(default_factory=list)
    reference: Image.Image = field(
        default_factory=lambda: Image.fromarray(
            np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
        )
    )

    def write(self) -> None:
        report = {"environment": self.environment, "models": self.models, "cases": self.cases}
        (self.out / "gpu_results.json").write_text(json.dumps(report, indent=2))

    def skipped(self) -> str | None:
        if self.budget is not None and time.perf_counter() - self.started > self.budget:
            return f"time budget of {self.budget:.0f} s spent"
        return None

    def record(self, case: dict) -> None:
        self.cases.append(case)
        print(_row(case), flush=True)
        self.write()

    def recipe(self, name: str) -> None:
        if reason := self.skipped():
            self.record({"recipe": name, "skipped": reason})
            return
        build_started = time.perf_counter()
        try:
            pipe, recipe = build_pipeline(name, self.device, self.dtype, self.small)
        except Exception as error:  # one recipe that cannot be built (out of memory) must not lose the rest
            _free(self.device)
            self.record({"recipe": name, "error": _message(error)})
            return
        defaults = recipe.defaults.explicit(recipe.model.pipeline_class)
        sampling = {k: v for k, v in defaults.items() if k not in CASE_KEYS and k in pipe.sampling_parameters}
        staged = "stage_thresholds" in sampling
        recipe_steps = defaults.get("num_inference_steps", 28)
        run_steps = self.steps or (min(recipe_steps, 6 if staged else 4) if self.quick else recipe_steps)
        entry = CONFIGS["recipes"][name]
        on_gpu = self.device.startswith("cuda")
        self.models[name] = {
            "build_seconds": round(time.perf_counter() - build_started, 1),
            "parameters": {part: parameter_count(getattr(pipe, part)) for part in entry["models"]},
            "stand_in": entry.get("stand_in", {}),
            "stand_in_real_parameters": {} if self.small else stand_in_parameter_counts(name),
            "weights_gib": round(torch.cuda.memory_allocated() / 2**30, 3) if on_gpu else None,
            "recipe_steps": recipe_steps,
            "sampling": {k: list(v) if isinstance(v, tuple) else v for k, v in sampling.items()},
        }
        print(f"{name}: built in {self.models[name]['build_seconds']} s", flush=True)
        conditions: dict[int, tuple[Any, float]] = {}
        reference_size_default = defaults.get("reference_size")

        def run(size: int, plan: str | None, batch: int, offloaded: bool) -> None:
            case: dict[str, Any] = {
                "recipe": name,
                "size": size,
                "stage_plan": plan,
                "batch": batch,
                "offload": "model" if offloaded else "none",
                "steps": recipe_steps,
            }
            if reason := self.skipped():
                self.record({**case, "skipped": reason})
                return
            try:
                reference_size = min(size, reference_size_default or size)
                if reference_size not in conditions:
                    encode_started = time.perf_counter()
                    condition = pipe.encode_subject([self.reference], reference_size=reference_size)
                    synchronize(self.device)
                    conditions[reference_size] = (condition, time.perf_counter() - encode_started)
                condition, encode_seconds = conditions[reference_size]
                params = {
                    **sampling,
                    **(PLAN_OFF if plan == "off" else {}),
                    "height": size,
                    "width": size,
                    "num_inference_steps": run_steps,
                }
                result = measure(pipe, condition, params, batch, recipe_steps, self.repeats, self.device)
            except Exception as error:  # one failing case (e.g. out of memory) must not lose the others
                _free(self.device)
                self.record({**case, "error": _message(error)})
                return
            flops = result.pop("_flops_per_image")
            transformer_seconds = result.pop("_transformer_seconds")
            seconds = result["seconds_per_image"]["median"]
            self.record(
                {
                    **case,
                    "reference_size": reference_size,
                    "encode_subject_seconds": round(encode_seconds, 4),
                    **result,
                    "mfu": round(flops / seconds / self.peak, 4) if seconds else None,
                    "transformer_mfu": (
                        round(flops / transformer_seconds / self.peak, 4) if transformer_seconds else None
                    ),
                }
            )

        for size, plan, batch in case_plan(staged, self.sizes, self.batches):
            run(size, plan, batch, offloaded=False)
        if self.offload:
            pipe.to("cpu")
            pipe.enable_model_cpu_offload(device=self.device)
            for size in self.sizes:
                run(size, "on" if staged else None, 1, offloaded=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_results.json")
    parser.add_argument("--small", action="store_true", help="every recipe's tiny twin on the CPU (CI)")
    parser.add_argument("--quick", action="store_true", help="one recipe per transformer, few steps, ≤ 4 min")
    parser.add_argument("--recipes", nargs="+", default=None, help="default: every recipe (--quick: its own)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--steps", type=int, default=None, help="steps run per call (default: the recipe's)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="default 512 1024 (64 128 small)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="default 2 4 (quick, small: 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per case (3; --quick 1)")
    parser.add_argument("--no-offload", action="store_true", help="skip the model-offload cases")
    parser.add_argument(
        "--budget", type=float, default=None, help="seconds after which no case starts (--quick: 210)"
    )
    args = parser.parse_args()

    # Casts of random models and the PIL image processors' notices would bury the table.
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not args.small and not device.startswith("cuda"):
        sys.exit("gpu.py: no GPU here; the full-size run needs one (use --small for the CPU check)")
    recipes = args.recipes or (CONFIGS["quick_recipes"] if args.quick else list(CONFIGS["recipes"]))
    unknown = sorted(set(recipes) - set(CONFIGS["recipes"]))
    if unknown:
        sys.exit(f"gpu.py: no full-size configs for {unknown}; known: {', '.join(CONFIGS['recipes'])}")
    dtype = torch.float32 if args.small else torch.bfloat16
    started = time.perf_counter()
    rate = matmul_flops_per_second(device, dtype, n=1024 if args.small else 8192)
    peak, peak_source = card_peak(device, rate)
    environment = {
        "device": torch.cuda.get_device_name()
        if device.startswith("cuda")
        else platform.processor() or "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "matmul_tflops": round(rate / 1e12, 3),
        "peak_tflops": round(peak / 1e12, 3),
        "peak_source": peak_source,
        "quick": args.quick,
        "references": 1,
    }
    environment.update(diffusers=diffusers.__version__, transformers=transformers.__version__)
    print(json.dumps(environment), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    bench = Bench(
        out=args.out,
        device=device,
        dtype=dtype,
        small=args.small,
        quick=args.quick,
        sizes=args.sizes or ([64, 128] if args.small else [512, 1024]),
        batches=args.batches or ([2] if args.small or args.quick else [2, 4]),
        repeats=args.repeats or (1 if args.small or args.quick else 3),
        steps=args.steps,
        offload=device.startswith("cuda") and not (args.no_offload or args.quick),
        budget=args.budget if args.budget is not None else (210.0 if args.quick else None),
        peak=peak,
        environment=environment,
        started=started,
    )
    for name in recipes:
        bench.recipe(name)
        _free(device)  # the recipe's pipeline is gone with its call
    bench.write()

    print(f"\n{'case':<52} {'s/image':>22} {'TFLOP/img':>10} {'MFU':>6} {'peak GiB':>9}")
    for case in bench.cases:
        print(_row(case))
    print(f"\n{environment['device']}: peak {environment['peak_tflops']} TFLOP/s ({peak_source})")
    print(f"wrote {args.out / 'gpu_results.json'} ({time.perf_counter() - started:.0f} s)")


def _label(case: dict) -> str:
    if "size" not in case:
        return case["recipe"]
    plan = f" plan {case['stage_plan']}" if case["stage_plan"] else ""
    offload = " offload" if case["offload"] != "none" else ""
    return f"{case['recipe']} {case['size']}²{plan} b{case['batch']}{offload}"


def _row(case: dict) -> str:
    if "seconds_per_image" not in case:
        return f"{_label(case):<52} {case.get('error') or case.get('skipped')}"
    s = case["seconds_per_image"]
    timing = f"{s['median']:.3f} ({s['min']:.3f}–{s['max']:.3f})"
    mfu = f"{case['mfu']:.1%}" if case["mfu"] is not None else "—"
    return (
        f"{_label(case):<52} {timing:>22} {case['transformer_tflops_per_image']:>10.4g} {mfu:>6} "
        f"{case['peak_memory_gib']:>9.1f}"
    )


def _message(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
