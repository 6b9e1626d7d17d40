"""From a recipe's model section to a loaded pipeline, through the libraries' own `from_pretrained`.

The pipeline class comes from the registry (`pipelines/registry.py`); this module names none. A pipeline
that `takes_components` (the squeeze pipeline) is assembled from separately loaded parts; any other loads
through its class's `from_pretrained`, which handles its own checkpoint's quirks.

Loading imports torch, diffusers and transformers: only `squeeze gen` (not `--help` or `validate`) comes
here. Importing this module imports none of them, so finding a cached tiny checkpoint (`cache_dir`,
`build_into_cache`: a cached `squeeze eval --metrics tiny`) stays light.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

from squeeze_cli.errors import ModelLoadError, UsageError
from squeeze_cli.logs import log_line
from squeeze_cli.manifest.schema import ComponentSource, ModelSpec
from squeeze_cli.model_checks import (
    DAMAGED_HINT,
    LOAD_ORDER,
    PICKLE_HINT,
    read_cache_only_if_hub_unreachable,
)
from squeeze_cli.params import Dtype
from squeeze_cli.pipelines.registry import pipeline_spec

if TYPE_CHECKING:
    import torch


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a `params.Dtype` name."""
    import torch

    return getattr(torch, Dtype(name).value)


# Bump when the tiny builder changes what it writes, so old caches are not reused.
TINY_FORMAT = 3  # bumped when the tiny checkpoint's layout or class paths change


def cache_dir() -> Path:
    """Where squeeze keeps what it builds (the tiny checkpoints): $SQUEEZE_CACHE or ~/.cache/squeeze."""
    if os.environ.get("SQUEEZE_CACHE"):
        return Path(os.environ["SQUEEZE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "squeeze"


def ensure_tiny_checkpoint(family: str, pipeline_class: str | None = None) -> Path:
    """Build the tiny random checkpoint once into the cache (`build_into_cache`).

    `pipeline_class` names another registered pipeline's tiny twin (`family` is then unused).
    """
    registered = pipeline_spec(pipeline_class)
    # The squeeze pipeline's twin mimics an MLLM family; the cache keeps one per family.
    options: dict[str, Any] = {"family": family} if registered.takes_components else {}
    name = family if registered.takes_components else registered.name
    target = cache_dir() / f"tiny-{name}-v{TINY_FORMAT}"
    return build_into_cache(
        target, "model_index.json", lambda folder: registered.build_tiny(folder, **options)
    )


def build_into_cache(target: Path, marker: str, build: Callable[[Path], object]) -> Path:
    """`target`, built once by `build(folder)` unless its `marker` file is there; concurrent processes are
    safe.

    Each builder writes into its own temporary folder and renames it into place; whoever renames first
    wins and the others discard their copy (the builds are identical: deterministic from the seed). A
    build that lacks weights is refused, never cached (see `_missing_weights`).
    """
    if (target / marker).is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as error:
        raise ModelLoadError(
            f"cannot build {target.name} in squeeze's cache {target.parent}: {error.strerror or error}",
            "set SQUEEZE_CACHE to a folder you can write",
        ) from None
    try:
        build(staging)
        missing = _missing_weights(staging)
        if missing:
            raise ModelLoadError(
                f"the tiny checkpoint {target.name} built in this process lacks weights "
                f"({', '.join(missing)})",
                "build it from one process first (`squeeze gen` does so on the main process), then launch",
            )
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / marker).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def builtin_checkpoint(spec: ModelSpec) -> Path:
    """The tiny checkpoint a `builtin: tiny` model section runs (its family's, or its pipeline's twin)."""
    return ensure_tiny_checkpoint(spec.family or "internvl", spec.pipeline_class)


def _missing_weights(folder: Path) -> list[str]:
    """What a freshly built checkpoint lacks: `model` when the folder is one model (no subfolders) without
    weights, else its component folders that are empty or have a model config but no weights. That is
    what transformers' save_pretrained leaves on a distributed rank other than 0: such a folder must never
    become the cache every later run trusts."""
    parts = [part for part in folder.iterdir() if part.is_dir()]
    if not parts:
        return [] if any(folder.glob("*.safetensors")) else ["model"]
    return sorted(
        part.name
        for part in parts
        if (not any(part.iterdir()) or (part / "config.json").is_file())
        and not any(part.glob("*.safetensors"))
    )


LORA_MISMATCH_HINT = (
    "the LoRA does not fit this recipe's model (trained for another model or size?): give the LoRA "
    "`squeeze train` wrote for it, or remove `model.lora`"
)


# What `from_pretrained` raises for weights it cannot load; RuntimeError: weights of other sizes than the
# model's config (or, for a LoRA, than the layers it adapts).
_LOAD_ERRORS = (OSError, ValueError, RuntimeError, SafetensorError)
SHAPE_HINT = (
    "its weights are not the ones its config.json describes (another size of the model?): "
    "take both from the same checkpoint"
)
# diffusers logs a failed load's error before raising it, which squeeze reports as its one `error:` line.
_ERROR_LOGGING_MODULES = ("diffusers.models.modeling_utils", "diffusers.loaders.peft")


def _drop_logged_load_error(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR or not record.getMessage().startswith(
        ("An error occurred while trying to fetch", "Loading squeeze was unsuccessful")
    )


def _use_safetensors(allow_pickle: bool) -> bool | None:
    # True: safetensors or nothing. None: safetensors when there, pickle otherwise (False would skip them).
    return None if allow_pickle else True


def _component_loaders() -> dict[str, Any]:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    from squeeze_cli.pipelines.aggregator import DualLayerAggregator

    return {
        # The base model (`InternVLModel`, `Qwen2_5_VLModel`): squeeze reads hidden states, so the LM head
        # (about 1 GiB in bf16 at 8 B parameters) would only take memory.
        "mllm": AutoModel,
        "tokenizer": AutoTokenizer,
        "image_processor": AutoImageProcessor,
        "aggregator": DualLayerAggregator,
        "transformer": FluxTransformer2DModel,
        "vae": AutoencoderKL,
        "scheduler": FlowMatchEulerDiscreteScheduler,
    }


def _load_error(
    what: str, source: str, error: Exception, field: str, mismatch_hint: str | None = None
) -> ModelLoadError:
    """One line naming the model, why it failed and how to get it; `field` is where the path is set, and
    `mismatch_hint` what to say when the weights are there but do not load."""
    lines = str(error).strip().splitlines()
    reason = lines[0] if lines else type(error).__name__
    if reason.endswith(":") and len(lines) > 1:  # torch's "Error(s) in loading state_dict for Linear:"
        reason = f"{reason} {lines[1].strip()}"
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    local = source.startswith(("/", "./", "../", "~"))
    if isinstance(error, SafetensorError):
        hint = DAMAGED_HINT
    elif "ignore_mismatched_sizes" in reason:  # the libraries' advice to load random weights instead
        shapes = reason.split(" If you want to instead")[0]  # diffusers names the tensor first
        reason = shapes if shapes != reason else "weights of other sizes than its config.json (listed above)"
        hint = mismatch_hint or SHAPE_HINT
    elif "safetensors" in reason.lower():
        # Refused pickle weights read as missing safetensors ones; a folder without any is damaged.
        folder = Path(source).expanduser()
        pickled = not local or any(folder.glob("*.bin")) or any(folder.glob("*/*.bin"))
        hint = PICKLE_HINT if pickled else DAMAGED_HINT
    elif local and not Path(source).expanduser().exists():
        reason = f"no such folder: {source}"
        hint = f"fix `{field}` in the recipe or manifest, or override it with --set {field}=DIR"
    elif offline and not Path(source).expanduser().exists():
        hint = f"it is not in the local cache and HF_HUB_OFFLINE is set: first run `hf download {source}`"
    elif not Path(source).expanduser().exists():
        hint = "check the hub id or local path (and your access to gated models, e.g. `hf auth login`)"
    else:
        hint = mismatch_hint or "check that the folder holds a complete checkpoint in the expected layout"
    return ModelLoadError(f"cannot load {what} from `{source}`: {reason}", hint)


def load_component(
    name: str,
    source: Any,
    *,
    dtype: torch.dtype,
    spec: ModelSpec,
    allow_pickle: bool,
    field: str | None = None,
) -> Any:
    """One component with its library's `from_pretrained`; `field` is the setting an error names (by default
    `model.components.<name>.path`)."""
    loader = _component_loaders()[name]
    kwargs: dict[str, Any] = {}
    if source.subfolder:
        kwargs["subfolder"] = source.subfolder
    if source.revision:
        kwargs["revision"] = source.revision
    if name in ("mllm", "aggregator", "transformer", "vae"):
        kwargs["use_safetensors"] = _use_safetensors(allow_pickle)
        kwargs["dtype"] = dtype
    if name in ("mllm", "tokenizer", "image_processor"):
        kwargs["trust_remote_code"] = spec.trust_remote_code
    if name == "image_processor":
        kwargs["backend"] = "pil"  # the torchvision backend needs torchvision
    try:
        return loader.from_pretrained(source.path, **kwargs)
    except _LOAD_ERRORS as error:
        raise _load_error(name, source.path, error, field or f"model.components.{name}.path") from error


def load_pipeline(
    spec: ModelSpec,
    *,
    device: str = "cpu",
    offload: str = "none",
    allow_pickle: bool = False,
    fuse_lora: bool = True,
) -> Any:
    """Load the pipeline a recipe's model section describes, with its LoRA, on `device`.

    Args:
        spec: the resolved model section (`LoadedManifest.model`).
        device: a torch device string; with offloading, the GPU the offload hooks move weights to.
        offload: `none`, `model` (`enable_model_cpu_offload`) or `sequential`
            (`enable_sequential_cpu_offload`).
        allow_pickle: accept pickle-based (`.bin`) weights; safetensors only by default.
        fuse_lora: merge the LoRA into the transformer's weights (its scale is fixed for the run), so
            denoising runs no extra LoRA matmuls; `pipe.lora_fused` records it. False keeps it separate.
    """
    if note := read_cache_only_if_hub_unreachable(spec):
        log_line(f"note: {note}")
    import diffusers
    import transformers

    # The libraries' own per-file bars would interleave with the run's progress; the run reports loading.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    for name in _ERROR_LOGGING_MODULES:
        if _drop_logged_load_error not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(_drop_logged_load_error)
    if spec.trust_remote_code:
        log_line("warning: the preset sets trust_remote_code: code from the model repository will run")
    dtype = torch_dtype(spec.dtype)
    registered = pipeline_spec(spec.pipeline_class)
    source = str(builtin_checkpoint(spec)) if spec.builtin else spec.pipeline
    if registered.takes_components:
        pipe = _assemble_pipeline(
            registered.load_class(), spec, source, dtype=dtype, allow_pickle=allow_pickle
        )
    else:
        assert source is not None  # ModelSpec: another pipeline_class needs `pipeline` or `builtin`
        try:
            pipe = registered.load_class().from_pretrained(
                source, dtype=dtype, use_safetensors=_use_safetensors(allow_pickle)
            )
        except _LOAD_ERRORS as error:
            raise _load_error(f"the {registered.name} pipeline", source, error, "model.pipeline") from error
    return _finish_loading(
        pipe, spec, device=device, offload=offload, allow_pickle=allow_pickle, fuse_lora=fuse_lora
    )


def _assemble_pipeline(
    pipeline_class: Any, spec: ModelSpec, source: str | None, *, dtype: torch.dtype, allow_pickle: bool
) -> Any:
    """A pipeline that `takes_components`, from its folder (`source`) with the components the recipe names
    loaded separately, or from those components alone; its MLLM checked against `model.family`."""
    components = dict(spec.components)
    if source is None:
        # Assembled from parts: the MLLM's tokenizer and image processor live with it unless named.
        for name in ("tokenizer", "image_processor"):
            components.setdefault(name, components["mllm"])
    # Small parts first, so a broken one is reported before minutes spent on the MLLM and transformer.
    ordered = sorted(components.items(), key=lambda item: LOAD_ORDER.index(item[0]))
    overrides = {
        name: load_component(name, component, dtype=dtype, spec=spec, allow_pickle=allow_pickle)
        for name, component in ordered
    }
    if "mllm" not in overrides:
        assert source is not None  # without a folder, ModelSpec requires every component, the MLLM too
        # The folder's model_index names the MLLM with its LM head; load it as the base model instead.
        overrides["mllm"] = load_component(
            "mllm",
            ComponentSource(path=source, subfolder="mllm"),
            dtype=dtype,
            spec=spec,
            allow_pickle=allow_pickle,
            field="model.pipeline",
        )
    try:
        if source is None:
            pipe = pipeline_class(**overrides)
        else:
            pipe = pipeline_class.from_pretrained(
                source, dtype=dtype, use_safetensors=_use_safetensors(allow_pickle), **overrides
            )
    except _LOAD_ERRORS as error:
        raise _load_error("the pipeline", source or "components", error, "model.pipeline") from error
    # The MLLM is loaded by transformers with `dtype`; diffusers' `torch_dtype` covers the rest.
    pipe.mllm.to(dtype)
    model_type = pipe.mllm.config.model_type
    if spec.family is not None and model_type != spec.family:
        raise ModelLoadError(
            f"model.family is {spec.family!r} but the MLLM loaded from "
            f"{source or spec.components['mllm'].path} "
            f"is {model_type!r}",
            f"set `family: {model_type}` or remove `family` (it is read from the checkpoint)",
        )
    if misfit := _aggregator_misfit(pipe):
        aggregator = spec.components.get("aggregator")
        where = aggregator.path if aggregator else source
        raise ModelLoadError(
            f"the aggregator from {where} does not fit the model: {misfit}",
            "give the aggregator `squeeze train` wrote for this MLLM and transformer "
            "(RUN/stageN/aggregator, with RUN/recipe.yaml), or fix `model.components.aggregator.path`",
        )
    if spec.mllm is not None:  # the schema checked the options against `family`, and `family` just now
        pipe.set_mllm_options(**spec.mllm.encoder_options())
    return pipe


def _aggregator_misfit(pipe: Any) -> str | None:
    """Why the aggregator (a DLA trained for another MLLM or transformer) cannot join its pipeline's MLLM and
    transformer, from their configs; None when it fits. Loading would succeed and every job then fail."""
    text = pipe.mllm.config.get_text_config()
    aggregator, transformer = pipe.aggregator.config, pipe.transformer.config
    pairs = [
        ("num_hidden_states", text.num_hidden_layers + 1, "the MLLM gives"),
        ("mllm_hidden_size", text.hidden_size, "the MLLM's hidden size is"),
        ("joint_attention_dim", transformer.joint_attention_dim, "the transformer takes"),
        ("pooled_projection_dim", transformer.pooled_projection_dim, "the transformer takes"),
    ]
    for key, wanted, what in pairs:
        if aggregator[key] != wanted:
            return f"its {key} is {aggregator[key]}, {what} {wanted}"
    return None


def _finish_loading(
    pipe: Any, spec: ModelSpec, *, device: str, offload: str, allow_pickle: bool, fuse_lora: bool
) -> Any:
    """What every pipeline gets once loaded: its LoRA, its device or offloading, `torch.compile` when the
    recipe asks, no progress bars."""
    if spec.lora is not None:
        try:
            pipe.load_lora_weights(
                spec.lora.path,
                weight_name=spec.lora.weight_name,
                adapter_name="squeeze",
                use_safetensors=_use_safetensors(allow_pickle),
            )
        # A LoRA of another model: its layers are not there (ValueError) or of another size (RuntimeError).
        except _LOAD_ERRORS as error:
            raise _load_error(
                "the LoRA", spec.lora.path, error, "model.lora.path", LORA_MISMATCH_HINT
            ) from error
        pipe.set_adapters(["squeeze"], adapter_weights=[spec.lora.scale])
        if fuse_lora:
            # Merged at the recipe's scale, then the LoRA layers dropped: the fused weights stay.
            pipe.fuse_lora(components=["transformer"], adapter_names=["squeeze"])
            pipe.unload_lora_weights()
    pipe.lora_fused = spec.lora is not None and fuse_lora

    if offload == "none":
        pipe.to(device)
    elif not device.startswith("cuda"):
        raise UsageError(
            f"--offload {offload} moves weights to a GPU, but the device is {device}", "use --offload none"
        )
    elif offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.enable_sequential_cpu_offload(device=device)
    if spec.compile:
        # diffusers' regional compilation: each repeated transformer block class is compiled once and
        # reused by every block of that class, which compiles several times faster than the whole model for
        # the same speed. Compiling happens on the first steps of each new sequence length.
        pipe.transformer.compile_repeated_blocks()
    pipe.set_progress_bar_config(disable=True)
    return pipe
