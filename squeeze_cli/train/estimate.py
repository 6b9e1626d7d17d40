"""`squeeze train --dry-run`: the models built on the meta device (no weights, nothing downloaded), their
trainable parameters per stage and an estimate of GPU memory per process.

Configs come from the recipe's local folders, the Hugging Face cache, or — for FLUX.1-dev and
InternVL3-8B-hf — the copies of their `config.json` shipped in `squeeze_cli/train/model_configs/`, so the
paper preset is planned offline.

The memory model (bytes per process):

- weights: frozen parameters (transformer base, MLLM, VAE) in the mixed-precision dtype, trained ones (LoRA,
  aggregator) in float32;
- gradients: float32, for the groups the stage trains;
- optimiser: AdamW's two float32 moments for every group trained in any stage (they persist);
- activations of the transformer's backward, per sample, with s = condition + target + reference tokens and
  h the hidden size: 34·s·h bytes per block without checkpointing (Korthikanti et al. 2022, 16-bit, memory-
  efficient attention so no s² term), or 2·s·h per block plus one block recomputed with it; plus the
  aggregator's blocks over the layer axis (34·L·d per condition token and block) and the LoRA
  intermediates (2·r bytes per token and adapted layer).

It is an estimate for planning, not a measurement: allocator fragmentation, CUDA context (~0.5-1 GB) and
the frozen MLLM/VAE forward passes (transient, small next to the transformer's backward) are not counted.
"""

from __future__ import annotations

import importlib.resources
import json
from dataclasses import dataclass
from typing import Any

from squeeze_cli.errors import ModelLoadError
from squeeze_cli.train.config import LoadedConfig

GIB = 1024**3
PRECISION_NAMES = {"no": "float32", "bf16": "bf16 mixed precision", "fp16": "fp16 mixed precision"}
# Hub ids whose configs ship with squeeze (the paper's models), so `--dry-run` needs no download.
PACKAGED_CONFIGS = {
    ("black-forest-labs/FLUX.1-dev", "transformer"): "flux1-dev-transformer.json",
    ("black-forest-labs/FLUX.1-dev", "vae"): "flux1-dev-vae.json",
    ("OpenGVLab/InternVL3-8B-hf", None): "internvl3-8b-hf.json",
}
BYTES_PER_ACTIVATION_PER_LAYER = 34  # × tokens × hidden, 16-bit (Korthikanti et al. 2022)
INSTRUCTION_TOKENS = 77  # a typical instruction, for the condition length


def _packaged_config(path: str, subfolder: str | None) -> dict | None:
    name = PACKAGED_CONFIGS.get((path, subfolder))
    if name is None:
        return None
    folder = importlib.resources.files("squeeze_cli.train.model_configs")
    return json.loads(folder.joinpath(name).read_text(encoding="utf-8"))


def _diffusers_config(cls: Any, path: str, subfolder: str | None, field: str) -> dict:
    packaged = _packaged_config(path, subfolder)
    if packaged is not None:
        return packaged
    try:
        return dict(cls.load_config(path, subfolder=subfolder))
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"cannot read the config of `{path}`{f' ({subfolder})' if subfolder else ''}: "
            f"{str(error).splitlines()[0]}",
            f"download it first (`hf download {path}`) or fix `{field}` in the recipe",
        ) from None


def _mllm_config(path: str, subfolder: str | None) -> Any:
    from transformers import AutoConfig

    packaged = _packaged_config(path, subfolder)
    try:
        if packaged is not None:
            data = dict(packaged)
            model_type = data.pop("model_type")
            data.pop("_name_or_path", None)
            return AutoConfig.for_model(model_type, **data)
        kwargs = {"subfolder": subfolder} if subfolder else {}
        return AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"cannot read the MLLM config of `{path}`: {str(error).splitlines()[0]}",
            f"download it first (`hf download {path}`) or fix `model.components.mllm.path` in the recipe",
        ) from None


def _sources(spec: Any) -> dict[str, tuple[str, str | None]]:
    from squeeze_cli.train.models import base_pipeline_source

    pipeline = base_pipeline_source(spec)
    sources = {}
    for name in ("mllm", "transformer", "vae"):
        if name in spec.components:
            sources[name] = (spec.components[name].path, spec.components[name].subfolder)
        else:
            sources[name] = (pipeline, name)
    return sources


@dataclass
class MetaModels:
    transformer: Any
    mllm: Any
    vae: Any
    aggregator: Any


def build_meta_models(loaded: LoadedConfig) -> MetaModels:
    """The recipe's models, the LoRA and a new aggregator, on the meta device (no memory, no weights)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import AutoModel

    from squeeze_cli.manifest.recipes import load_recipe
    from squeeze_cli.train.models import build_trainable

    recipe = load_recipe(loaded.config.recipe, relative_to=loaded.recipe_base)
    sources = _sources(recipe.model)
    transformer_config = _diffusers_config(
        FluxTransformer2DModel, *sources["transformer"], "model.components.transformer"
    )
    vae_config = _diffusers_config(AutoencoderKL, *sources["vae"], "model.components.vae")
    mllm_config = _mllm_config(*sources["mllm"])
    with init_empty_weights():
        transformer = FluxTransformer2DModel.from_config(transformer_config)
        vae = AutoencoderKL.from_config(vae_config)
        mllm = AutoModel.from_config(mllm_config)  # the base model, as `squeeze_cli.loading` loads it
        aggregator = build_trainable(loaded, mllm, transformer, loaded.config.seed)
    return MetaModels(transformer, mllm, vae, aggregator)


def _numel(module: Any, lora: bool | None = None) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if lora is None or (("lora_" in n) == lora))


def parameter_counts(models: MetaModels) -> dict[str, int]:
    return {
        "transformer": _numel(models.transformer, lora=False),
        "lora": _numel(models.transformer, lora=True),
        "mllm": _numel(models.mllm),
        "vae": _numel(models.vae),
        "aggregator": _numel(models.aggregator),
    }


def _lora_layers(transformer: Any) -> int:
    return sum(1 for n, _ in transformer.named_modules() if n.endswith("lora_A.default"))


def estimate_memory(loaded: LoadedConfig, models: MetaModels, counts: dict[str, int]) -> dict[str, Any]:
    """Per stage: GiB of weights, gradients, optimiser and activations (with and without checkpointing)."""
    config = loaded.config
    training = config.training
    weight_bytes = 2 if training.mixed_precision in ("bf16", "fp16") else 4
    frozen = counts["transformer"] + counts["mllm"] + counts["vae"]
    trained_any = sorted({g for stage in (config.stages.stage1, config.stages.stage2) for g in stage.train})
    transformer_config = models.transformer.config
    hidden = transformer_config.num_attention_heads * transformer_config.attention_head_dim
    blocks = transformer_config.num_layers + transformer_config.num_single_layers
    width, num_layers = config.aggregator.width, models.aggregator.config.num_hidden_states
    tokens_per_image = getattr(models.mllm.config, "image_seq_length", 256)
    lora_layers = _lora_layers(models.transformer)
    largest = max(training.buckets, key=lambda b: b[0] * b[1])
    target_tokens = (largest[0] // 16) * (largest[1] // 16)
    reference_tokens = (training.reference_size // 16) ** 2  # one reference, square
    condition_tokens = tokens_per_image + INSTRUCTION_TOKENS

    stages = {}
    for name, stage in (("stage1", config.stages.stage1), ("stage2", config.stages.stage2)):
        tokens = condition_tokens + target_tokens + (reference_tokens if name == "stage2" else 0)
        per_sample_full = BYTES_PER_ACTIVATION_PER_LAYER * tokens * hidden * blocks
        per_sample_checkpointed = (
            2 * tokens * hidden * blocks + BYTES_PER_ACTIVATION_PER_LAYER * tokens * hidden
        )
        aggregator_activations = (
            BYTES_PER_ACTIVATION_PER_LAYER
            * num_layers
            * width
            * config.aggregator.num_blocks
            * condition_tokens
        )
        lora_activations = 2 * config.lora.rank * tokens * lora_layers // max(blocks, 1) * blocks
        extra = aggregator_activations + lora_activations
        trained = sum(counts[g] for g in stage.train)
        entry = {
            "steps": stage.steps,
            "trains": list(stage.train),
            "trainable_parameters": trained,
            "sequence_tokens": tokens,
            "weights_gib": (frozen * weight_bytes + sum(counts[g] for g in ("lora", "aggregator")) * 4) / GIB,
            "gradients_gib": trained * 4 / GIB,
            "optimizer_gib": sum(counts[g] for g in trained_any) * 8 / GIB,
            "activations_gib": training.batch_size * (per_sample_full + extra) / GIB,
            "activations_checkpointed_gib": training.batch_size * (per_sample_checkpointed + extra) / GIB,
        }
        fixed = entry["weights_gib"] + entry["gradients_gib"] + entry["optimizer_gib"]
        entry["total_gib"] = fixed + entry["activations_gib"]
        entry["total_checkpointed_gib"] = fixed + entry["activations_checkpointed_gib"]
        stages[name] = entry
    return {
        "mixed_precision": training.mixed_precision,
        "batch_size_per_process": training.batch_size,
        "gradient_checkpointing": training.gradient_checkpointing,
        "bucket": list(largest),
        "reference_size": training.reference_size,
        "stages": stages,
    }


def _billions(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.1f} M" if n >= 1e5 else f"{n:,}"


def dry_run_report(loaded: LoadedConfig) -> str:
    """The text `squeeze train --dry-run` prints."""
    models = build_meta_models(loaded)
    counts = parameter_counts(models)
    memory = estimate_memory(loaded, models, counts)
    lines = [
        f"config: {loaded.path}",
        f"recipe: {loaded.config.recipe}   (models built on the meta device: nothing loaded or downloaded)",
        "",
        "parameters:",
        f"  transformer (frozen base)  {_billions(counts['transformer'])}",
        f"  LoRA rank {loaded.config.lora.rank:<4} (trained)    {_billions(counts['lora'])}"
        f"   targets: {', '.join(loaded.config.lora.targets)}",
        f"  MLLM (frozen)              {_billions(counts['mllm'])}",
        f"  VAE (frozen)               {_billions(counts['vae'])}",
        f"  aggregator (trained)       {_billions(counts['aggregator'])}",
        "",
        f"memory per process (estimate; {PRECISION_NAMES[memory['mixed_precision']]}, "
        f"batch {memory['batch_size_per_process']} per process, "
        f"{memory['bucket'][0]}x{memory['bucket'][1]} targets, {memory['reference_size']}-px reference):",
    ]
    checkpointing = memory["gradient_checkpointing"]
    for name, stage in memory["stages"].items():
        chosen = stage["total_checkpointed_gib"] if checkpointing else stage["total_gib"]
        lines += [
            f"  {name} ({stage['steps']} steps, trains {', '.join(stage['trains'])}: "
            f"{_billions(stage['trainable_parameters'])}; {stage['sequence_tokens']} tokens per sample)",
            f"    weights {stage['weights_gib']:.1f} GiB + gradients {stage['gradients_gib']:.1f} GiB + "
            f"optimiser {stage['optimizer_gib']:.1f} GiB",
            f"    activations {stage['activations_gib']:.1f} GiB without checkpointing, "
            f"{stage['activations_checkpointed_gib']:.1f} GiB with",
            f"    total {stage['total_gib']:.1f} GiB without checkpointing, "
            f"{stage['total_checkpointed_gib']:.1f} GiB with  -> this config: {chosen:.1f} GiB",
        ]
    lines.append("  (not counted: CUDA context, allocator fragmentation, the frozen MLLM/VAE forward passes)")
    return "\n".join(lines)
