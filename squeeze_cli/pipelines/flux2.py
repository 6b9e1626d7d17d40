"""FLUX.2 [klein] and FLUX.2 [dev] through squeeze: diffusers' `Flux2KleinPipeline` and `Flux2Pipeline` with
the runner's subject/prompt contract.

The two models share everything but their text encoder (Qwen3 for [klein], Mistral Small 3.1 with a system
prompt for [dev]) and guidance ([dev] has FLUX's distilled guidance embedding; [klein] 4B is step-distilled
and has none), so one class holds the shared path and each model's class adds its encoder. What differs
from diffusers' `__call__`:

- a subject's references are VAE-encoded once (`encode_subject`) and reused for all its prompts and seeds;
  each joins the image stream with its own time coordinate (10, 20, ...), exactly as diffusers does for a list
  of images, up to the model's limit (`registry.PipelineSpec.max_references`);
- each prompt's encoding is computed once and kept (a small LRU), whatever the batches;
- each image's noise comes from its own CPU generator (drawn in float32), so a seed gives the same image
  whatever the batch size or number of processes (this and the LRU are `contract.SubjectBatchMixin`'s);
- references are sized as diffusers sizes them (`flux2_reference_size`), with `reference_size`² in place of
  its fixed 1024² cap (at 1024, diffusers' sizes exactly).

On the same inputs the images are diffusers' own, bit for bit (tests/test_pipelines_flux2.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import PIL.Image
import torch
from diffusers import Flux2KleinKVPipeline as DiffusersFlux2KleinKVPipeline
from diffusers import Flux2KleinPipeline as DiffusersFlux2KleinPipeline
from diffusers import Flux2Pipeline as DiffusersFlux2Pipeline
from diffusers.models.transformers.transformer_flux2 import Flux2KVCache
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu, format_input, retrieve_timesteps
from diffusers.utils import BaseOutput

from squeeze_cli.params import StepCache

from .contract import SubjectBatchMixin
from .registry import PIPELINES

__all__ = [
    "Flux2DevPipeline",
    "Flux2KleinKVPipeline",
    "Flux2KleinPipeline",
    "Flux2PipelineOutput",
    "Flux2Subject",
    "flux2_reference_size",
]

# Text tokens FLUX.2 reads at most (chat template included); longer prompts are refused by
# `check_prompt_fits`, not silently truncated.
MAX_TEXT_TOKENS = 512


def flux2_reference_size(width: int, height: int, reference_size: int, multiple: int = 16) -> tuple[int, int]:
    """(width, height) a `width`×`height` reference is encoded at, as diffusers' `Flux2Pipeline` and
    `Flux2KleinPipeline` size their `image`s: over `reference_size`² pixels (diffusers: 1024²) it is first
    scaled to that area (aspect kept; `Flux2ImageProcessor._resize_to_target_area`), never enlarged; then
    each side is rounded down to a multiple of `multiple`, and at least one (diffusers refuses sides under
    64 px; squeeze takes them)."""
    if width * height > reference_size**2:
        scale = math.sqrt(reference_size**2 / (width * height))
        width, height = int(width * scale), int(height * scale)
    return max(multiple, width // multiple * multiple), max(multiple, height // multiple * multiple)


@dataclass
class Flux2Subject:
    """A subject's references as FLUX.2 sees them, computed once by `encode_subject`.

    Args:
        reference_latents: per reference, VAE latents patchified 2×2 and batch-normalised, (4 * C, h, w).
        reference_size: the side of the square area the references were capped at.
        reference_kv: for a checkpoint trained for it (FLUX.2 [klein] 9B-KV), the reference tokens' keys and
            values in every block, for one image (`None` otherwise).
    """

    reference_latents: list[torch.Tensor]
    reference_size: int
    reference_kv: Flux2KVCache | None = None

    @property
    def num_references(self) -> int:
        return len(self.reference_latents)


@dataclass
class Flux2PipelineOutput(BaseOutput):
    """
    Output of [`Flux2KleinPipeline`] and [`Flux2DevPipeline`].

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`): the generated images.
        stage_plan (`None`): FLUX.2 denoises in one stage; present for the runner's contract.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    stage_plan: None = None


class _Flux2Subjects(SubjectBatchMixin):
    """What FLUX.2 [klein] and [dev] share: subjects, prompt cache, the denoising loop. For a class that also
    derives from diffusers' `Flux2Pipeline` or `Flux2KleinPipeline` (their helpers are the same code)."""

    #: The model's name in error messages.
    model_name: ClassVar[str]
    #: Its name in the registry (`pipelines.registry.PIPELINES`).
    registry_name: ClassVar[str]
    #: Whether the checkpoint was trained with reference tokens that attend only to themselves, modulated at
    #: a fixed time (FLUX.2 [klein] 9B-KV): their keys and values are then the same at every step, for every
    #: prompt and seed, and are computed once per subject.
    reuses_reference_kv: ClassVar[bool] = False

    # Provided by the diffusers base class.
    text_encoder: Any
    tokenizer: Any
    transformer: Any
    vae: Any
    scheduler: Any
    image_processor: Any
    vae_scale_factor: int

    @property
    def max_references(self) -> int:
        return PIPELINES[self.registry_name].max_references or 0

    @property
    def max_sequence_length(self) -> int:
        """Text tokens per prompt: 512, or less when the tokenizer says so."""
        return min(MAX_TEXT_TOKENS, self.tokenizer.model_max_length)

    @property
    def text_encoder_out_layers(self) -> tuple[int, ...]:
        """The text encoder's layers FLUX.2 stacks into its prompt embedding: the hidden states after each
        quarter of its depth, which is diffusers' (9, 18, 27) for [klein]'s 36-layer Qwen3 and (10, 20, 30)
        for [dev]'s 40-layer Mistral, and (1, 2, 3) for the tiny 4-layer encoders."""
        depth = self.text_encoder.config.get_text_config().num_hidden_layers
        return tuple(depth * quarter // 4 for quarter in (1, 2, 3))

    def _chat_text(self, prompt: str) -> str:
        """`prompt` in the text encoder's chat template, as the model encodes it."""
        raise NotImplementedError

    def _encode_prompt_text(self, prompt: str, device: torch.device) -> torch.Tensor:
        """The prompt embedding (1, L, 3 * D) of one prompt, by diffusers' own encoder function."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------------------
    # Subject and prompts
    # ----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_subject(
        self, reference_images: PIL.Image.Image | Sequence[PIL.Image.Image], reference_size: int = 1024
    ) -> Flux2Subject:
        r"""
        VAE-encode a subject's references once, for all its prompts.

        Args:
            reference_images (`PIL.Image.Image` or `list[PIL.Image.Image]`): the subject's photo(s), at most
                `max_references`.
            reference_size (`int`, defaults to 1024): a reference larger than this side's square area is
                scaled down to it (aspect kept, never enlarged), then its sides are rounded down to a
                multiple of 16 by a centred crop: diffusers' rule, whose cap is 1024².

        Returns:
            [`Flux2Subject`]: per reference, the latent distribution's mode, patchified and normalised with
            the VAE's batch-norm statistics (diffusers' `_encode_vae_image`).
        """
        if isinstance(reference_images, PIL.Image.Image):
            reference_images = [reference_images]
        if not reference_images:
            raise ValueError(f"{self.model_name} needs at least one reference image.")
        if len(reference_images) > self.max_references:
            raise ValueError(
                f"{self.model_name} takes at most {self.max_references} reference images, "
                f"got {len(reference_images)}."
            )
        device = self._execution_device  # type: ignore[attr-defined]
        multiple = self.vae_scale_factor * 2
        latents = []
        for image in reference_images:
            image = image.convert("RGB")
            if image.width * image.height > reference_size**2:  # diffusers' own resize to the area
                image = self.image_processor._resize_to_target_area(image, reference_size**2)
            width, height = flux2_reference_size(image.width, image.height, reference_size, multiple)
            pixels = self.image_processor.preprocess(image, height=height, width=width, resize_mode="crop")
            pixels = pixels.to(device=device, dtype=self.vae.dtype)
            latents.append(self._encode_vae_image(pixels, generator=None)[0])  # type: ignore[attr-defined]
        reference_kv = self._extract_reference_kv(latents) if self.reuses_reference_kv else None
        self.maybe_free_model_hooks()  # type: ignore[attr-defined]
        return Flux2Subject(latents, reference_size, reference_kv)

    def check_prompt_fits(self, reference_sizes: Sequence[tuple[int, int]], prompts: Sequence[str]) -> None:
        """Raise `ValueError` for a prompt whose chat-templated text is longer than the text encoder reads (it
        would be cut silently).

        `reference_sizes` is unused: references do not share the text encoder's context in FLUX.2.
        """
        for prompt in prompts:
            length = len(self.tokenizer(self._chat_text(prompt), add_special_tokens=False).input_ids)
            if length > self.max_sequence_length:
                raise ValueError(
                    f"the prompt is {length} tokens with its chat template, more than the "
                    f"{self.max_sequence_length} {self.model_name} reads; shorten it"
                )

    def prepare_prompts(self, subject_condition: Flux2Subject, prompts: Sequence[str]) -> None:
        """Encode `prompts` now into the prompt cache (at most `prompt_cache_size`), so that with model
        offload the text encoder moves onto the GPU once for them all, not once per `__call__`."""
        latest = list(dict.fromkeys(prompts))[-self.prompt_cache_size :]
        self.encode_prompts(latest, self._execution_device, self.transformer.dtype)  # type: ignore[attr-defined]

    @torch.no_grad()
    def encode_prompts(
        self, prompts: Sequence[str], device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings (B, L, 3 * D) and their position ids (B, L, 4) of `prompts`, each encoded alone
        and cached: each is padded to `max_sequence_length` on its own, so its encoding does not depend on the
        other prompts of the batch."""
        embeds = []
        for prompt in prompts:

            def encode(prompt: str = prompt) -> torch.Tensor:
                return self._encode_prompt_text(prompt, device)[0].detach()

            key = (id(self.text_encoder), prompt, self.max_sequence_length, self.text_encoder_out_layers)
            embeds.append(self._remember_prompt(key, encode).to(device=device, dtype=dtype))
        prompt_embeds = torch.stack(embeds)
        text_ids = self._prepare_text_ids(prompt_embeds).to(device)  # type: ignore[attr-defined]
        return prompt_embeds, text_ids

    def _reference_tokens(
        self, reference_latents: Sequence[torch.Tensor], device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed reference tokens (n, 4 * C) and position ids (n, 4): reference k has time coordinate 10 k
        (from 1), as diffusers' `_prepare_image_ids` gives a list of images."""
        latents = [latent.unsqueeze(0).to(device=device, dtype=dtype) for latent in reference_latents]
        ids = self._prepare_image_ids(latents)[0].to(device)  # type: ignore[attr-defined]
        tokens = torch.cat([self._pack_latents(latent)[0] for latent in latents])  # type: ignore[attr-defined]
        return tokens, ids

    @torch.no_grad()
    def _extract_reference_kv(self, reference_latents: Sequence[torch.Tensor]) -> Flux2KVCache:
        """The reference tokens' keys and values in every block, for one image, from one transformer pass in
        diffusers' "extract" mode. They depend on the references alone (the reference tokens attend only to
        each other, at a fixed time), so one stand-in text token and image token complete the pass."""
        device = self._execution_device  # type: ignore[attr-defined]
        dtype = self.transformer.dtype
        tokens, ids = self._reference_tokens(reference_latents, device, dtype)
        config = self.transformer.config
        stand_in_image = torch.zeros(1, 1, config.in_channels, device=device, dtype=dtype)
        stand_in_text = torch.zeros(1, 1, config.joint_attention_dim, device=device, dtype=dtype)
        origin = torch.zeros(1, 4, device=device, dtype=ids.dtype)
        with self._step_cache_off():  # a step cache of the last `__call__` may still be on
            _, cache = self.transformer(
                hidden_states=torch.cat([tokens.unsqueeze(0), stand_in_image], dim=1),  # [references, image]
                encoder_hidden_states=stand_in_text,
                timestep=torch.ones(1, device=device, dtype=dtype),
                img_ids=torch.cat([ids, origin]),
                txt_ids=origin,
                guidance=None,
                return_dict=False,
                kv_cache_mode="extract",
                num_ref_tokens=tokens.shape[0],
            )
        return cache

    @staticmethod
    def _batched_kv(cache: Flux2KVCache, batch_size: int, device: torch.device) -> Flux2KVCache:
        """`cache` (one image) for a batch of `batch_size` images: the same keys and values for each."""
        batched = Flux2KVCache(len(cache.double_block_caches), len(cache.single_block_caches))
        batched.num_ref_tokens = cache.num_ref_tokens
        layers = zip(
            cache.double_block_caches + cache.single_block_caches,
            batched.double_block_caches + batched.single_block_caches,
            strict=True,
        )
        for source, target in layers:
            keys, values = source.get()  # (1, n, heads, head_dim)
            target.store(
                keys.to(device).expand(batch_size, -1, -1, -1),
                values.to(device).expand(batch_size, -1, -1, -1),
            )
        return batched

    def _check_guidance(self, guidance_scale: float | None) -> torch.Tensor | None:
        """The transformer's guidance input (B,) or `None` for a model without a guidance embedding."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------------------
    # Generation
    # ----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        subject_condition: Flux2Subject | None = None,
        reference_images: PIL.Image.Image | list[PIL.Image.Image] | None = None,
        height: int = 1024,
        width: int = 1024,
        num_inference_steps: int = 50,
        guidance_scale: float | None = None,
        reference_size: int = 1024,
        step_cache: StepCache | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> Flux2PipelineOutput | tuple:
        r"""
        Generate one image per prompt of a subject.

        Args:
            prompt (`str` or `list[str]`): the instruction(s), one image each.
            subject_condition ([`Flux2Subject`], *optional*): from `encode_subject`; or give
                `reference_images` (encoded on the fly at `reference_size`).
            height (`int`), width (`int`): output size in pixels, multiples of 16.
            num_inference_steps (`int`, defaults to 50): denoising steps ([klein] 4B is distilled to 4).
            guidance_scale (`float`, *optional*): FLUX.2 [dev]'s distilled guidance (the transformer's
                guidance embedding, not classifier-free guidance; 4.0 when not given). FLUX.2 [klein] 4B has
                none and refuses it.
            reference_size (`int`, defaults to 1024): used with `reference_images` only.
            step_cache (`StepCache`, *optional*): opt-in step caching through diffusers' hooks (a method of
                `step_cache_methods`); faster, and the pixels differ a little from exact sampling. `None`
                samples exactly.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): one CPU generator per image
                makes each image independent of the batch it is in.
            latents (`torch.Tensor`, *optional*): packed starting noise (batch, tokens, 4 * latent channels).
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` or `"latent"`.
            return_dict (`bool`, defaults to `True`): return a [`Flux2PipelineOutput`] rather than a tuple.
            attention_kwargs (`dict`, *optional*): passed to the attention processors (LoRA `scale`).
            callback_on_step_end (`Callable`, *optional*): `fn(pipe, step, timestep, callback_kwargs)` after
                each step; `callback_on_step_end_tensor_inputs` names the tensors it receives.

        Returns:
            [`Flux2PipelineOutput`] or `tuple` `(images, None)`.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        multiple = self.vae_scale_factor * 2
        self._check_size(height, width, multiple)
        guidance_input = self._check_guidance(guidance_scale)
        subject_condition = self._subject(subject_condition, reference_images, reference_size)
        self._check_callback_inputs(callback_on_step_end_tensor_inputs)
        batch_size = len(prompts)
        self._check_generators(generator, batch_size)

        self._guidance_scale = guidance_scale
        self._attention_kwargs = dict(attention_kwargs or {})
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device  # type: ignore[attr-defined]
        dtype = self.transformer.dtype

        # 1. Conditions
        prompt_embeds, text_ids = self.encode_prompts(prompts, device, dtype)
        guidance = None if guidance_input is None else guidance_input.to(device).expand(batch_size)

        # 2. Noise (float32, per image), drawn patchified as diffusers does, and reference tokens
        latent_height = height // multiple
        latent_width = width // multiple
        channels = self.transformer.config.in_channels
        if latents is None:
            noise = self._initial_noise(
                (batch_size, channels, latent_height, latent_width), generator, device, dtype
            )
            latents = self._pack_latents(noise)  # type: ignore[attr-defined]
        else:
            latents = latents.to(device=device, dtype=dtype)
        latent_ids = self._prepare_latent_ids(  # type: ignore[attr-defined]
            torch.empty(batch_size, 0, latent_height, latent_width)  # (its shape only)
        ).to(device)
        reference_tokens: torch.Tensor | None = None
        if subject_condition.reference_kv is None:
            reference_tokens, reference_ids = self._reference_tokens(
                subject_condition.reference_latents, device, dtype
            )
            reference_tokens = reference_tokens.unsqueeze(0).expand(batch_size, -1, -1)
            reference_ids = reference_ids.unsqueeze(0).expand(batch_size, -1, -1)
            step_inputs: dict[str, Any] = {"img_ids": torch.cat([latent_ids, reference_ids], dim=1)}
        else:  # the references' keys and values come from the subject: the image tokens run alone
            reference_kv = self._batched_kv(subject_condition.reference_kv, batch_size, device)
            step_inputs = {"img_ids": latent_ids, "kv_cache": reference_kv, "kv_cache_mode": "cached"}
        num_latent_tokens = latents.shape[1]

        # 3. Timesteps: linear sigmas, shifted by FLUX.2's empirical mu for this size and number of steps
        sigmas: np.ndarray | None = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if getattr(self.scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        mu = compute_empirical_mu(image_seq_len=num_latent_tokens, num_steps=num_inference_steps)
        # diffusers annotates `sigmas` as list[float]; its own pipelines pass this numpy array too.
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler,
            num_inference_steps,
            device,
            sigmas=sigmas,  # type: ignore[arg-type]
            mu=mu,
        )
        self._num_timesteps = len(timesteps)

        # 4. Denoising loop
        self._set_step_cache(step_cache)
        self.scheduler.set_begin_index(0)
        with self.progress_bar(total=num_inference_steps) as progress_bar:  # type: ignore[attr-defined]
            for i, t in enumerate(timesteps):
                if self._interrupt:
                    continue
                self._current_timestep = t
                hidden = (
                    latents if reference_tokens is None else torch.cat([latents, reference_tokens], dim=1)
                )
                timestep = t.expand(batch_size).to(latents.dtype)
                with self.transformer.cache_context("cond"):
                    noise_pred = self.transformer(
                        hidden_states=hidden.to(self.transformer.dtype),
                        timestep=timestep / 1000,
                        guidance=guidance,
                        encoder_hidden_states=prompt_embeds,
                        txt_ids=text_ids,
                        joint_attention_kwargs=self._attention_kwargs,
                        return_dict=False,
                        **step_inputs,
                    )[0]
                noise_pred = noise_pred[:, :num_latent_tokens]  # the reference tokens' outputs are dropped
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                callback_outputs = self._step_callback(
                    callback_on_step_end, i, t, callback_on_step_end_tensor_inputs, locals()
                )
                latents = callback_outputs.pop("latents", latents)
                prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                progress_bar.update()
        self._current_timestep = None

        # 5. Decode: unpack (B, h*w, 4C) → (B, 4C, h, w), undo the batch norm, unpatchify to (B, C, 2h, 2w)
        if output_type == "latent":
            image = latents
        else:
            unpacked = latents.transpose(1, 2).reshape(batch_size, channels, latent_height, latent_width)
            bn_mean = self.vae.bn.running_mean.view(1, -1, 1, 1).to(unpacked.device, unpacked.dtype)
            bn_std = torch.sqrt(self.vae.bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps)
            unpacked = unpacked * bn_std.to(unpacked.device, unpacked.dtype) + bn_mean
            unpacked = self._unpatchify_latents(unpacked)  # type: ignore[attr-defined]
            image = self.vae.decode(unpacked.to(self.vae.dtype), return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()  # type: ignore[attr-defined]
        if not return_dict:
            return (image, None)
        return Flux2PipelineOutput(images=image)


class _KleinPrompts:
    """FLUX.2 [klein]'s prompt encoding (Qwen3, one user turn, thinking off) and its lack of guidance."""

    model_name = "FLUX.2 [klein]"
    tokenizer: Any
    text_encoder: Any
    config: Any
    max_sequence_length: int
    text_encoder_out_layers: tuple[int, ...]
    _get_qwen3_prompt_embeds: Any

    def _chat_text(self, prompt: str) -> str:
        # diffusers' `_get_qwen3_prompt_embeds` template: one user turn, thinking turned off.
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=False,
        )

    def _encode_prompt_text(self, prompt: str, device: torch.device) -> torch.Tensor:
        return self._get_qwen3_prompt_embeds(
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            prompt=[prompt],
            device=device,
            max_sequence_length=self.max_sequence_length,
            hidden_states_layers=self.text_encoder_out_layers,
        )

    def _check_guidance(self, guidance_scale: float | None) -> None:
        # (diffusers' KV pipeline does not record `is_distilled`: its only checkpoint is distilled.)
        if not self.config.get("is_distilled", True):
            # The base models need classifier-free guidance over ~50 steps, which this class does not run.
            raise ValueError(
                "this FLUX.2 [klein] checkpoint is not step-distilled (`is_distilled: false`); "
                "use a distilled one such as black-forest-labs/FLUX.2-klein-4B"
            )
        if guidance_scale is not None:
            raise ValueError(
                "`guidance_scale` is not used by the step-distilled FLUX.2 [klein]; leave it out"
            )
        return None


class Flux2KleinPipeline(_KleinPrompts, _Flux2Subjects, DiffusersFlux2KleinPipeline):
    r"""
    [`diffusers.Flux2KleinPipeline`] for subject-driven batches: references encoded once per subject (up to
    4), prompt encodings cached, one CPU generator per image.

    Loads the same checkpoints as diffusers' class (e.g. `black-forest-labs/FLUX.2-klein-4B`); step-distilled
    ones only (`is_distilled` in `model_index.json`), which need no guidance.
    """

    registry_name = "flux2-klein"
    sampling_parameters = PIPELINES["flux2-klein"].sampling_parameters
    step_cache_methods = PIPELINES["flux2-klein"].step_cache_methods


class Flux2KleinKVPipeline(_KleinPrompts, _Flux2Subjects, DiffusersFlux2KleinKVPipeline):
    r"""
    [`diffusers.Flux2KleinKVPipeline`] for subject-driven batches: the references' VAE latents and their keys
    and values in every block computed once per subject (diffusers recomputes them in the first step of every
    call), so each step runs the image and text tokens only; prompt encodings cached, one CPU generator per
    image.

    Loads the checkpoints trained for it (e.g. `black-forest-labs/FLUX.2-klein-9b-kv`).
    """

    registry_name = "flux2-klein-kv"
    reuses_reference_kv = True
    sampling_parameters = PIPELINES["flux2-klein-kv"].sampling_parameters
    step_cache_methods = PIPELINES["flux2-klein-kv"].step_cache_methods


class Flux2DevPipeline(_Flux2Subjects, DiffusersFlux2Pipeline):
    r"""
    [`diffusers.Flux2Pipeline`] (FLUX.2 [dev]) for subject-driven batches: references encoded once per subject
    (up to 10), prompt encodings cached, one CPU generator per image.

    Loads the same checkpoints as diffusers' class (e.g. `black-forest-labs/FLUX.2-dev`).
    """

    model_name = "FLUX.2 [dev]"
    registry_name = "flux2-dev"
    sampling_parameters = PIPELINES["flux2-dev"].sampling_parameters
    step_cache_methods = PIPELINES["flux2-dev"].step_cache_methods

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, **kwargs: Any):
        """diffusers' `from_pretrained`, with the tokenizer from the checkpoint's `tokenizer/` folder in place
        of the `PixtralProcessor` its `model_index.json` names (which needs torchvision in transformers 5; the
        prompt is text only, so the tokenizer and its chat template are all FLUX.2 [dev] uses), unless
        `tokenizer=` is given."""
        if "tokenizer" in kwargs:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        from transformers import AutoTokenizer

        pipe = super().from_pretrained(pretrained_model_name_or_path, tokenizer=None, **kwargs)
        options = {key: kwargs[key] for key in ("revision", "cache_dir", "local_files_only") if key in kwargs}
        tokenizer = AutoTokenizer.from_pretrained(
            pretrained_model_name_or_path, subfolder="tokenizer", **options
        )
        pipe.register_modules(tokenizer=tokenizer)
        return pipe

    def _chat_text(self, prompt: str) -> str:
        # diffusers' `_get_mistral_3_small_prompt_embeds` template: its system prompt, then the user turn.
        return self.tokenizer.apply_chat_template(
            format_input([prompt], system_message=self.system_message)[0],
            tokenize=False,
            add_generation_prompt=False,
        )

    def _encode_prompt_text(self, prompt: str, device: torch.device) -> torch.Tensor:
        return self._get_mistral_3_small_prompt_embeds(
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            prompt=[prompt],
            device=device,
            max_sequence_length=self.max_sequence_length,
            system_message=self.system_message,
            hidden_states_layers=self.text_encoder_out_layers,
        )

    def _check_guidance(self, guidance_scale: float | None) -> torch.Tensor:
        # Black Forest Labs' and diffusers' default for FLUX.2 [dev].
        return torch.full([1], 4.0 if guidance_scale is None else guidance_scale, dtype=torch.float32)
