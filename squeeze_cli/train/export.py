"""What a training run hands to `squeeze gen`: the aggregator (`save_pretrained`, with the definition of
its null condition), the LoRA in diffusers' format, and a recipe that loads them as they are."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from squeeze_cli import outputs

if TYPE_CHECKING:
    from squeeze_cli.manifest.recipes import Recipe

NULL_CONDITION_FILE = "null_condition.json"
# What the dropped MLLM condition is, stored with the aggregator so gen and training cannot drift apart.
NULL_CONDITION_DEFINITION = {
    "definition": "SqueezePipeline.encode_null_condition: aggregator(MLLMEncoder.encode_null())",
    "mllm_input": {"images": 0, "instruction": ""},
    "text_tokens": "the <|im_end|> closing the empty user turn stands in (see MLLMEncoder)",
    "used_for": ["training: condition dropout (text, both)", "inference: stage 3 (σ < τ2)"],
}


def export_weights(folder: Path, aggregator: Any, transformer: Any, recipe_text: str) -> Path:
    """Aggregator (`save_pretrained`), the transformer's LoRA (diffusers format) and `recipe_text` as
    `recipe.yaml`, written into `folder` atomically (a `.partial` folder renamed into place)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors import SafetensorError

    from squeeze_cli.pipelines.squeeze import SqueezePipeline

    partial = folder.with_name(f".partial-{folder.name}")
    shutil.rmtree(partial, ignore_errors=True)
    lora_state = {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(transformer).items()}
    try:
        outputs.ensure_dir(partial)
        aggregator.save_pretrained(partial / "aggregator")
        outputs.atomic_write_json(partial / "aggregator" / NULL_CONDITION_FILE, NULL_CONDITION_DEFINITION)
        # The adapter's config (rank, alpha, targets) goes into the file's metadata, so loading uses the
        # trained alpha / rank scale rather than assuming alpha = rank.
        SqueezePipeline.save_lora_weights(
            partial / "lora",
            transformer_lora_layers=lora_state,
            transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
        )
        outputs.atomic_write_text(partial / "recipe.yaml", recipe_text)
        shutil.rmtree(folder, ignore_errors=True)
        os.rename(partial, folder)
    except outputs.OutputWriteError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    except (OSError, SafetensorError) as error:  # diffusers' and safetensors' writes raise these as they are
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(error, OSError):
            code = error.errno
            reason = os.strerror(code) if code else str(error)
        else:  # safetensors gives the OS error in its text only: "... (os error 28)"
            found = re.search(r"\(os error (\d+)\)", str(error))
            code = int(found.group(1)) if found else None
            reason = " ".join(str(error).split())
        raise outputs.OutputWriteError(f"cannot write {folder}: {reason}", path=folder, errno=code) from None
    return folder


def trained_recipe_text(
    recipe: Recipe, pipeline_source: str | None, output_dir: Path, folder: Path, stage_name: str
) -> str:
    """A recipe file for the weights `export_weights` writes into `folder`, valid where it is written
    (`folder/recipe.yaml`): `recipe`'s model with the trained aggregator and LoRA."""
    spec = recipe.model
    model: dict[str, Any] = {}
    if pipeline_source is not None:
        model["pipeline"] = pipeline_source
    if spec.family:
        model["family"] = spec.family
    components = {n: c.model_dump(exclude_none=True) for n, c in spec.components.items()}
    components["aggregator"] = {"path": "./aggregator"}
    model["components"] = components
    model["lora"] = {"path": "./lora", "scale": 1.0}
    model["dtype"] = spec.dtype
    defaults = recipe.defaults.model_dump(exclude_none=True, mode="json")
    if stage_name == "stage1":  # trained without reference tokens: MLLM condition throughout
        defaults["stage_thresholds"] = [0.0, 0.0]
    document = {
        "name": f"trained-{output_dir.name}-{stage_name}",
        "description": f"{recipe.name} + the aggregator and LoRA trained by squeeze ({stage_name}).",
        "model": model,
        "defaults": defaults,
    }
    header = (
        f"# Written by `squeeze train` ({stage_name} of {output_dir}).\n"
        f"#   squeeze gen my-manifest.yaml --recipe {folder / 'recipe.yaml'}\n"
    )
    return header + yaml.safe_dump(document, sort_keys=False, allow_unicode=True, default_flow_style=None)


def run_recipe_text(recipe: Recipe, pipeline_source: str | None, output_dir: Path, final_stage: str) -> str:
    """The run's own `recipe.yaml` (in `output_dir`): the final stage's weights, from its folder."""
    text = trained_recipe_text(recipe, pipeline_source, output_dir, output_dir, final_stage)
    text = text.replace("./aggregator", f"./{final_stage}/aggregator")
    return text.replace("./lora", f"./{final_stage}/lora")
