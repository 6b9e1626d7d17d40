"""The cost model: the relative transformer work of one image, from the tokens each denoising step runs on.

Pure and torch-free (planning runs it for every job on every `validate`). A step over L tokens of an MMDiT
of width d costs about 2 * 12 d^2 * L FLOPs per block in its projections and MLPs and 4 d * L^2 in
attention: proportional to `L + L^2 / (6 d)`, whatever the number of blocks. L is the image's own tokens
(16x16 pixels each) plus, per pipeline (`StepTokens`, on its registry entry): the text or MLLM condition,
and the references' VAE tokens (each reference a `reference_size` square). A staged pipeline (the squeeze
pipeline's stage plan) leaves the reference tokens out of stage 1 and swaps in its short null condition in
stage 3. True CFG runs every step twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from squeeze_cli.params import SamplingParams

from .stages import stage_plan

__all__ = ["COST_UNIT", "StepTokens", "estimate_cost"]

COST_UNIT = "one 512x512 image at 28 steps with one 512-px reference on the same model; true CFG counts twice"
_UNIT_PARAMS = SamplingParams(height=512, width=512, num_inference_steps=28, reference_size=512)


@dataclass(frozen=True)
class StepTokens:
    """What a pipeline's transformer step runs on besides the image tokens and the reference tokens.

    Args:
        transformer_width: d, the transformer's hidden size (attention heads x head dim).
        condition_tokens_per_reference: condition tokens each reference brings (an MLLM reading it).
        condition_template_tokens: condition tokens every prompt has (a chat template; or the whole padded
            length of a text encoder that pads, like FLUX's T5 at 512). A staged pipeline's null condition.
        counts_instruction: whether the instruction adds its own tokens (about one per 4 characters).
    """

    transformer_width: int = 3072
    condition_tokens_per_reference: int = 0
    condition_template_tokens: int = 0
    counts_instruction: bool = True


def estimate_cost(
    params: SamplingParams, num_references: int, prompt: str = "", *, tokens: StepTokens, staged: bool
) -> float:
    """Relative transformer work of one image, in `COST_UNIT`s of the same pipeline (`tokens`, `staged`)."""
    instruction = len(prompt) // 4 if tokens.counts_instruction else 0
    passes = 2 if params.true_cfg_scale > 1.0 and params.negative_prompt is not None else 1
    work = _token_steps(params, num_references, instruction, staged, tokens)
    return passes * work / _token_steps(_UNIT_PARAMS, 1, 0, staged, tokens)


@lru_cache(maxsize=4096)  # a plan has few distinct (params, references, instruction length)
def _token_steps(
    params: SamplingParams, num_references: int, instruction_tokens: int, staged: bool, tokens: StepTokens
) -> float:
    """Sum over the steps of `L + L^2 / (6 d)` for the L tokens each step runs on."""
    image = (params.height // 16) * (params.width // 16)
    references = num_references * (params.reference_size // 16) ** 2
    template = tokens.condition_template_tokens
    condition = num_references * tokens.condition_tokens_per_reference + template + instruction_tokens
    last_condition = condition if params.keep_mllm_condition or not staged else template
    mllm_only, both, reference_only = _stage_counts(params) if staged else (0, params.num_inference_steps, 0)

    def step(length: int) -> float:
        return length + length * length / (6 * tokens.transformer_width)

    return (
        mllm_only * step(image + condition)
        + both * step(image + references + condition)
        + reference_only * step(image + references + last_condition)
    )


@lru_cache(maxsize=64)
def _stage_counts(params: SamplingParams) -> tuple[int, int, int]:
    return stage_plan(params.num_inference_steps, params.height, params.width, params.stage_thresholds).counts
