"""SqueezePipeline: subject-driven generation with an MLLM condition, VAE identity tokens and FLUX.

The whole inference path of "Squeezing Capacity from Multimodal Large Language Models for Subject-driven
Generation" (2026) in one file, in the layout of diffusers' `pipeline_flux.py` / `pipeline_flux_kontext.py`:

1. the MLLM reads the reference image(s) and the instruction jointly (references first, so the reference
   prefix is shared by every prompt of a subject and cached);
2. the Dual Layer Aggregator pools every MLLM layer into FLUX's condition stream;
3. the references' VAE latents join the image stream as extra tokens (Kontext-style position ids);
4. multi-stage denoising: σ ≥ τ1 without reference tokens, τ2 ≤ σ < τ1 with both, σ < τ2 with the
   reference tokens and the null condition (`squeeze_cli.pipelines.stages.stage_plan`).

Inference only: no files, YAML or ranks here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import FluxLoraLoaderMixin
from diffusers.models import AutoencoderKL, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.schedulers import FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput, logging, replace_example_docstring
from transformers import PreTrainedModel

from squeeze_cli.params import PAPER_STAGE_THRESHOLDS, StepCache

from .aggregator import DualLayerAggregator
from .contract import SubjectBatchMixin
from .mllm import MLLMEncoder, MLLMEncoding, PrefixCache
from .registry import PIPELINES
from .stages import STAGE_MLLM, STAGE_REFERENCE, StagePlan, stage_plan

logger = logging.get_logger(__name__)

__all__ = ["SqueezePipeline", "SqueezePipelineOutput", "SubjectCondition"]

# Instruction conditions a subject keeps for reuse (a few MB each at full size): the prompt of the current
# seeds, its negative prompt, and a few more for batches that mix prompts.
INSTRUCTION_MEMO_SIZE = 8

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from PIL import Image
        >>> from squeeze_cli.pipelines.squeeze import SqueezePipeline
        >>> from squeeze_cli.pipelines.tiny import build_tiny_pipeline

        >>> pipe = SqueezePipeline.from_pretrained(build_tiny_pipeline("/tmp/squeeze-tiny"))
        >>> references = [Image.open("dog0.jpg").convert("RGB"), Image.open("dog1.jpg").convert("RGB")]
        >>> subject = pipe.encode_subject(references, reference_size=64)
        >>> images = pipe(
        ...     ["a dog on the beach", "a dog in the snow"],
        ...     subject_condition=subject,
        ...     height=64,
        ...     width=64,
        ...     num_inference_steps=4,
        ...     generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)],
        ... ).images
        ```
"""


@dataclass
class SqueezePipelineOutput(BaseOutput):
    """
    Output of [`SqueezePipeline`].

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
            The generated images (or packed latents for `output_type="latent"`).
        stage_plan (`StagePlan`):
            The per-step schedule the images were denoised with (σ values and stage of every step).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    stage_plan: StagePlan


@dataclass
class SubjectCondition:
    """Everything about one subject that does not depend on the prompt, computed once by `encode_subject`.

    Args:
        prefix: the MLLM's cache over the reference-image prefix (`None` when the MLLM did not see the
            references, e.g. when only precomputed reference latents are given).
        image_tokens: the aggregated image tokens of the prefix, (n_image_tokens, joint_attention_dim).
        reference_latents: per reference, normalised VAE latents of shape (latent_channels, h, w).
        instruction_conditions: the aggregated conditions of the instructions most recently encoded on
            this subject, by text (at most `memo_size`, or one call's prompts), reused by later calls: a
            prompt's seeds come one after another, so each prompt is encoded once, not per batch.
        memo_size: how many instruction conditions to keep; `prepare_prompts` raises it to what it encodes.
    """

    prefix: PrefixCache | None
    image_tokens: torch.Tensor | None
    reference_latents: list[torch.Tensor]
    instruction_conditions: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, repr=False
    )
    memo_size: int = INSTRUCTION_MEMO_SIZE

    @property
    def num_references(self) -> int:
        return len(self.reference_latents)


def reference_image_size(width: int, height: int, reference_size: int, multiple: int = 16) -> tuple[int, int]:
    """(width, height) a reference is resized to: longer side = `reference_size`, aspect kept, each side
    rounded down to a multiple of `multiple` (so it packs 2×2 after the VAE), never below `multiple`."""
    scale = reference_size / max(width, height)
    new_width = max(multiple, int(width * scale) // multiple * multiple)
    new_height = max(multiple, int(height * scale) // multiple * multiple)
    return new_width, new_height


class SqueezePipeline(SubjectBatchMixin, DiffusionPipeline, FluxLoraLoaderMixin):
    r"""
    Subject-driven generation: an MLLM reads the reference image(s) and the instruction together, a Dual Layer
    Aggregator turns all its layers into FLUX's condition, and the references' VAE latents join FLUX's image
    stream, with a multi-stage denoising schedule.

    Args:
        mllm ([`~transformers.PreTrainedModel`]):
            The multimodal LLM (InternVL3-hf or Qwen2.5-VL), frozen.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            The MLLM's tokenizer (with its chat template and image tokens).
        image_processor ([`~transformers.image_processing_utils.BaseImageProcessor`]):
            The MLLM's image processor (not to be confused with `vae_image_processor`).
        aggregator ([`DualLayerAggregator`]):
            Pools every MLLM layer into the transformer's `encoder_hidden_states` and `pooled_projections`.
        transformer ([`FluxTransformer2DModel`]):
            The MMDiT that denoises the image latents (FLUX.1-dev with a LoRA in the paper).
        vae ([`AutoencoderKL`]):
            Encodes the references and decodes the result.
        scheduler ([`FlowMatchEulerDiscreteScheduler`]):
            FLUX's flow-matching scheduler.
    """

    # diffusers leaves `model_cpu_offload_seq = None` unannotated, so mypy types it as None.
    model_cpu_offload_seq = "mllm->aggregator->transformer->vae"  # type: ignore[assignment]
    _optional_components: list[str] = []
    _callback_tensor_inputs = ["latents", "prompt_embeds"]
    # The LoRA goes into the transformer only; there is no CLIP text encoder to load one into.
    _lora_loadable_modules = ["transformer"]
    text_encoder = None
    sampling_parameters = PIPELINES["squeeze"].sampling_parameters
    step_cache_methods = PIPELINES["squeeze"].step_cache_methods

    @classmethod
    def load_lora_into_text_encoder(cls, *args: Any, **kwargs: Any) -> None:
        """Nothing to load: the MLLM is frozen and never carries a LoRA. diffusers' FLUX loader calls this
        for every LoRA and would warn that "no LoRA keys" match a `NoneType` text encoder on every `gen`."""

    def __init__(
        self,
        mllm: PreTrainedModel,
        tokenizer: Any,
        image_processor: Any,
        aggregator: DualLayerAggregator,
        transformer: FluxTransformer2DModel,
        vae: AutoencoderKL,
        scheduler: FlowMatchEulerDiscreteScheduler,
    ):
        super().__init__()
        self.register_modules(
            mllm=mllm,
            tokenizer=tokenizer,
            image_processor=image_processor,
            aggregator=aggregator,
            transformer=transformer,
            vae=vae,
            scheduler=scheduler,
        )
        self.vae_scale_factor = (
            2 ** (len(self.vae.config.block_out_channels) - 1) if getattr(self, "vae", None) else 8
        )
        self.latent_channels = self.vae.config.latent_channels if getattr(self, "vae", None) else 16
        # Latents are packed 2×2, so pixel sizes must be multiples of vae_scale_factor * 2.
        self.vae_image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)
        self.default_sample_size = 64
        self._mllm_encoder: MLLMEncoder | None = None
        self._mllm_encoder_key: tuple[int, int, int] | None = None
        self._mllm_options: dict[str, Any] = {}
        self._null_condition: tuple[torch.Tensor, torch.Tensor] | None = None
        self._null_condition_key: tuple | None = None
        self._stage_plan: StagePlan | None = None
        self._guidance_scale = 2.5
        self._joint_attention_kwargs: dict[str, Any] = {}
        self._num_timesteps = 0
        self._current_timestep = None
        self._interrupt = False

    # ----------------------------------------------------------------------------------------------------
    # MLLM + aggregator
    # ----------------------------------------------------------------------------------------------------

    @property
    def mllm_encoder(self) -> MLLMEncoder:
        """The `MLLMEncoder` over the registered `mllm`, `tokenizer` and `image_processor`."""
        key = (id(self.mllm), id(self.tokenizer), id(self.image_processor))
        if self._mllm_encoder is None or self._mllm_encoder_key != key:
            self._mllm_encoder = MLLMEncoder(
                self.mllm, self.tokenizer, self.image_processor, **self._mllm_options
            )
            self._mllm_encoder_key = key
        return self._mllm_encoder

    def set_mllm_options(self, **options: Any) -> None:
        """How the MLLM preprocesses references: `MLLMEncoder` options of this MLLM's family
        (`crop_to_patches` for InternVL, `max_pixels` for Qwen2.5-VL); no options keeps the image
        processor's own settings. Cached subject conditions made before are not updated."""
        self._mllm_options = dict(options)
        self._mllm_encoder = None
        self.mllm_encoder  # noqa: B018 (built now, so that an option of another family fails here)

    @torch.no_grad()
    def encode_null_condition(
        self, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""
        The null condition of stage 3: the aggregated encoding of an empty instruction with no image.

        Computed once and cached on the pipeline (recomputed if the MLLM or aggregator is swapped).

        Returns:
            `(null_embeds, null_pooled)` of shapes (n, joint_attention_dim) and (pooled_projection_dim,).
        """
        key = (id(self.mllm), id(self.aggregator))
        if self._null_condition is None or self._null_condition_key != key:
            embeds, pooled = self.aggregator(self.mllm_encoder.encode_null())
            self._null_condition = (embeds.detach(), pooled.detach())
            self._null_condition_key = key
        embeds, pooled = self._null_condition
        device = device or self._execution_device
        dtype = dtype or self.transformer.dtype
        return embeds.to(device=device, dtype=dtype), pooled.to(device=device, dtype=dtype)

    def check_prompt_fits(self, reference_sizes: Sequence[tuple[int, int]], prompts: Sequence[str]) -> None:
        """Raise `ValueError` for a prompt too long for the MLLM's context with references of these sizes."""
        self.mllm_encoder.check_fits(reference_sizes, prompts)

    @staticmethod
    def _pad_conditions(
        embeds: list[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stack per-prompt conditions (n_i, D) into (B, max n, D), zero-padded at the end.

        Returns the mask (B, max n) of real tokens, or `None` when every condition has the same length, so
        equal-length batches run the exact unmasked attention.
        """
        lengths = [e.shape[0] for e in embeds]
        max_len = max(lengths)
        if all(n == max_len for n in lengths):
            return torch.stack(embeds), None
        padded = embeds[0].new_zeros(len(embeds), max_len, embeds[0].shape[-1])
        mask = torch.zeros(len(embeds), max_len, dtype=torch.bool, device=embeds[0].device)
        for i, e in enumerate(embeds):
            padded[i, : e.shape[0]] = e
            mask[i, : e.shape[0]] = True
        return padded, mask

    @staticmethod
    def _joint_attention_mask(condition_mask: torch.Tensor, num_image_tokens: int) -> torch.Tensor:
        """The transformer's (B, conditions + image tokens) key mask for padded conditions.

        Padded condition tokens are masked out as keys: exact for the image tokens, since padded text tokens
        only ever influence other tokens through attention.
        """
        image_mask = condition_mask.new_ones(condition_mask.shape[0], num_image_tokens)
        return torch.cat([condition_mask, image_mask], dim=1)

    def _instruction_conditions(
        self, prompts: list[str], subject_condition: SubjectCondition | None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each prompt's aggregated condition `(embeds (n, D), pooled (P,))`, from the subject's memo or
        encoded on its prefix (then remembered); without a prefix the MLLM reads the instruction alone."""
        prefix = subject_condition.prefix if subject_condition is not None else None
        # (`prefix` is not None only with a `subject_condition`: the checks below say so to the type checker.)
        known = (
            subject_condition.instruction_conditions
            if subject_condition is not None and prefix is not None
            else {}
        )
        encoded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for text in prompts:
            if text in encoded or text in known:  # the same text gives the same condition: encode it once
                encoded[text] = encoded.get(text) or known[text]
            elif subject_condition is not None and prefix is not None:
                # Only the instruction's positions: the prefix's image tokens are aggregated already.
                encoding = self.mllm_encoder.encode_instruction(prefix, text, include_prefix=False)
                encoded[text] = self.aggregator(encoding, image_tokens=subject_condition.image_tokens)
            else:
                encoded[text] = self.aggregator(self.mllm_encoder.encode([], text))
        if subject_condition is not None and prefix is not None:
            memo = subject_condition.instruction_conditions
            for text, condition in encoded.items():  # most recent last; the oldest go first
                memo.pop(text, None)
                memo[text] = condition
            while len(memo) > max(subject_condition.memo_size, len(encoded)):
                memo.pop(next(iter(memo)))
        return [encoded[text] for text in prompts]

    @torch.no_grad()
    def prepare_prompts(self, subject_condition: SubjectCondition, prompts: Sequence[str]) -> None:
        """Encode `prompts` on the subject's prefix now and keep them for the `__call__`s that follow.

        With model offload, every call that encodes moves the MLLM onto the GPU and the transformer off it;
        encoding the next prompts of a subject together makes that one move for all of them.
        """
        subject_condition.memo_size = max(subject_condition.memo_size, len(set(prompts)))
        self._instruction_conditions(list(prompts), subject_condition)

    @torch.no_grad()
    def encode_prompt(
        self,
        prompt: str | list[str] | None = None,
        subject_condition: SubjectCondition | None = None,
        num_images_per_prompt: int = 1,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        r"""
        Encode instructions with the MLLM (on top of the subject's cached reference prefix) and aggregate
        them, or take precomputed embeddings; either way repeated for `num_images_per_prompt`.

        Args:
            prompt (`str` or `list[str]`, *optional*):
                The instruction(s); not needed when `prompt_embeds` is given.
            subject_condition (`SubjectCondition`, *optional*):
                From `encode_subject`. Its prefix cache is reused, so only each instruction's own tokens run
                through the MLLM, and its aggregated image tokens are reused. Without it (or without a prefix)
                the MLLM reads the instruction alone.
            num_images_per_prompt (`int`, defaults to 1):
                Copies of each prompt's condition.
            prompt_embeds (`torch.Tensor`, *optional*):
                Precomputed condition (batch, sequence, joint_attention_dim), with `pooled_prompt_embeds`
                (batch, pooled_projection_dim) and optionally `prompt_attention_mask` (batch, sequence).

        Returns:
            `(prompt_embeds, pooled_prompt_embeds, prompt_attention_mask)`: (B, L, joint_attention_dim),
            (B, pooled_projection_dim) and a (B, L) bool mask of real tokens (`None` when no padding was
            needed), with B = batch × `num_images_per_prompt`.
        """
        device = device or self._execution_device
        dtype = dtype or self.transformer.dtype
        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("Provide either `prompt` or `prompt_embeds`. Cannot leave both undefined.")
            prompt = [prompt] if isinstance(prompt, str) else list(prompt)
            conditions = self._instruction_conditions(prompt, subject_condition)
            prompt_embeds, prompt_attention_mask = self._pad_conditions([e for e, _ in conditions])
            pooled_prompt_embeds = torch.stack([p for _, p in conditions])
        elif pooled_prompt_embeds is None:
            raise ValueError(
                "If `prompt_embeds` are provided, `pooled_prompt_embeds` also have to be passed."
            )

        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype).repeat_interleave(
            num_images_per_prompt, 0
        )
        pooled_prompt_embeds = pooled_prompt_embeds.to(device=device, dtype=dtype).repeat_interleave(
            num_images_per_prompt, 0
        )
        if prompt_attention_mask is not None:
            prompt_attention_mask = prompt_attention_mask.to(
                device=device, dtype=torch.bool
            ).repeat_interleave(num_images_per_prompt, 0)
        return prompt_embeds, pooled_prompt_embeds, prompt_attention_mask

    # ----------------------------------------------------------------------------------------------------
    # References
    # ----------------------------------------------------------------------------------------------------

    # Adapted from diffusers.pipelines.flux.pipeline_flux_kontext.FluxKontextPipeline._encode_vae_image
    def _encode_vae_image(self, image: torch.Tensor) -> torch.Tensor:
        # The distribution's mode, not a sample: a subject's reference latents are deterministic.
        latents = self.vae.encode(image).latent_dist.mode()
        return (latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_references(
        self,
        reference_images: PIL.Image.Image | list[PIL.Image.Image],
        reference_size: int = 512,
        device: torch.device | None = None,
    ) -> list[torch.Tensor]:
        r"""
        VAE-encode each reference: resize (longer side = `reference_size`, aspect kept, sides rounded down
        to a multiple of `2 * vae_scale_factor`), encode, take the latent distribution's mode, normalise
        with the VAE's shift and scaling factors.

        Returns:
            Per reference, a tensor of shape (latent_channels, h, w).
        """
        device = device or self._execution_device
        if isinstance(reference_images, PIL.Image.Image):
            reference_images = [reference_images]
        multiple = self.vae_scale_factor * 2
        latents = []
        for image in reference_images:
            image = image.convert("RGB")
            width, height = reference_image_size(image.width, image.height, reference_size, multiple)
            pixels = self.vae_image_processor.preprocess(image, height=height, width=width)
            pixels = pixels.to(device=device, dtype=self.vae.dtype)
            latents.append(self._encode_vae_image(pixels)[0])
        return latents

    @torch.no_grad()
    def encode_subject(
        self,
        reference_images: PIL.Image.Image | list[PIL.Image.Image],
        reference_size: int = 512,
    ) -> SubjectCondition:
        r"""
        Everything about a subject that does not depend on the prompt, to compute once and pass to
        `__call__` as `subject_condition` for each of its prompts.

        Args:
            reference_images (`PIL.Image.Image` or `list[PIL.Image.Image]`):
                The subject's reference photo(s).
            reference_size (`int`, defaults to 512):
                Longer side the references are resized to before the VAE (a multiple of 16).

        Returns:
            [`SubjectCondition`]: the MLLM prefix cache over the references, the aggregated image tokens of
            that prefix and the references' VAE latents.
        """
        if isinstance(reference_images, PIL.Image.Image):
            reference_images = [reference_images]
        reference_images = [image.convert("RGB") for image in reference_images]
        prefix = self.mllm_encoder.encode_prefix(reference_images)
        assert prefix.hidden_states is not None  # released below, after the aggregator reads them
        # Through the aggregator's forward (not `aggregate_image_tokens`) so offload hooks see the call; the
        # prefix has no text positions, so this is exactly its image tokens.
        image_tokens, _ = self.aggregator(
            MLLMEncoding(prefix.hidden_states, prefix.image_mask, prefix.text_mask)
        )
        # Every later prompt reads only the KV cache and these image tokens: free the hidden-state stack
        # (layers x prefix tokens x width, ~170 MB for InternVL3-8B with three references).
        prefix.hidden_states = None
        return SubjectCondition(
            prefix=prefix,
            image_tokens=image_tokens.detach(),
            reference_latents=self.encode_references(reference_images, reference_size),
        )

    def _prepare_reference_tokens(
        self, reference_latents: Sequence[torch.Tensor], device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pack each reference 2×2 and give it Kontext-style position ids.

        Returns (tokens (n, latent_channels * 4), ids (n, 3)). Like FluxKontextPipeline, each reference's ids
        are the (row, column) grid of its packed latent with the first axis set to its index: 1 for the first
        reference, 2 for the second, ... (0 is the generated image), so references never share a position
        with the target or with each other.
        """
        tokens, ids = [], []
        for index, latents in enumerate(reference_latents, start=1):
            latents = latents if latents.ndim == 4 else latents.unsqueeze(0)
            _, channels, height, width = latents.shape
            latents = latents.to(device=device, dtype=dtype)
            tokens.append(self._pack_latents(latents, 1, channels, height, width)[0])
            reference_ids = self._prepare_latent_image_ids(1, height // 2, width // 2, device, dtype)
            reference_ids[..., 0] = index
            ids.append(reference_ids)
        return torch.cat(tokens), torch.cat(ids)

    # ----------------------------------------------------------------------------------------------------
    # Checks
    # ----------------------------------------------------------------------------------------------------

    # Adapted from diffusers.pipelines.flux.pipeline_flux.FluxPipeline.check_inputs
    def check_inputs(
        self,
        prompt,
        height,
        width,
        num_inference_steps,
        stage_thresholds,
        reference_size,
        num_images_per_prompt,
        output_type,
        reference_images=None,
        subject_condition=None,
        reference_latents=None,
        negative_prompt=None,
        prompt_embeds=None,
        pooled_prompt_embeds=None,
        prompt_attention_mask=None,
        negative_prompt_embeds=None,
        negative_pooled_prompt_embeds=None,
        callback_on_step_end_tensor_inputs=None,
    ):
        multiple = self.vae_scale_factor * 2
        if not isinstance(height, int) or height <= 0 or height % multiple != 0:
            raise ValueError(f"`height` has to be a positive multiple of {multiple} but is {height}.")
        if not isinstance(width, int) or width <= 0 or width % multiple != 0:
            raise ValueError(f"`width` has to be a positive multiple of {multiple} but is {width}.")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(
                f"`num_inference_steps` has to be a positive integer but is {num_inference_steps}."
            )
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(
                f"`num_images_per_prompt` has to be a positive integer but is {num_images_per_prompt}."
            )
        if (
            not isinstance(stage_thresholds, (tuple, list))
            or len(stage_thresholds) != 2
            or not (0.0 <= stage_thresholds[1] <= stage_thresholds[0] <= 1.0)
        ):
            raise ValueError(
                f"`stage_thresholds` has to be (τ1, τ2) with 1 ≥ τ1 ≥ τ2 ≥ 0 but is {stage_thresholds}."
            )
        if not isinstance(reference_size, int) or reference_size <= 0 or reference_size % multiple != 0:
            raise ValueError(
                f"`reference_size` has to be a positive multiple of {multiple} but is {reference_size}."
            )
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(
                f"`output_type` has to be one of 'pil', 'np', 'pt', 'latent' but is {output_type!r}."
            )

        unknown = [
            k for k in callback_on_step_end_tensor_inputs or [] if k not in self._callback_tensor_inputs
        ]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` has to be in {self._callback_tensor_inputs}, but "
                f"found {unknown}."
            )

        if prompt is not None and prompt_embeds is not None:
            raise ValueError(
                "Cannot forward both `prompt` and `prompt_embeds`. Please forward only one of the two."
            )
        if prompt is None and prompt_embeds is None:
            raise ValueError("Provide either `prompt` or `prompt_embeds`. Cannot leave both undefined.")
        if prompt is not None and not (
            isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(p, str) for p in prompt))
        ):
            raise ValueError(f"`prompt` has to be of type `str` or `list[str]` but is {type(prompt)}.")
        if isinstance(prompt, list) and len(prompt) == 0:
            raise ValueError("`prompt` has to contain at least one prompt.")
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError(
                "If `prompt_embeds` are provided, `pooled_prompt_embeds` also have to be passed."
            )
        if prompt_embeds is not None and prompt_embeds.ndim != 3:
            raise ValueError(
                f"`prompt_embeds` has to be of shape (batch, sequence, joint_attention_dim) but is "
                f"{tuple(prompt_embeds.shape)}."
            )
        if prompt_embeds is not None and pooled_prompt_embeds.shape[0] != prompt_embeds.shape[0]:
            raise ValueError("`prompt_embeds` and `pooled_prompt_embeds` must have the same batch size.")
        if prompt_attention_mask is not None and (
            prompt_embeds is None or tuple(prompt_attention_mask.shape) != tuple(prompt_embeds.shape[:2])
        ):
            raise ValueError(
                "`prompt_attention_mask` has to come with `prompt_embeds` and match its first two dims."
            )

        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError(
                "Cannot forward both `negative_prompt` and `negative_prompt_embeds`. Please forward only one."
            )
        if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
            raise ValueError(
                "If `negative_prompt_embeds` are provided, `negative_pooled_prompt_embeds` also have to be "
                "passed."
            )
        if negative_prompt is not None and not isinstance(negative_prompt, (str, list)):
            raise ValueError(
                f"`negative_prompt` has to be of type `str` or `list[str]` but is {type(negative_prompt)}."
            )
        if (
            isinstance(negative_prompt, list)
            and isinstance(prompt, list)
            and len(negative_prompt) != len(prompt)
        ):
            raise ValueError(
                f"`negative_prompt` has {len(negative_prompt)} entries but `prompt` has {len(prompt)}; they "
                "must match."
            )

        if reference_images is not None and subject_condition is not None:
            raise ValueError(
                "Cannot forward both `reference_images` and `subject_condition`: the condition already holds "
                "the references. Please forward only one of the two."
            )
        if reference_latents is not None and (reference_images is not None or subject_condition is not None):
            raise ValueError(
                "Cannot forward `reference_latents` together with `reference_images` or `subject_condition`."
            )
        if reference_images is not None:
            images = [reference_images] if isinstance(reference_images, PIL.Image.Image) else reference_images
            if not isinstance(images, (list, tuple)) or not all(
                isinstance(i, PIL.Image.Image) for i in images
            ):
                raise ValueError("`reference_images` has to be a `PIL.Image.Image` or a list of them.")
            if len(images) == 0:
                raise ValueError("`reference_images` is empty; pass at least one image or leave it `None`.")
        if subject_condition is not None and not isinstance(subject_condition, SubjectCondition):
            raise ValueError(
                f"`subject_condition` has to be a `SubjectCondition` (from `encode_subject`) but is "
                f"{type(subject_condition)}."
            )
        if reference_latents is not None:
            latents = (
                [reference_latents] if isinstance(reference_latents, torch.Tensor) else reference_latents
            )
            for latent in latents:
                if (
                    not isinstance(latent, torch.Tensor)
                    or latent.ndim not in (3, 4)
                    or latent.shape[-3] != self.latent_channels
                    or (latent.ndim == 4 and latent.shape[0] != 1)
                    or latent.shape[-1] % 2
                    or latent.shape[-2] % 2
                ):
                    raise ValueError(
                        f"`reference_latents` has to be a list of normalised VAE latents of shape "
                        f"({self.latent_channels}, h, w) with even h and w (see `encode_references`)."
                    )

    # ----------------------------------------------------------------------------------------------------
    # Latents
    # ----------------------------------------------------------------------------------------------------

    # FLUX.1's own packing and position ids, used as they are (not copied): (B, C, H, W) <-> (B, H/2 * W/2,
    # C * 4), and the (row, column) ids of each packed token.
    _prepare_latent_image_ids = staticmethod(FluxPipeline._prepare_latent_image_ids)
    _pack_latents = staticmethod(FluxPipeline._pack_latents)
    _unpack_latents = staticmethod(FluxPipeline._unpack_latents)

    # Adapted from diffusers.pipelines.flux.pipeline_flux.FluxPipeline.prepare_latents
    def prepare_latents(
        self,
        batch_size: int,
        num_channels_latents: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_generators(generator, batch_size)
        height = 2 * (int(height) // (self.vae_scale_factor * 2))
        width = 2 * (int(width) // (self.vae_scale_factor * 2))
        latent_ids = self._prepare_latent_image_ids(batch_size, height // 2, width // 2, device, dtype)

        if latents is not None:
            expected = (batch_size, (height // 2) * (width // 2), num_channels_latents * 4)
            if tuple(latents.shape) != expected:
                raise ValueError(f"`latents` has to be of shape {expected} but is {tuple(latents.shape)}.")
            return latents.to(device=device, dtype=dtype), latent_ids

        shape = (batch_size, num_channels_latents, height, width)
        latents = self._initial_noise(shape, generator, device, dtype)
        latents = self._pack_latents(latents, batch_size, num_channels_latents, height, width)
        return latents, latent_ids

    # ----------------------------------------------------------------------------------------------------
    # Transformer step
    # ----------------------------------------------------------------------------------------------------

    def predict_velocity(
        self,
        hidden_states: torch.Tensor,
        *,
        image_ids: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor,
        prompt_attention_mask: torch.Tensor | None,
        timestep: torch.Tensor,
        guidance: torch.Tensor | None,
        num_target_tokens: int,
        joint_attention_kwargs: dict[str, Any] | None = None,
        transformer: Any = None,
    ) -> torch.Tensor:
        r"""
        One transformer step: the velocity the transformer predicts for the target tokens. Sampling
        (`__call__`) and training (`squeeze_cli.train.objective`) both go through here, so they feed the
        transformer the same sequence.

        Args:
            hidden_states (`torch.Tensor`): (B, target tokens [+ reference tokens], C * 4) packed latents,
                the references' tokens (if any) after the target's.
            image_ids (`torch.Tensor`): (tokens, 3) position ids of `hidden_states`
                (`_prepare_latent_image_ids`, then `_prepare_reference_tokens`' ids).
            prompt_embeds (`torch.Tensor`), pooled_prompt_embeds (`torch.Tensor`): the aggregated condition,
                (B, L, joint_attention_dim) and (B, pooled_projection_dim).
            prompt_attention_mask (`torch.Tensor`, *optional*): (B, L) real condition tokens of padded
                conditions (`_pad_conditions`); `None` runs the exact unmasked attention.
            timestep (`torch.Tensor`): (B,) the noise level σ in [0, 1].
            guidance (`torch.Tensor`, *optional*): (B,) FLUX's distilled guidance, for transformers with a
                guidance embedding.
            num_target_tokens (`int`): how many leading tokens are the target's; the reference tokens'
                outputs are dropped.
            joint_attention_kwargs (`dict`, *optional*): passed to the attention processors.
            transformer (*optional*): the transformer to run, when not `self.transformer` (training passes
                its wrapped, trainable one).

        Returns:
            `torch.Tensor`: (B, num_target_tokens, C * 4).
        """
        transformer = self.transformer if transformer is None else transformer
        attention_kwargs = dict(joint_attention_kwargs or {})
        if prompt_attention_mask is not None:
            attention_kwargs["attention_mask"] = self._joint_attention_mask(
                prompt_attention_mask, hidden_states.shape[1]
            )
        prediction = transformer(
            hidden_states=hidden_states,
            timestep=timestep,
            guidance=guidance,
            pooled_projections=pooled_prompt_embeds,
            encoder_hidden_states=prompt_embeds,
            txt_ids=hidden_states.new_zeros(prompt_embeds.shape[1], 3),
            img_ids=image_ids,
            joint_attention_kwargs=attention_kwargs,
            return_dict=False,
        )[0]
        return prediction[:, :num_target_tokens]

    # ----------------------------------------------------------------------------------------------------
    # Properties
    # ----------------------------------------------------------------------------------------------------

    @property
    def guidance_scale(self):
        return self._guidance_scale

    @property
    def joint_attention_kwargs(self):
        return self._joint_attention_kwargs

    @property
    def num_timesteps(self):
        return self._num_timesteps

    @property
    def current_timestep(self):
        return self._current_timestep

    @property
    def interrupt(self):
        return self._interrupt

    @property
    def stage_plan(self) -> StagePlan | None:
        """The stage plan of the last (or current) call."""
        return self._stage_plan

    # ----------------------------------------------------------------------------------------------------
    # Call
    # ----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        reference_images: PIL.Image.Image | list[PIL.Image.Image] | None = None,
        *,
        subject_condition: SubjectCondition | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        reference_latents: list[torch.Tensor] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        true_cfg_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        guidance_scale: float = 2.5,
        stage_thresholds: Sequence[float] = PAPER_STAGE_THRESHOLDS,
        keep_mllm_condition: bool = False,
        reference_size: int = 512,
        step_cache: StepCache | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[Any, int, int, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
    ) -> SqueezePipelineOutput | tuple:
        r"""
        Generate images of the subject shown in the references, one per prompt (× `num_images_per_prompt`).

        One call = one subject: the references are shared by every prompt of the batch.

        Args:
            prompt (`str` or `list[str]`):
                The instruction(s). Pass `prompt_embeds` instead to skip the MLLM.
            reference_images (`PIL.Image.Image` or `list[PIL.Image.Image]`, *optional*):
                The subject's reference photo(s). Or pass `subject_condition` (from `encode_subject`) to
                reuse a subject's MLLM prefix, aggregated image tokens and VAE latents across calls.
            subject_condition (`SubjectCondition`, *optional*):
                Precomputed per-subject condition (see `encode_subject`).
            prompt_embeds (`torch.Tensor`, *optional*):
                Precomputed aggregated condition, (batch, sequence, joint_attention_dim), with
                `pooled_prompt_embeds` (batch, pooled_projection_dim) and optionally `prompt_attention_mask`
                (batch, sequence) marking the real tokens of padded conditions.
            reference_latents (`list[torch.Tensor]`, *optional*):
                Precomputed normalised reference latents, one (latent_channels, h, w) tensor per reference
                (see `encode_references`).
            negative_prompt (`str` or `list[str]`, *optional*):
                Negative instruction(s) for true CFG (encoded with the same references).
            true_cfg_scale (`float`, defaults to 1.0):
                True classifier-free guidance scale; > 1 with a negative prompt runs a second transformer pass
                on the steps that use the MLLM condition (stage 3 with the null condition has no instruction
                to guide by, so it runs once).
            height (`int`, *optional*), width (`int`, *optional*):
                Output size in pixels, multiples of `2 * vae_scale_factor` (16 for FLUX). Default 512.
            num_inference_steps (`int`, defaults to 28):
                Denoising steps.
            guidance_scale (`float`, defaults to 2.5):
                FLUX-dev's distilled guidance, fed through the transformer's guidance embedding (ignored when
                the transformer has none).
            stage_thresholds (`tuple[float, float]`, defaults to (0.95, 0.85)):
                (τ1, τ2) of the multi-stage schedule: σ ≥ τ1 MLLM only (reference tokens left out),
                τ2 ≤ σ < τ1 MLLM + references, σ < τ2 references + null condition. (0, 0) = MLLM only
                throughout.
            keep_mllm_condition (`bool`, defaults to `False`):
                Keep the MLLM condition in stage 3 instead of the null condition.
            reference_size (`int`, defaults to 512):
                Longer side the references are resized to before the VAE (ignored with `subject_condition` or
                `reference_latents`).
            step_cache (`StepCache`, *optional*):
                Opt-in step caching through diffusers' hooks: `first_block` (First Block Cache with
                `threshold`: steps whose first-block output barely changed reuse the other blocks' cached
                residual) or `taylorseer` (TaylorSeer, lite: a full pass every `interval` steps after
                `warmup_steps`, the steps between forecast from the last full passes). Faster, and the pixels
                differ a little from exact sampling. Each (branch, stage) has its own cache, since the
                sequence changes between stages. `None` samples exactly.
            num_images_per_prompt (`int`, defaults to 1):
                Images per prompt.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                A list of CPU generators, one per image, makes each image independent of the batch it is in.
            latents (`torch.Tensor`, *optional*):
                Pre-generated packed noise, (batch, tokens, latent_channels * 4).
            output_type (`str`, defaults to `"pil"`):
                `"pil"`, `"np"`, `"pt"` or `"latent"` (packed latents).
            return_dict (`bool`, defaults to `True`):
                Return a [`SqueezePipelineOutput`] instead of a tuple `(images, stage_plan)`.
            joint_attention_kwargs (`dict`, *optional*):
                Passed to the transformer's attention processors (e.g. `{"scale": 0.8}` for the LoRA scale).
            callback_on_step_end (`Callable`, *optional*):
                Called after each step as `callback_on_step_end(self, step, timestep, callback_kwargs)`.
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to `["latents"]`):
                Tensors passed in `callback_kwargs`; from `_callback_tensor_inputs`.

        Examples:

        Returns:
            [`SqueezePipelineOutput`] or `tuple`: the images and the stage plan used.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        height = self.default_sample_size * self.vae_scale_factor if height is None else height
        width = self.default_sample_size * self.vae_scale_factor if width is None else width
        stage_thresholds = tuple(stage_thresholds)

        # 1. Check inputs
        self.check_inputs(
            prompt,
            height,
            width,
            num_inference_steps,
            stage_thresholds,
            reference_size,
            num_images_per_prompt,
            output_type,
            reference_images=reference_images,
            subject_condition=subject_condition,
            reference_latents=reference_latents,
            negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            prompt_attention_mask=prompt_attention_mask,
            negative_prompt_embeds=negative_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        self._guidance_scale = guidance_scale
        self._joint_attention_kwargs = dict(joint_attention_kwargs or {})
        self._current_timestep = None
        self._interrupt = False

        # 2. Stage plan: one pure function decides the σ schedule and the stage of every step.
        plan = stage_plan(
            num_inference_steps,
            height,
            width,
            stage_thresholds=stage_thresholds,
            scheduler_config=self.scheduler.config,
            vae_scale_factor=self.vae_scale_factor,
        )
        has_references = (
            reference_images is not None
            or reference_latents is not None
            or (subject_condition is not None and subject_condition.num_references > 0)
        )
        if not has_references and any(stage != STAGE_MLLM for stage in plan.stages):
            raise ValueError(
                f"The stage plan {plan.counts} uses reference tokens, but no `reference_images`, "
                "`subject_condition` or `reference_latents` were given. Pass references or set "
                "`stage_thresholds=(0, 0)` (MLLM condition only)."
            )

        if prompt is not None:
            batch_size = 1 if isinstance(prompt, str) else len(prompt)
        else:
            assert prompt_embeds is not None  # `check_inputs` requires `prompt` or `prompt_embeds`
            batch_size = prompt_embeds.shape[0]
        device = self._execution_device
        dtype = self.transformer.dtype

        # 3. Subject: MLLM prefix + aggregated image tokens + reference latents, unless precomputed.
        if reference_images is not None:
            subject_condition = self.encode_subject(reference_images, reference_size=reference_size)
        elif reference_latents is not None:
            latents_list = (
                [reference_latents] if isinstance(reference_latents, torch.Tensor) else reference_latents
            )
            subject_condition = SubjectCondition(
                prefix=None, image_tokens=None, reference_latents=list(latents_list)
            )

        # 4. Conditions: per-prompt MLLM condition, the null condition (stage 3) and the optional negative.
        prompt_embeds, pooled_prompt_embeds, prompt_attention_mask = self.encode_prompt(
            prompt,
            subject_condition,
            num_images_per_prompt,
            prompt_embeds,
            pooled_prompt_embeds,
            prompt_attention_mask,
            device=device,
            dtype=dtype,
        )
        total_batch = batch_size * num_images_per_prompt

        uses_null_condition = not keep_mllm_condition and STAGE_REFERENCE in plan.stages
        if uses_null_condition:
            null_embeds, null_pooled = self.encode_null_condition(device=device, dtype=dtype)
            null_embeds = null_embeds.unsqueeze(0).expand(total_batch, -1, -1)
            null_pooled = null_pooled.unsqueeze(0).expand(total_batch, -1)

        has_negative = negative_prompt is not None or negative_prompt_embeds is not None
        do_true_cfg = true_cfg_scale > 1 and has_negative
        if true_cfg_scale > 1 and not has_negative:
            logger.warning(
                f"`true_cfg_scale` is {true_cfg_scale} but no `negative_prompt` was given; CFG is off."
            )
        if do_true_cfg:
            negatives = (
                [negative_prompt] * batch_size if isinstance(negative_prompt, str) else negative_prompt
            )
            negative_prompt_embeds, negative_pooled_prompt_embeds, negative_prompt_attention_mask = (
                self.encode_prompt(
                    negatives,
                    subject_condition,
                    num_images_per_prompt,
                    negative_prompt_embeds,
                    negative_pooled_prompt_embeds,
                    negative_prompt_attention_mask,
                    device=device,
                    dtype=dtype,
                )
            )

        # 5. Latents and reference tokens
        num_channels_latents = self.transformer.config.in_channels // 4
        latents, latent_ids = self.prepare_latents(
            total_batch, num_channels_latents, height, width, dtype, device, generator, latents
        )
        num_latent_tokens = latents.shape[1]
        reference_tokens = reference_ids = None
        if subject_condition is not None and subject_condition.num_references > 0:
            reference_tokens, reference_ids = self._prepare_reference_tokens(
                subject_condition.reference_latents, device, dtype
            )
            reference_tokens = reference_tokens.unsqueeze(0).expand(total_batch, -1, -1)
            reference_ids = torch.cat([latent_ids, reference_ids])

        # 6. Timesteps from the stage plan's sigmas, so the stages line up with the steps the scheduler takes.
        self.scheduler.set_timesteps(sigmas=list(plan.sigmas), mu=plan.mu, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        self._stage_plan = plan

        if self.transformer.config.guidance_embeds:
            guidance = torch.full([total_batch], guidance_scale, device=device, dtype=torch.float32)
        else:
            guidance = None

        self._set_step_cache(step_cache)
        caching = self.transformer.is_cache_enabled

        def run_transformer(branch, step, hidden_states, img_ids, embeds, pooled, mask, timestep):
            # A step cache compares this call with the last one of its context: one context per CFG branch and
            # stage, because the stages change the sequence (stage 1 leaves the references out, stage 3 swaps
            # in the null condition), and a residual of another length or condition must never be reused.
            context = (
                self.transformer.cache_context(
                    f"{branch}_stage{plan.stages[step]}",
                    step_index=step,
                    num_inference_steps=num_inference_steps,
                    timestep=timestep[0],
                )
                if caching
                else contextlib.nullcontext()
            )
            with context:
                return _run_transformer(hidden_states, img_ids, embeds, pooled, mask, timestep)

        def _run_transformer(hidden_states, img_ids, embeds, pooled, mask, timestep):
            return self.predict_velocity(
                hidden_states,
                image_ids=img_ids,
                prompt_embeds=embeds,
                pooled_prompt_embeds=pooled,
                prompt_attention_mask=mask,
                timestep=timestep / 1000,
                guidance=guidance,
                num_target_tokens=num_latent_tokens,
                joint_attention_kwargs=self._joint_attention_kwargs,
            )

        # 7. Denoising loop
        self.scheduler.set_begin_index(0)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                stage = plan.stages[i]

                # Stage 1 leaves the reference tokens out of the sequence entirely (and is cheaper for it).
                if stage != STAGE_MLLM and reference_tokens is not None:
                    latent_model_input = torch.cat([latents, reference_tokens], dim=1)
                    img_ids = reference_ids
                else:
                    latent_model_input, img_ids = latents, latent_ids
                use_null = stage == STAGE_REFERENCE and not keep_mllm_condition
                if use_null:
                    embeds, pooled, mask = null_embeds, null_pooled, None
                else:
                    embeds, pooled, mask = prompt_embeds, pooled_prompt_embeds, prompt_attention_mask
                timestep = t.expand(total_batch).to(latents.dtype)

                noise_pred = run_transformer(
                    "cond", i, latent_model_input, img_ids, embeds, pooled, mask, timestep
                )
                if do_true_cfg and not use_null:
                    negative_pred = run_transformer(
                        "uncond",
                        i,
                        latent_model_input,
                        img_ids,
                        negative_prompt_embeds,
                        negative_pooled_prompt_embeds,
                        negative_prompt_attention_mask,
                        timestep,
                    )
                    noise_pred = negative_pred + true_cfg_scale * (noise_pred - negative_pred)

                latents_dtype = latents.dtype
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                if latents.dtype != latents_dtype:
                    latents = latents.to(latents_dtype)

                callback_outputs = self._step_callback(
                    callback_on_step_end, i, t, callback_on_step_end_tensor_inputs, locals()
                )
                latents = callback_outputs.pop("latents", latents)
                prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)

                progress_bar.update()

        self._current_timestep = None

        # 8. Decode
        if output_type == "latent":
            image = latents
        else:
            latents = self._unpack_latents(latents, height, width, self.vae_scale_factor)
            latents = (latents / self.vae.config.scaling_factor) + self.vae.config.shift_factor
            image = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
            image = self.vae_image_processor.postprocess(image, output_type=output_type)

        self.maybe_free_model_hooks()

        if not return_dict:
            return (image, plan)
        return SqueezePipelineOutput(images=image, stage_plan=plan)
