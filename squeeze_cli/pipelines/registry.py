"""The pipelines a recipe can run, by name: what each is, which sampling keys it reads, its tiny twin.

Torch-free, so that `squeeze validate` can check a manifest's keys against its recipe's pipeline without
loading anything. The classes themselves are imported only when a run loads one (`PipelineSpec.load_class`).

Every pipeline meets the contract the runner uses:

- `pipe.encode_subject(reference_images, reference_size) -> condition` (computed once per subject),
- `pipe(prompt=[...], subject_condition=condition, generator=[one CPU generator per image],
  callback_on_step_end=fn, **sampling_kwargs)` returning `.images` and `.stage_plan` (or None),
- optionally `pipe.check_prompt_fits(reference_sizes, prompts)` raising `ValueError`,
- a class attribute `sampling_parameters` naming the `SamplingParams` keys it uses.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

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
        tiny_builder: `module:function(path, seed)` writing the tiny random checkpoint for `builtin: tiny`.
        takes_components: whether `model.components` / `model.family` apply (the squeeze pipeline only).
    """

    name: str
    class_path: str
    sampling_parameters: frozenset[str]
    distilled_guidance: bool
    tiny_builder: str
    takes_components: bool = False

    @property
    def class_name(self) -> str:
        return self.class_path.split(":", 1)[1]

    def load_class(self) -> Any:
        return _import(self.class_path)

    def build_tiny(self, path: Any, seed: int = 0) -> Any:
        return _import(self.tiny_builder)(path, seed=seed)


def _import(path: str) -> Any:
    module, name = path.split(":", 1)
    return getattr(importlib.import_module(module), name)


_COMMON = ("num_inference_steps", "height", "width", "reference_size")

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
                    "step_cache",
                )
            ),
            distilled_guidance=True,
            tiny_builder="squeeze_cli.pipelines.tiny:build_tiny_pipeline",
            takes_components=True,
        ),
        PipelineSpec(
            name="kontext",
            class_path="squeeze_cli.pipelines.kontext:KontextPipeline",
            sampling_parameters=frozenset((*_COMMON, "guidance_scale", "true_cfg_scale", "negative_prompt")),
            distilled_guidance=True,
            tiny_builder="squeeze_cli.pipelines.tiny_pipelines:build_tiny_kontext",
        ),
        PipelineSpec(
            name="qwen-image-edit-plus",
            class_path="squeeze_cli.pipelines.qwen_image_edit:QwenImageEditPlusPipeline",
            # Qwen-Image has no guidance embedding: real CFG (`true_cfg_scale` with a negative prompt) only.
            sampling_parameters=frozenset((*_COMMON, "true_cfg_scale", "negative_prompt")),
            distilled_guidance=False,
            tiny_builder="squeeze_cli.pipelines.tiny_pipelines:build_tiny_qwen_image_edit",
        ),
    )
}


def pipeline_spec(name: str | None) -> PipelineSpec:
    """The registered pipeline called `name` (`None` is the squeeze pipeline)."""
    return PIPELINES[name or DEFAULT_PIPELINE]


def unused_sampling_keys(name: str | None, keys: Iterable[str]) -> list[str]:
    """The keys among `keys` that pipeline `name` does not read, in the order given."""
    used = pipeline_spec(name).sampling_parameters
    return [key for key in keys if key not in used]
