"""`squeeze train --dry-run`: the models built on the meta device (no weights, nothing downloaded), their
trainable parameters per stage and an estimate of GPU memory per process.

Configs come from the recipe's local folders, the Hugging Face cache, or — for FLUX.1-dev and
InternVL3-8B-hf — the copies of their `config.json` shipped in `squeeze_cli/train/model_configs/`, so the
paper preset is planned offline.

The memory model (bytes per process; docs/training.md works it through for the paper preset):

- weights: frozen parameters (transformer base, MLLM, VAE) in the mixed-precision dtype, trained ones (LoRA,
  aggregator) in float32;
- gradients: float32, for the groups the stage trains;
- optimiser: AdamW's two float32 moments for every group trained in any stage (they persist);
- DDP's gradient buckets (several processes): a second float32 copy of those groups' gradients, since
  accelerate leaves `gradient_as_bucket_view` off;
- activations of the transformer's backward, per sample, with s = condition + target + reference tokens and
  h the hidden size: 34·s·h bytes per block at 16 bits (twice that in float32) without checkpointing
  (Korthikanti et al. 2022, memory-efficient attention so no s² term), or 2·s·h per block plus one block
  recomputed with it; plus the aggregator's blocks over the layer axis (34·L·d per condition token and
  block) and the LoRA intermediates (2·r bytes per token and adapted layer);
- autocast's cache (mixed precision): a 16-bit copy of every float32 weight the stage trains, held from
  the first use in the forward to its end;
- the AdamW step's temporary: the foreach implementation (CUDA) takes `sqrt` of every second moment at
  once, a float32 copy of the stage's trained parameters; the per-tensor one (CPU) two copies of the
  largest. It comes after the backward has freed the activations, so the peak is the larger of the two.

Planned = peak + the CUDA context and allocator fragmentation (1 GiB + 5 % of the peak, a rule of thumb,
not measured). The frozen MLLM/VAE forwards (transient, small next to the transformer's backward) are
not counted. On the CPU the peak is checked against the allocations of a `small`-model step
(`benchmarks/bench_train_memory.py`).
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
CUDA_CONTEXT_GIB = 1.0  # the CUDA context and the kernels it loads (~0.5-1 GiB)
FRAGMENTATION = 0.05  # the caching allocator's blocks that are reserved and not in use
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


def _largest(module: Any, lora: bool | None = None) -> int:
    return max(
        (p.numel() for n, p in module.named_parameters() if lora is None or (("lora_" in n) == lora)),
        default=0,
    )


def estimate_memory(
    loaded: LoadedConfig,
    models: MetaModels,
    counts: dict[str, int],
    *,
    distributed: bool = True,
    device: str = "cuda",
    instruction_tokens: int = INSTRUCTION_TOKENS,
) -> dict[str, Any]:
    """Per stage: GiB of weights, gradients, optimiser, DDP buckets, activations (with and without
    checkpointing), autocast's copies and the optimiser step's temporary, and their peak.

    Args:
        distributed (`bool`): several processes under DDP (its gradient buckets are counted).
        device (`str`): `cuda` (foreach AdamW, the CUDA context) or `cpu` (per-tensor AdamW, no context).
        instruction_tokens (`int`): the instruction's length in the condition.
    """
    config = loaded.config
    training = config.training
    mixed = training.mixed_precision in ("bf16", "fp16")
    weight_bytes = 2 if mixed else 4
    activation_scale = 1 if mixed else 2  # the 34·s·h constant counts 16-bit activations
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
    condition_tokens = tokens_per_image + instruction_tokens
    largest_tensor = {
        "lora": _largest(models.transformer, lora=True),
        "aggregator": _largest(models.aggregator),
    }

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
        if device == "cuda":
            step_temporary = trained * 4
        else:
            step_temporary = 2 * max((largest_tensor[g] for g in stage.train), default=0) * 4
        entry = {
            "steps": stage.steps,
            "trains": list(stage.train),
            "trainable_parameters": trained,
            "sequence_tokens": tokens,
            "weights_gib": (frozen * weight_bytes + sum(counts[g] for g in ("lora", "aggregator")) * 4) / GIB,
            "gradients_gib": trained * 4 / GIB,
            "optimizer_gib": sum(counts[g] for g in trained_any) * 8 / GIB,
            "ddp_buckets_gib": sum(counts[g] for g in trained_any) * 4 / GIB if distributed else 0.0,
            "activations_gib": activation_scale * training.batch_size * (per_sample_full + extra) / GIB,
            "activations_checkpointed_gib": activation_scale
            * training.batch_size
            * (per_sample_checkpointed + extra)
            / GIB,
            "autocast_cache_gib": trained * 2 / GIB if mixed else 0.0,
            "optimizer_step_gib": step_temporary / GIB,
        }
        fixed = (
            entry["weights_gib"] + entry["gradients_gib"] + entry["optimizer_gib"] + entry["ddp_buckets_gib"]
        )
        for suffix, activations in (
            ("", entry["activations_gib"]),
            ("_checkpointed", entry["activations_checkpointed_gib"]),
        ):
            peak = fixed + max(activations + entry["autocast_cache_gib"], entry["optimizer_step_gib"])
            entry[f"total{suffix}_gib"] = peak
            entry[f"planned{suffix}_gib"] = (
                peak * (1 + FRAGMENTATION) + CUDA_CONTEXT_GIB if device == "cuda" else peak
            )
        stages[name] = entry
    return {
        "mixed_precision": training.mixed_precision,
        "batch_size_per_process": training.batch_size,
        "gradient_checkpointing": training.gradient_checkpointing,
        "distributed": distributed,
        "device": device,
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
    suffix = "_checkpointed" if checkpointing else ""
    for name, stage in memory["stages"].items():
        lines += [
            f"  {name} ({stage['steps']} steps, trains {', '.join(stage['trains'])}: "
            f"{_billions(stage['trainable_parameters'])}; {stage['sequence_tokens']} tokens per sample)",
            f"    weights {stage['weights_gib']:.1f} GiB + gradients {stage['gradients_gib']:.1f} "
            f"+ optimiser {stage['optimizer_gib']:.1f} + DDP buckets {stage['ddp_buckets_gib']:.1f}",
            f"    + max(activations {stage['activations_checkpointed_gib']:.1f} GiB with checkpointing / "
            f"{stage['activations_gib']:.1f} without + autocast copies {stage['autocast_cache_gib']:.1f}, "
            f"AdamW step {stage['optimizer_step_gib']:.1f})",
            f"    = peak {stage['total_checkpointed_gib']:.1f} / {stage['total_gib']:.1f} GiB; "
            f"planned {stage['planned_checkpointed_gib']:.1f} / {stage['planned_gib']:.1f} GiB"
            f"  -> this config: {stage['planned' + suffix + '_gib']:.1f} GiB",
        ]
    lines.append(
        f"  (per GPU under DDP; one process has no DDP buckets. planned = peak + the CUDA context and "
        f"fragmentation, {CUDA_CONTEXT_GIB:g} GiB + {FRAGMENTATION:.0%}. Not counted: the frozen MLLM/VAE "
        "forward passes)"
    )
    return "\n".join(lines)
