"""The models a training run needs: the recipe's frozen MLLM, VAE and scheduler, its transformer with a new
LoRA (peft, through diffusers' `add_adapter`), and a new Dual Layer Aggregator.

Loading goes through `squeeze_cli.loading` (the same `from_pretrained` calls as `squeeze gen`); only the
aggregator is not loaded, because it is what training creates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from squeeze_cli.loading import builtin_checkpoint, load_component
from squeeze_cli.manifest.schema import ComponentSource, ModelSpec
from squeeze_cli.pipelines.aggregator import DualLayerAggregator
from squeeze_cli.train.config import AggregatorSpec, LoadedConfig, LoraTrainSpec

FROZEN_COMPONENTS = ("mllm", "tokenizer", "image_processor", "transformer", "vae", "scheduler")


@dataclass
class BaseModels:
    """The loaded components (everything but the aggregator) and where the pipeline came from."""

    components: dict[str, Any]
    pipeline_source: str | None  # a SqueezePipeline folder or hub id, when the recipe names one


def base_pipeline_source(spec: ModelSpec) -> str | None:
    """The full-pipeline folder a recipe loads from (the tiny checkpoint for `builtin: tiny`)."""
    if spec.builtin:
        return str(builtin_checkpoint(spec))
    return spec.pipeline


def load_base_models(spec: ModelSpec, dtype: torch.dtype) -> BaseModels:
    """Load every component of the recipe but the aggregator, with the libraries' own `from_pretrained`."""
    source = base_pipeline_source(spec)
    components: dict[str, Any] = {}
    for name in FROZEN_COMPONENTS:
        if name in spec.components:
            component = spec.components[name]
        elif source is not None:
            component = ComponentSource(path=source, subfolder=name)
        else:  # assembled from parts: the MLLM's tokenizer and image processor live with it
            component = spec.components["mllm"]
        components[name] = load_component(name, component, dtype=dtype, spec=spec, allow_pickle=False)
    return BaseModels(components, source)


def new_aggregator(spec: AggregatorSpec, mllm: Any, transformer: Any, seed: int) -> DualLayerAggregator:
    """A freshly initialised DLA sized from the MLLM's and transformer's configs (seeded, RNG left alone).

    Raises `ValueError` when the spec does not fit the MLLM (e.g. `layers` out of range)."""
    text_config = mllm.config.get_text_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DualLayerAggregator(
            num_hidden_states=text_config.num_hidden_layers + 1,
            mllm_hidden_size=text_config.hidden_size,
            width=spec.width,
            num_heads=spec.num_heads,
            num_blocks=spec.num_blocks,
            joint_attention_dim=transformer.config.joint_attention_dim,
            pooled_projection_dim=transformer.config.pooled_projection_dim,
            layers=spec.layers,
            single_lap=spec.single_lap,
        )


def lora_config(spec: LoraTrainSpec, transformer: Any) -> Any:
    from peft import LoraConfig

    targets = list(spec.targets)
    if spec.single_blocks_proj_out:  # full module names: peft matches those exactly
        count = len(transformer.single_transformer_blocks)
        targets += [f"single_transformer_blocks.{i}.proj_out" for i in range(count)]
    return LoraConfig(
        r=spec.rank,
        # peft annotates lora_alpha as int, but uses it as a float (scale = alpha / rank).
        lora_alpha=spec.alpha if spec.alpha is not None else spec.rank,  # type: ignore[arg-type]
        lora_dropout=spec.dropout,
        init_lora_weights="gaussian",  # B = 0: the untrained LoRA leaves the transformer unchanged
        target_modules=targets,
    )


def add_lora(transformer: Any, spec: LoraTrainSpec, seed: int) -> None:
    """Add the trainable LoRA adapter (diffusers' `add_adapter`, peft underneath) to `transformer`.

    Raises `ValueError` when `spec.targets` names no module of the transformer."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer.add_adapter(lora_config(spec, transformer))


def build_trainable(loaded: LoadedConfig, mllm: Any, transformer: Any, seed: int) -> DualLayerAggregator:
    """Add the LoRA to `transformer` and return a new aggregator; a config that does not fit the models
    (LoRA targets naming no module, aggregator layers out of range) raises a `ManifestError` located at the
    config key."""
    try:
        add_lora(transformer, loaded.config.lora, seed + 1)
    except ValueError as error:
        raise loaded.error(
            ("lora", "targets"), _first_line(error), "FLUX attention: to_q, to_k, to_v, ..."
        ) from None
    try:
        return new_aggregator(loaded.config.aggregator, mllm, transformer, seed + 2)
    except ValueError as error:
        states = mllm.config.get_text_config().num_hidden_layers + 1
        raise loaded.error(
            ("aggregator",), _first_line(error), f"the MLLM has {states} hidden states"
        ) from None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class TrainableModels(nn.Module):
    """The two trained modules under one `nn.Module`, so accelerate prepares (and DDP wraps) them together.

    `forward(compute)` runs `compute(self)`: the whole loss is one forward call of the wrapped module, which
    is what DistributedDataParallel expects before each backward.
    """

    def __init__(self, aggregator: DualLayerAggregator, transformer: nn.Module):
        super().__init__()
        self.aggregator = aggregator
        self.transformer = transformer

    def forward(self, compute: Callable[[TrainableModels], Any]) -> Any:
        return compute(self)


def group_parameters(models: TrainableModels) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """The named parameters of each trainable group: the whole aggregator, and the transformer's LoRA."""
    return {
        "aggregator": [(f"aggregator.{n}", p) for n, p in models.aggregator.named_parameters()],
        "lora": [(f"transformer.{n}", p) for n, p in models.transformer.named_parameters() if "lora_" in n],
    }


def set_trainable(models: TrainableModels, groups: Sequence[str]) -> None:
    """Only the parameters of `groups` get gradients; the transformer's base weights never do."""
    for group, params in group_parameters(models).items():
        for _, param in params:
            param.requires_grad_(group in groups)
    for name, param in models.transformer.named_parameters():
        if "lora_" not in name:
            param.requires_grad_(False)


def count(params: list[tuple[str, nn.Parameter]]) -> int:
    return sum(p.numel() for _, p in params)


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype of the frozen weights: bf16/fp16 under mixed precision; trained parameters stay fp32."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)


__all__ = [
    "BaseModels",
    "TrainableModels",
    "add_lora",
    "base_pipeline_source",
    "build_trainable",
    "group_parameters",
    "load_base_models",
    "new_aggregator",
    "set_trainable",
    "weight_dtype",
]
