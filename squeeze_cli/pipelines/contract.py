"""The contract between `squeeze gen` and a pipeline, as code: `SubjectPipeline`, and `SubjectBatchMixin`
with the glue every pipeline shares.

The runner (`squeeze_cli.gen.worker`) calls, for each subject of its jobs:

1. `condition = pipe.encode_subject(reference_images, reference_size)`, once per subject and size;
2. `pipe.prepare_prompts(condition, prompts)` for the next prompts of the subject, together (with model
   offload the text encoder then moves to the GPU once for them all; a no-op where there is nothing to do);
3. `pipe(prompt=[...], subject_condition=condition, generator=[one CPU generator per image],
   callback_on_step_end=fn, **sampling_kwargs)` per batch, where `sampling_kwargs` holds only the keys in
   `pipe.sampling_parameters`; the output has `.images` and `.stage_plan` (`None` for one-stage pipelines).

Before anything runs, `pipe.check_prompt_fits(reference_sizes, prompts)` raises `ValueError` for a prompt the
text encoder would cut. Denoising loops stay one per pipeline file, as in diffusers; what the pipelines
repeated around them lives in `SubjectBatchMixin`.
"""

from __future__ import annotations

import contextlib
import re
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import replace
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np
import PIL.Image
import torch
from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig
from diffusers.utils.torch_utils import randn_tensor

from squeeze_cli.params import StepCache, StepCacheMethod, choices

__all__ = [
    "SubjectBatchMixin",
    "SubjectPipeline",
    "SubjectPipelineOutput",
    "TransformerPasses",
    "probe_reference",
    "step_cache_config",
]

T = TypeVar("T")

# A `skip` target's threshold is found by bisection in (0, 1) over this many probe images (2⁻⁸ apart).
CALIBRATION_PROBES = 8
PROBE_PROMPT = "a photo of the object"


def step_cache_config(step_cache: StepCache) -> FirstBlockCacheConfig | TaylorSeerCacheConfig:
    """diffusers' cache config for a `StepCache` (`transformer.enable_cache` takes it)."""
    if step_cache.method == StepCacheMethod.first_block.value:
        return FirstBlockCacheConfig(threshold=step_cache.threshold)
    if step_cache.method == StepCacheMethod.taylorseer.value:
        # The lite variant forecasts only the transformer's output projection and skips every block on a
        # forecast step: a full pass saved, and a few MB of state instead of every block's features (GBs
        # at full size). Factors in float32 (diffusers defaults to bfloat16): they are that small, and a
        # difference of two bfloat16 outputs keeps few bits.
        return TaylorSeerCacheConfig(
            cache_interval=step_cache.interval,
            disable_cache_before_step=step_cache.warmup_steps,
            max_order=step_cache.order,
            taylor_factors_dtype=torch.float32,
            use_lite_mode=True,
        )
    raise ValueError(f"Unknown step cache method {step_cache.method!r}; use {choices(StepCacheMethod)}.")


def probe_reference() -> PIL.Image.Image:
    """The reference of the probe image that calibrates a `skip` target: fixed random pixels."""
    return PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))


class TransformerPasses:
    """Counts a transformer's calls and its full passes, through forward hooks until `remove()`: a layer
    inside its last block runs only when no step cache skipped the pass (First Block Cache skips every
    block after the first, TaylorSeer's lite variant every block)."""

    def __init__(self, transformer: torch.nn.Module):
        blocks = [
            module for name, module in transformer.named_modules() if re.fullmatch(r"\w*blocks\.\d+", name)
        ]
        layer = next(module for module in blocks[-1].modules() if isinstance(module, torch.nn.Linear))
        self.calls = self.full = 0
        self.handles = [
            transformer.register_forward_pre_hook(lambda *_: self._count("calls")),
            layer.register_forward_hook(lambda *_: self._count("full")),
        ]

    def _count(self, name: str) -> None:
        setattr(self, name, getattr(self, name) + 1)

    def reset(self) -> None:
        self.calls = self.full = 0

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class SubjectPipelineOutput(Protocol):
    """What a pipeline call returns: the images, and the stage plan (`None` for one-stage pipelines)."""

    images: Any
    stage_plan: Any


@runtime_checkable
class SubjectPipeline(Protocol):
    """What the runner needs of a pipeline; `pipelines.registry.PIPELINES` names the classes that meet it
    (`tests/test_pipeline_contract.py` checks every registered one)."""

    #: The `SamplingParams` keys `__call__` reads (the registry's `sampling_parameters`).
    sampling_parameters: frozenset[str]
    #: Whether the loader fused a LoRA into the transformer (recorded in every image's sidecar).
    lora_fused: bool
    #: (full, all) transformer passes of the last call per image with a step cache on, else `None`.
    step_cache_passes: tuple[int, int] | None

    def encode_subject(self, reference_images: Sequence[PIL.Image.Image], reference_size: int) -> Any: ...

    def check_prompt_fits(
        self, reference_sizes: Sequence[tuple[int, int]], prompts: Sequence[str]
    ) -> None: ...

    def prepare_prompts(self, subject_condition: Any, prompts: Sequence[str]) -> None: ...

    def calibrate_step_cache(self, step_cache: StepCache, **sampling: Any) -> float: ...

    def __call__(
        self,
        prompt: str | list[str],
        *,
        subject_condition: Any = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        **sampling_kwargs: Any,
    ) -> SubjectPipelineOutput: ...


class SubjectBatchMixin:
    """The glue around each pipeline's denoising loop: subject from references, input checks, per-image
    noise, the step cache, the step callback and a small prompt-encoding LRU.

    For a class that also derives from `DiffusionPipeline` (it provides `_execution_device`,
    `_callback_tensor_inputs` and `encode_subject`).
    """

    lora_fused = False
    #: The `StepCacheMethod` values its transformer runs with (the registry's `step_cache_methods`).
    step_cache_methods: frozenset[str] = frozenset()
    #: The diffusers cache config `_set_step_cache` put on the transformer (`None`: none of ours is on).
    _applied_step_cache: Any = None
    #: Counts the transformer's passes while a step cache is on (`step_cache_passes`).
    _passes: TransformerPasses | None = None
    #: Prompt encodings `_remember_prompt` keeps: a subject's prompts run together, so a few dozen is plenty.
    prompt_cache_size = 64

    def check_prompt_fits(self, reference_sizes: Sequence[tuple[int, int]], prompts: Sequence[str]) -> None:
        """Raise `ValueError` for a prompt the text encoder would cut; nothing is cut by default."""

    def prepare_prompts(self, subject_condition: Any, prompts: Sequence[str]) -> None:
        """Encode `prompts` ahead of their batches; nothing to do by default."""

    def _subject(self, subject_condition: Any, reference_images: Any, reference_size: int) -> Any:
        """The subject condition to generate with: the one given, or the references encoded now."""
        if subject_condition is not None:
            return subject_condition
        if reference_images is None:
            raise ValueError("Pass `subject_condition` (from `encode_subject`) or `reference_images`.")
        return self.encode_subject(reference_images, reference_size)  # type: ignore[attr-defined]

    @staticmethod
    def _check_size(height: int, width: int, multiple: int) -> None:
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % multiple:
                raise ValueError(f"`{name}` has to be a positive multiple of {multiple} but is {value}.")

    def _check_callback_inputs(self, names: Sequence[str]) -> None:
        unknown = [name for name in names if name not in self._callback_tensor_inputs]  # type: ignore[attr-defined]
        if unknown:
            raise ValueError(f"`callback_on_step_end_tensor_inputs` has unknown names {unknown}.")

    @staticmethod
    def _check_generators(generator: torch.Generator | list[torch.Generator] | None, batch_size: int) -> None:
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"Got {len(generator)} generators for {batch_size} prompts; pass one per image.")

    @staticmethod
    def _initial_noise(
        shape: Sequence[int],
        generator: torch.Generator | list[torch.Generator] | None,
        device: torch.device,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """Gaussian noise drawn in float32 (then cast), so a seed gives the same start whatever the model
        dtype; with a list of CPU generators each image's noise comes from its own generator, so an image
        does not depend on the batch it is in."""
        return randn_tensor(tuple(shape), generator=generator, device=device, dtype=torch.float32).to(dtype)

    def _set_step_cache(self, step_cache: StepCache | None) -> None:
        """Put diffusers' step-caching hook on the transformer as `step_cache` asks (or take off the one
        a previous call put there), and empty its cached residuals so nothing carries over between calls.
        The denoising loop names a cache context around every transformer call (one per CFG branch).

        A cache the caller enabled on `pipe.transformer` directly is left in place when `step_cache` is
        `None`.
        """
        transformer = self.transformer  # type: ignore[attr-defined]
        wanted = None
        if step_cache is not None:
            if step_cache.method not in self.step_cache_methods:
                takes = ", ".join(sorted(self.step_cache_methods)) or "none"
                raise ValueError(
                    f"{type(self).__name__} cannot run step cache method {step_cache.method!r}; "
                    f"it takes: {takes}."
                )
            if step_cache.skip is not None:
                raise ValueError(
                    "A `skip` target needs its threshold first: pass `replace(step_cache, skip=None, "
                    "threshold=pipe.calibrate_step_cache(step_cache, **sampling))`."
                )
            wanted = step_cache_config(step_cache)
        applied = self._applied_step_cache
        if wanted is not None and transformer._cache_config != wanted:
            if transformer.is_cache_enabled:
                transformer.disable_cache()
            transformer.enable_cache(wanted)
            self._applied_step_cache = wanted
        elif wanted is None and applied is not None and transformer._cache_config is applied:
            transformer.disable_cache()
            self._applied_step_cache = None
        if transformer.is_cache_enabled:
            transformer._reset_stateful_cache()
        self._count_passes(transformer if transformer.is_cache_enabled else None)

    def _count_passes(self, transformer: torch.nn.Module | None) -> None:
        """Count `transformer`'s passes from now (`None`: stop counting)."""
        if self._passes is not None and transformer is None:
            self._passes.remove()
            self._passes = None
        elif transformer is not None:
            if self._passes is None:
                self._passes = TransformerPasses(transformer)
            self._passes.reset()

    @property
    def step_cache_passes(self) -> tuple[int, int] | None:
        """(full, all) transformer passes of the last call, for each of its images; `None` when it ran
        without a step cache (every pass full)."""
        return None if self._passes is None else (self._passes.full, self._passes.calls)

    def calibrate_step_cache(self, step_cache: StepCache, **sampling: Any) -> float:
        """The `first_block` threshold that skips at least `step_cache.skip` of the transformer passes of a
        probe image (`probe_reference()`, `PROBE_PROMPT`, seed 0) made with `sampling` (the job's
        other sampling keys: size, steps, guidance): the smallest of `CALIBRATION_PROBES` bisection steps,
        1.0 when even that skips less. Deterministic, so the images of one target are reproducible."""
        assert step_cache.skip is not None
        reference_size = sampling.get("reference_size", 512)
        subject = self.encode_subject([probe_reference()], reference_size)  # type: ignore[attr-defined]
        low, high = 0.0, 1.0
        for _ in range(CALIBRATION_PROBES):
            threshold = (low + high) / 2
            self(  # type: ignore[operator]
                [PROBE_PROMPT],
                subject_condition=subject,
                generator=[torch.Generator("cpu").manual_seed(0)],
                output_type="latent",
                **{**sampling, "step_cache": replace(step_cache, skip=None, threshold=threshold)},
            )
            assert self.step_cache_passes is not None
            full, calls = self.step_cache_passes
            if calls - full >= step_cache.skip * calls:
                high = threshold
            else:
                low = threshold
        return high

    @contextlib.contextmanager
    def _step_cache_off(self) -> Iterator[None]:
        """The transformer without its step-cache hook, for a pass outside the denoising loop: diffusers'
        hooks refuse a call outside a cache context, and a forecast there would be wrong."""
        transformer = self.transformer  # type: ignore[attr-defined]
        config = transformer._cache_config if transformer.is_cache_enabled else None
        if config is not None:
            transformer.disable_cache()
        try:
            yield
        finally:
            if config is not None:
                transformer.enable_cache(config)

    def _step_callback(
        self,
        callback: Callable[..., dict] | None,
        step: int,
        timestep: torch.Tensor,
        tensor_inputs: Sequence[str],
        step_locals: dict[str, Any],
    ) -> dict[str, Any]:
        """Run `callback(pipe, step, timestep, {name: tensor})` for the tensors it asked for (taken from the
        loop's `locals()`); returns what it gave back (empty without a callback)."""
        if callback is None:
            return {}
        return callback(self, step, timestep, {name: step_locals[name] for name in tensor_inputs})

    def _remember_prompt(self, key: Hashable, encode: Callable[[], T]) -> T:
        """`encode()`'s result for `key`, computed once and kept in a least-recently-used cache of
        `prompt_cache_size` entries."""
        cache: OrderedDict[Hashable, Any] = self.__dict__.setdefault("_prompt_cache", OrderedDict())
        if key in cache:
            cache.move_to_end(key)
        else:
            cache[key] = encode()
            if len(cache) > self.prompt_cache_size:
                cache.popitem(last=False)
        return cache[key]
