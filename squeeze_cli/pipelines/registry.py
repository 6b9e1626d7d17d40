"""The pipelines a recipe can run, by name: what each is, the sampling keys it reads, its cost, its tiny twin.

Torch-free, so that `squeeze validate` can check a manifest's keys against its recipe's pipeline and cost
its plan without loading anything. The classes themselves are imported only when a run loads one
(`PipelineSpec.load_class`); each meets `squeeze_cli.pipelines.contract.SubjectPipeline` and loads through
its own `from_pretrained`. Adding a pipeline: its module, one row here, its tiny builder, its recipes
(`docs/architecture.md`, "A pipeline").
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from squeeze_cli.params import SamplingParams, StepCacheMethod

from .cost import StepTokens, estimate_cost

DEFAULT_PIPELINE = "squeeze"


@dataclass(frozen=True)
class PipelineSpec:
    """One pipeline a recipe can name in `model.pipeline_class`.

    Args:
        name: the value of `model.pipeline_class`.
        class_path: `module:Class` of the diffusers pipeline subclass, imported only when loading.
        sampling_parameters: the `SamplingParams` keys the pipeline reads; a manifest setting any other
            sampling key is refused at validation.
        distilled_guidance: whether `guidance_scale` is FLUX's distilled guidance (an embedding input, not
            classifier-free guidance); the PNG `parameters` chunk then writes it as `Distilled CFG Scale`.
        tiny_builder: `module:function(path, *, seed)` writing the tiny random checkpoint for `builtin: tiny`
            (with `family=` too when `takes_components`).
        staged: whether it denoises with the squeeze stage plan (`stage_thresholds`): stage 1 without the
            reference tokens, stage 3 with the null condition (dry runs show it; the cost model follows it).
        step_tokens: what its transformer steps run on, for the cost model (`pipelines/cost.py`).
        takes_components: whether `model.components` / `model.family` apply (the squeeze pipeline only):
            the loader assembles it from separately loaded parts, checks the MLLM family and sets its options.
        max_references: the most references a subject may have (checked at validation), or None.
        reference_sizing: how `reference_size` sizes a reference for the VAE, recorded in every sidecar
            (baselines are sized as their authors' diffusers pipelines size them, for a fair comparison).
        step_cache_methods: the `step_cache.method` values its transformer runs with under diffusers'
            hooks; a manifest naming another is refused at validation.
    """

    name: str
    class_path: str
    sampling_parameters: frozenset[str]
    distilled_guidance: bool
    tiny_builder: str
    staged: bool = False
    step_tokens: StepTokens = field(default_factory=StepTokens)
    takes_components: bool = False
    max_references: int | None = None
    reference_sizing: str = "longer side reference_size, aspect kept, multiples of 16"
    step_cache_methods: frozenset[str] = frozenset(method.value for method in StepCacheMethod)

    @property
    def class_name(self) -> str:
        return self.class_path.split(":", 1)[1]

    def load_class(self) -> Any:
        return _import(self.class_path)

    def build_tiny(self, path: Any, seed: int = 0, **options: Any) -> Any:
        return _import(self.tiny_builder)(path, seed=seed, **options)

    def estimate_cost(self, params: SamplingParams, num_references: int, prompt: str = "") -> float:
        """Relative transformer work of one image (`pipelines.cost.estimate_cost`; unit `cost.COST_UNIT`)."""
        return estimate_cost(params, num_references, prompt, tokens=self.step_tokens, staged=self.staged)


def _import(path: str) -> Any:
    module, name = path.split(":", 1)
    return getattr(importlib.import_module(module), name)


_COMMON = ("num_inference_steps", "height", "width", "reference_size", "step_cache")
# diffusers 0.42.1's First Block Cache fails on FLUX.2's blocks (a TypeError in its tail-block hook, with
# diffusers' own Flux2KleinPipeline too); TaylorSeer's lite variant hooks only `proj_out` and runs.
_FLUX2_STEP_CACHES = frozenset({StepCacheMethod.taylorseer.value})
_FLUX2_REFERENCE_SIZING = (
    "diffusers' Flux2Pipeline: over reference_size² area scaled down to it (never enlarged), aspect kept, "
    "sides cropped to multiples of 16 (flux2.flux2_reference_size)"
)

PIPELINES: dict[str, PipelineSpec] = {
    spec.name: spec
    for spec in (
        PipelineSpec(
            name="squeeze",
            class_path="squeeze_cli.pipelines.squeeze:SqueezePipeline",
            sampling_parameters=frozenset(
                (
                    *_COMMON,
                    "guidance_scale",
                    "stage_thresholds",
                    "keep_mllm_condition",
                    "true_cfg_scale",
                    "negative_prompt",
                )
            ),
            distilled_guidance=True,
            tiny_builder="squeeze_cli.pipelines.tiny:build_tiny_pipeline",
            staged=True,
            # FLUX.1's width; InternVL3 reads a reference as one 448-px tile of 256 tokens (Qwen2.5-VL as the
            # recipes cap it), plus ~30 tokens of chat template, which is also the null condition.
            step_tokens=StepTokens(condition_tokens_per_reference=256, condition_template_tokens=30),
            takes_components=True,
        ),
        PipelineSpec(
            name="kontext",
            class_path="squeeze_cli.pipelines.kontext:KontextPipeline",
            sampling_parameters=frozenset((*_COMMON, "guidance_scale", "true_cfg_scale", "negative_prompt")),
            distilled_guidance=True,
            tiny_builder="squeeze_cli.pipelines.tiny_pipelines:build_tiny_kontext",
            # FLUX.1's width; T5 pads every prompt to its 512 tokens, and the references are not in the text.
            step_tokens=StepTokens(condition_template_tokens=512, counts_instruction=False),
            reference_sizing=(
                "diffusers' FluxKontextPipeline: the preferred Kontext resolution nearest the aspect ratio, "
                "scaled to reference_size² area (kontext.kontext_reference_size)"
            ),
        ),
        PipelineSpec(
            name="qwen-image-edit-plus",
            class_path="squeeze_cli.pipelines.qwen_image_edit:QwenImageEditPlusPipeline",
            # Qwen-Image has no guidance embedding: real CFG (`true_cfg_scale` with a negative prompt) only.
            sampling_parameters=frozenset((*_COMMON, "true_cfg_scale", "negative_prompt")),
            distilled_guidance=False,
            tiny_builder="squeeze_cli.pipelines.tiny_pipelines:build_tiny_qwen_image_edit",
            # Qwen-Image's width (24 heads x 128); Qwen2.5-VL sees each reference at ~384² (196 tokens of
            # 28 px, plus "Picture k:"), and a few template tokens remain after the system prompt is dropped.
            step_tokens=StepTokens(condition_tokens_per_reference=200, condition_template_tokens=6),
            reference_sizing=(
                "diffusers' QwenImageEditPlusPipeline: reference_size² area, aspect kept, multiples of 32 "
                "(qwen_image_edit.vae_reference_size); the VL encoder at ~384² area"
            ),
        ),
        PipelineSpec(
            name="flux2-klein",
            class_path="squeeze_cli.pipelines.flux2:Flux2KleinPipeline",
            # Step-distilled: no guidance of any kind.
            sampling_parameters=frozenset(_COMMON),
            distilled_guidance=False,
            tiny_builder="squeeze_cli.pipelines.tiny_pipelines:build_tiny_flux2_klein",
            # FLUX.2 [klein] 4B's width (24 heads x 128); Qwen3 pads every prompt to 512 tokens.
            step_tokens=StepTokens(
                transformer_width=3072, condition_template_tokens=512, counts_instruction=False
            ),
            max_references=4,  # Black Forest Labs: "up to 4" for [klein] 4B and 9B
            step_cache_methods=_FLUX2_STEP_CACHES,
            reference_sizing=_FLUX2_REFERENCE_SIZING,
        ),
        PipelineSpec(
            name="flux2-klein-kv",
            class_path="squeeze_cli.pipelines.flux2:Flux2KleinKVPipeline",
            sampling_parameters=frozenset(_COMMON),
            distilled_guidance=False,
            tiny_builder="squeeze_cli.pipelines.tiny_pipelines:build_tiny_flux2_klein_kv",
            # FLUX.2 [klein] 9B's width (about 4,096); Qwen3 pads every prompt to 512 tokens. The reference
            # tokens' keys and values are computed once per subject: the cost model counts them as if every
            # step ran them, an overestimate.
            step_tokens=StepTokens(
                transformer_width=4096, condition_template_tokens=512, counts_instruction=False
            ),
            max_references=4,
            step_cache_methods=_FLUX2_STEP_CACHES,
            reference_sizing=_FLUX2_REFERENCE_SIZING,
        ),
        PipelineSpec(
            name="flux2-dev",
            class_path="squeeze_cli.pipelines.flux2:Flux2DevPipeline",
            sampling_parameters=frozenset((*_COMMON, "guidance_scale")),
            distilled_guidance=True,
            tiny_builder="squeeze_cli.pipelines.tiny_pipelines:build_tiny_flux2_dev",
            # FLUX.2 [dev]'s width (48 heads x 128); Mistral pads every prompt to 512 tokens.
            step_tokens=StepTokens(
                transformer_width=6144, condition_template_tokens=512, counts_instruction=False
            ),
            max_references=10,  # FLUX.2 [dev]'s limit (Black Forest Labs recommend at most 6)
            step_cache_methods=_FLUX2_STEP_CACHES,
            reference_sizing=_FLUX2_REFERENCE_SIZING,
        ),
    )
}
# Qwen-Image-Edit-2511 runs the same pipeline: what differs is in its checkpoint (its transformer's
# `zero_cond_t`, which diffusers' QwenImageTransformer2DModel reads), so a row of its own only for its tiny
# twin, built with that switch on, and for its reference limit.
PIPELINES["qwen-image-edit-2511"] = replace(
    PIPELINES["qwen-image-edit-plus"],
    name="qwen-image-edit-2511",
    tiny_builder="squeeze_cli.pipelines.tiny_pipelines:build_tiny_qwen_image_edit_2511",
    # Qwen's 2509 model card, which 2511 builds on: multi-image editing works best with 1 to 3 input images.
    max_references=3,
)


def pipeline_spec(name: str | None) -> PipelineSpec:
    """The registered pipeline called `name` (`None` is the squeeze pipeline)."""
    return PIPELINES[name or DEFAULT_PIPELINE]


def unused_sampling_keys(name: str | None, keys: Iterable[str]) -> list[str]:
    """The keys among `keys` that pipeline `name` does not read, in the order given."""
    used = pipeline_spec(name).sampling_parameters
    return [key for key in keys if key not in used]
