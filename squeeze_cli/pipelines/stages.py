"""The multi-stage denoising schedule: which conditioning each sampling step uses.

Pure Python (no numpy, no torch) so the CLI (dry runs, cost estimates, metadata) and the pipeline share one
definition, and importing it costs nothing.

The paper's thresholds compare against the noise level σ (1 = pure noise, 0 = image), not the step
index: with FLUX's resolution-dependent shift the same step index means a different σ at 512² and
1024², and it is σ that decides how much of the layout is still undecided.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from squeeze_cli.params import PAPER_STAGE_THRESHOLDS

__all__ = [
    "DEFAULT_SCHEDULER_CONFIG",
    "STAGE_MLLM",
    "STAGE_MLLM_AND_REFERENCE",
    "STAGE_REFERENCE",
    "StagePlan",
    "calculate_shift",
    "stage_plan",
]

# FLUX.1-dev's scheduler/scheduler_config.json (FlowMatchEulerDiscreteScheduler).
DEFAULT_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "time_shift_type": "exponential",
}

# Scheduler options that would change σ after the shift; FLUX.1-dev uses none of them.
_UNSUPPORTED_SCHEDULER_OPTIONS = (
    "shift_terminal",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "invert_sigmas",
)

STAGE_MLLM = 1  # MLLM condition only; reference tokens are left out of the sequence
STAGE_MLLM_AND_REFERENCE = 2  # MLLM condition and reference tokens
STAGE_REFERENCE = 3  # reference tokens with the null condition (or the MLLM one if kept)


@dataclass(frozen=True)
class StagePlan:
    """Per-step conditioning schedule.

    Args:
        sigmas: the `num_inference_steps` unshifted sigmas to hand to
            `scheduler.set_timesteps(sigmas=sigmas, mu=mu)`.
        shifted_sigmas: σ at the start of each step after the scheduler's shift; what the thresholds
            compare to (equal to `scheduler.sigmas[:-1]`).
        mu: the dynamic-shift parameter (`None` when the scheduler does not shift dynamically).
        stages: per step, 1 (MLLM only), 2 (MLLM + reference) or 3 (reference + null condition).
        stage_thresholds: the (τ1, τ2) used.
    """

    sigmas: tuple[float, ...]
    shifted_sigmas: tuple[float, ...]
    mu: float | None
    stages: tuple[int, ...]
    stage_thresholds: tuple[float, float] = PAPER_STAGE_THRESHOLDS

    @property
    def counts(self) -> tuple[int, int, int]:
        """Number of steps in stage 1, 2 and 3."""
        return (
            self.stages.count(STAGE_MLLM),
            self.stages.count(STAGE_MLLM_AND_REFERENCE),
            self.stages.count(STAGE_REFERENCE),
        )

    @property
    def num_inference_steps(self) -> int:
        return len(self.stages)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary (for sidecars and `--dry-run`)."""
        return {
            "num_inference_steps": self.num_inference_steps,
            "stage_thresholds": list(self.stage_thresholds),
            "mu": self.mu,
            "sigmas": list(self.sigmas),
            "shifted_sigmas": list(self.shifted_sigmas),
            "stages": list(self.stages),
            "counts": list(self.counts),
        }


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's resolution-dependent shift μ: linear in the number of packed latent tokens."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def _time_shift_scale(mu: float, shift_type: str) -> float:
    """The numerator of FLUX's dynamic shift: e^μ (`exponential`) or μ (`linear`)."""
    if shift_type == "exponential":
        return math.exp(mu)
    if shift_type == "linear":
        return mu
    raise ValueError(f"`time_shift_type` must be 'exponential' or 'linear' but is {shift_type!r}")


def time_shift(mu: float, sigmas: Any, shift_type: str) -> Any:
    """FLUX's dynamic shift of `sigmas` (a tensor or array), as FlowMatchEulerDiscreteScheduler writes it:
    scale / (scale + (1 / σ - 1)), with scale = e^μ or μ. `_shifted_sigma` is the same shift of one float32
    σ, rounded as the scheduler's float32 arrays round it."""
    scale = _time_shift_scale(mu, shift_type)
    return scale / (scale + (1 / sigmas - 1) ** 1.0)


def _f32(x: float) -> float:
    """`x` rounded to float32 (round to nearest even), as a float32 tensor holds it."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _shifted_sigma(sigma: float, mu: float | None, config: Mapping[str, Any]) -> float:
    """The scheduler's shift of one float32 `sigma`, every operation rounded to float32 as its float32
    arrays compute it (a Python scalar joins a float32 operation as float32), so the thresholds see
    bit-identical σ values to the ones the scheduler steps through."""
    inverse = _f32(_f32(1 / sigma) - 1)  # (1 / sigmas - 1) ** 1.0
    if mu is not None:  # `time_shift`, one float32 operation at a time
        scale = _f32(_time_shift_scale(mu, config.get("time_shift_type", "exponential")))
        return _f32(scale / _f32(scale + inverse))
    shift = float(config.get("shift", 1.0))  # shift * s / (1 + (shift - 1) * s)
    return _f32(_f32(_f32(shift) * sigma) / _f32(1 + _f32(_f32(shift - 1) * sigma)))


def _linspace(start: float, stop: float, num: int) -> list[float]:
    """`np.linspace(start, stop, num)`, value for value: i * step + start, the last one exactly `stop`."""
    if num == 1:
        return [start]
    step = (stop - start) / (num - 1)
    values = [i * step + start for i in range(num)]
    values[-1] = stop
    return values


def stage_plan(
    num_inference_steps: int,
    height: int,
    width: int,
    stage_thresholds: Sequence[float] = PAPER_STAGE_THRESHOLDS,
    scheduler_config: Mapping[str, Any] | None = None,
    vae_scale_factor: int = 8,
) -> StagePlan:
    """Compute the sigma schedule of a FLUX sampling run and the stage of each step.

    Rule, with σ the shifted noise level at the start of a step and (τ1, τ2) = `stage_thresholds`:
    σ ≥ τ1 → stage 1; τ2 ≤ σ < τ1 → stage 2; σ < τ2 → stage 3. τ1 = τ2 = 0 → every step is stage 1
    (MLLM only throughout, the paper's "no multi-stage" setting).

    Args:
        num_inference_steps: number of denoising steps.
        height, width: output size in pixels (multiples of `2 * vae_scale_factor`).
        stage_thresholds: (τ1, τ2) with 1 ≥ τ1 ≥ τ2 ≥ 0.
        scheduler_config: the scheduler's config (a `FlowMatchEulerDiscreteScheduler.config` works);
            missing keys fall back to FLUX.1-dev's values.
        vae_scale_factor: the VAE's spatial downsampling (8 for FLUX); latents are packed 2×2 on top.
    """
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"`num_inference_steps` must be a positive integer but is {num_inference_steps!r}")
    multiple = 2 * vae_scale_factor
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value <= 0 or value % multiple != 0:
            raise ValueError(f"`{name}` must be a positive multiple of {multiple} but is {value!r}")
    if len(stage_thresholds) != 2:
        raise ValueError(f"`stage_thresholds` must be two numbers (τ1, τ2) but is {stage_thresholds!r}")
    tau1, tau2 = (float(t) for t in stage_thresholds)
    if not (0.0 <= tau2 <= tau1 <= 1.0):
        raise ValueError(f"`stage_thresholds` must satisfy 1 ≥ τ1 ≥ τ2 ≥ 0 but is ({tau1}, {tau2})")

    config = dict(DEFAULT_SCHEDULER_CONFIG)
    if scheduler_config is not None:
        config.update(dict(scheduler_config))
    unsupported = [k for k in _UNSUPPORTED_SCHEDULER_OPTIONS if config.get(k)]
    if unsupported:
        raise ValueError(f"`scheduler_config` uses options the stage plan does not model: {unsupported}")

    # The schedule FluxPipeline hands to the scheduler; the scheduler casts it to float32.
    sigmas = _linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    image_seq_len = (height // multiple) * (width // multiple)
    mu: float | None = None
    if config.get("use_dynamic_shifting", False):
        mu = calculate_shift(
            image_seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
    shifted = [_shifted_sigma(_f32(sigma), mu, config) for sigma in sigmas]

    if tau1 == 0.0 and tau2 == 0.0:
        stages = (STAGE_MLLM,) * num_inference_steps
    else:
        stages = tuple(
            STAGE_MLLM if s >= tau1 else STAGE_MLLM_AND_REFERENCE if s >= tau2 else STAGE_REFERENCE
            for s in shifted
        )
    return StagePlan(
        sigmas=tuple(sigmas),
        shifted_sigmas=tuple(shifted),
        mu=mu,
        stages=stages,
        stage_thresholds=(tau1, tau2),
    )
