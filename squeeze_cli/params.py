"""The shared vocabulary of squeeze, torch-free: the sampling parameters of one image, the paper's
defaults, and the names of dtypes, offload modes and MLLM families.

Written once here; the manifest schema, the CLI (Typer), the loader and the pipeline all read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

# The paper's values (docs/pipeline.md): σ thresholds of the three denoising stages, FLUX guidance.
PAPER_STAGE_THRESHOLDS: tuple[float, float] = (0.95, 0.85)
PAPER_GUIDANCE_SCALE = 2.5
DEFAULT_NUM_INFERENCE_STEPS = 28
DEFAULT_REFERENCE_SIZE = 512


class Dtype(str, Enum):
    """Weight dtypes a recipe or ``--dtype`` may name."""

    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Offload(str, Enum):
    """CPU offloading on a GPU: none, whole models (diffusers' model offload), or layer by layer."""

    none = "none"
    model = "model"
    sequential = "sequential"


# The MLLM families squeeze has an adapter for: name (= the checkpoints' `config.model_type`) -> its class,
# imported only when a model loads. The schema and the loader both read this one table.
FAMILY_ADAPTERS = {
    "internvl": "squeeze_cli.pipelines.mllm.internvl:InternVLFamily",
    "qwen2_5_vl": "squeeze_cli.pipelines.mllm.qwen2_5_vl:Qwen25VLFamily",
}


class StepCacheMethod(str, Enum):
    """diffusers' step-caching hooks a manifest may name in `step_cache.method`."""

    first_block = "first_block"  # diffusers' FirstBlockCacheConfig
    taylorseer = "taylorseer"  # diffusers' TaylorSeerCacheConfig, lite variant


# A relative change of the first block's output below which later blocks reuse their cached residual.
DEFAULT_STEP_CACHE_THRESHOLD = 0.08
# TaylorSeer: a full pass every 5 steps, after 3 full passes at the start of each stage; first-order forecast.
DEFAULT_TAYLORSEER_INTERVAL = 5
DEFAULT_TAYLORSEER_WARMUP_STEPS = 3
DEFAULT_TAYLORSEER_ORDER = 1

# The `StepCache` fields each method reads; only these are written to job ids and metadata.
STEP_CACHE_FIELDS: dict[str, tuple[str, ...]] = {
    StepCacheMethod.first_block.value: ("threshold", "skip"),
    StepCacheMethod.taylorseer.value: ("interval", "warmup_steps", "order"),
}


@dataclass(frozen=True, slots=True)
class StepCache:
    """An opt-in step cache: faster sampling that changes pixels a little (docs/manifest.md, `step_cache`).

    Args:
        method: a `StepCacheMethod` value: `"first_block"` (diffusers' First Block Cache) or `"taylorseer"`
            (diffusers' TaylorSeer cache, lite variant).
        threshold: `first_block` only. When the first transformer block's output changed by less than this
            (mean absolute change relative to its previous value), the other blocks are skipped and their
            cached residual reused. Higher skips more.
        skip: `first_block` only, instead of `threshold`: the share of transformer passes to skip, in
            (0, 1). The threshold that skips about that much is calibrated with a probe image, once per
            model, size and sampling settings (`SubjectBatchMixin.calibrate_step_cache`).
        interval: `taylorseer` only. A full transformer pass every `interval` steps; the steps between are
            forecast from the last full passes by a Taylor series instead of run.
        warmup_steps: `taylorseer` only. Full passes at the start of each stage (and CFG branch) before
            the first forecast.
        order: `taylorseer` only. Order of the Taylor forecast (0 reuses the last output, 1 extrapolates
            linearly from the last two full passes).
    """

    method: str = StepCacheMethod.first_block.value
    threshold: float = DEFAULT_STEP_CACHE_THRESHOLD
    interval: int = DEFAULT_TAYLORSEER_INTERVAL
    warmup_steps: int = DEFAULT_TAYLORSEER_WARMUP_STEPS
    order: int = DEFAULT_TAYLORSEER_ORDER
    skip: float | None = None

    @property
    def decides_per_batch(self) -> bool:
        """Whether the skip decision looks at the batch's values (first_block: one decision for the whole
        batch), so an image would depend on its batch; TaylorSeer's schedule counts steps only."""
        return self.method == StepCacheMethod.first_block.value

    def to_dict(self) -> dict[str, Any]:
        # The method's own fields only, so a first_block cache keeps the job ids it had before taylorseer
        # and `skip`; with a `skip` target the threshold is calibrated from it, so the target is the id.
        settings = {name: getattr(self, name) for name in STEP_CACHE_FIELDS[self.method]}
        if settings.get("skip") is None:
            settings.pop("skip", None)
        else:
            settings.pop("threshold")
        return {"method": self.method, **settings}


def choices(enum: type[Enum]) -> str:
    """``"float32, bfloat16 or float16"``: an enum's values for a message."""
    values = [member.value for member in enum]
    return ", ".join(values[:-1]) + f" or {values[-1]}" if len(values) > 1 else values[0]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Every sampling parameter of one image, named as the pipeline names them."""

    num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS
    guidance_scale: float = PAPER_GUIDANCE_SCALE
    height: int = 512
    width: int = 512
    stage_thresholds: tuple[float, float] = PAPER_STAGE_THRESHOLDS
    keep_mllm_condition: bool = False
    true_cfg_scale: float = 1.0
    negative_prompt: str | None = None
    reference_size: int = DEFAULT_REFERENCE_SIZE
    step_cache: StepCache | None = None

    def to_pipeline_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `SqueezePipeline.__call__` that these parameters fill."""
        return {name: getattr(self, name) for name in SAMPLING_KEYS}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (thresholds as a list), used in sidecars and job ids."""
        data = self.to_pipeline_kwargs()
        data["stage_thresholds"] = list(self.stage_thresholds)
        # Written only when on, so that the job ids of exact sampling did not change when it was added.
        cache = data.pop("step_cache")
        if cache is not None:
            data["step_cache"] = cache.to_dict()
        return data


SAMPLING_KEYS: tuple[str, ...] = tuple(SamplingParams.__dataclass_fields__)
