"""FLUX.1 Kontext through squeeze: diffusers' `FluxKontextPipeline` with the runner's subject/prompt contract.

What differs from diffusers' `__call__`:

- a subject's references are VAE-encoded once (`encode_subject`) and reused for all its prompts and seeds;
- several references: each joins the image stream as extra tokens with its own index in the first axis of
  the position ids (1 for the first reference, 2 for the second, ...; 0 is the generated image), which is
  how Kontext marks its single context image (index 1) and how `SqueezePipeline` adds its references;
- each prompt's T5/CLIP encoding is computed once and kept (a small LRU), whatever the batches;
- each image's noise comes from its own CPU generator (drawn in float32), so a seed gives the same image
  whatever the batch size or number of processes (this and the LRU are `contract.SubjectBatchMixin`'s);
- references are sized as diffusers sizes Kontext's context image (`kontext_reference_size`): the preferred
  Kontext resolution nearest their aspect ratio, at `reference_size`² area (1024: diffusers' own sizes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import (
    FluxKontextPipeline,
)
from diffusers.pipelines.flux.pipeline_flux_kontext import (
    PREFERRED_KONTEXT_RESOLUTIONS,
    calculate_shift,
    retrieve_timesteps,
)
from diffusers.utils import BaseOutput

from squeeze_cli.params import StepCache

from .contract import SubjectBatchMixin
from .registry import PIPELINES

__all__ = ["KontextPipeline", "KontextPipelineOutput", "KontextSubject", "kontext_reference_size"]

# T5 tokens FLUX reads at most; longer prompts are refused by `check_prompt_fits`, not silently truncated.
MAX_T5_TOKENS = 512
# The side of the square with the area of Kontext's preferred resolutions (~1 MP), which diffusers uses.
PREFERRED_SIDE = 1024


def kontext_reference_size(
    width: int, height: int, reference_size: int, multiple: int = 16
) -> tuple[int, int]:
    """(width, height) a `width`×`height` reference is resized to, as diffusers' `FluxKontextPipeline` sizes
    its context image: the preferred Kontext resolution nearest its aspect ratio (`_auto_resize`), scaled
    from their ~1024² area to `reference_size`² (at 1024, diffusers' sizes exactly), each side rounded
    down to a multiple of `multiple`, never below it."""
    aspect = width / height
    _, preferred_width, preferred_height = min(
        (abs(aspect - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS
    )
    scale = reference_size / PREFERRED_SIDE
    return (
        max(multiple, int(preferred_width * scale) // multiple * multiple),
        max(multiple, int(preferred_height * scale) // multiple * multiple),
    )


@dataclass
class KontextSubject:
    """A subject's references as FLUX.1 Kontext sees them, computed once by `encode_subject`.

    Args:
        reference_latents: per reference, normalised VAE latents of shape (latent_channels, h, w).
        reference_size: the side of the square whose area the references were resized to.
    """

    reference_latents: list[torch.Tensor]
    reference_size: int

    @property
    def num_references(self) -> int:
        return len(self.reference_latents)


@dataclass
class KontextPipelineOutput(BaseOutput):
    """
    Output of [`KontextPipeline`].

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`): the generated images.
        stage_plan (`None`): Kontext denoises in one stage; present for the runner's contract.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    stage_plan: None = None


class KontextPipeline(SubjectBatchMixin, FluxKontextPipeline):
    r"""
    [`FluxKontextPipeline`] for subject-driven batches: references encoded once per subject (several allowed,
    each with its own position index), prompt encodings cached, one CPU generator per image.

    Loads the same checkpoints as [`FluxKontextPipeline`] (e.g. `black-forest-labs/FLUX.1-Kontext-dev`).
    """

    sampling_parameters = PIPELINES["kontext"].sampling_parameters
    step_cache_methods = PIPELINES["kontext"].step_cache_methods

    @property
    def max_sequence_length(self) -> int:
        """T5 tokens per prompt: 512, or less when the T5 tokenizer says so (the tiny checkpoint's 64)."""
        return min(MAX_T5_TOKENS, self.tokenizer_2.model_max_length)

    # ----------------------------------------------------------------------------------------------------
    # Subject and prompts
    # ----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_subject(
        self, reference_images: PIL.Image.Image | Sequence[PIL.Image.Image], reference_size: int = 1024
    ) -> KontextSubject:
        r"""
        VAE-encode a subject's references once, for all its prompts.

        Args:
            reference_images (`PIL.Image.Image` or `list[PIL.Image.Image]`): the subject's photo(s).
            reference_size (`int`, defaults to 1024): each reference is resized to the preferred Kontext
                resolution nearest its aspect ratio, at this side's square area (`kontext_reference_size`;
                1024 sizes as diffusers' `FluxKontextPipeline`).

        Returns:
            [`KontextSubject`]: per reference, the latent distribution's mode, normalised with the VAE's
            shift and scaling factors.
        """
        if isinstance(reference_images, PIL.Image.Image):
            reference_images = [reference_images]
        if not reference_images:
            raise ValueError("FLUX.1 Kontext needs at least one reference image.")
        device = self._execution_device
        multiple = self.vae_scale_factor * 2
        latents = []
        for image in reference_images:
            image = image.convert("RGB")
            width, height = kontext_reference_size(image.width, image.height, reference_size, multiple)
            pixels = self.image_processor.preprocess(image, height=height, width=width)
            pixels = pixels.to(device=device, dtype=self.vae.dtype)
            encoded = self.vae.encode(pixels).latent_dist.mode()
            latents.append(((encoded - self.vae.config.shift_factor) * self.vae.config.scaling_factor)[0])
        self.maybe_free_model_hooks()
        return KontextSubject(reference_latents=latents, reference_size=reference_size)

    def check_prompt_fits(self, reference_sizes: Sequence[tuple[int, int]], prompts: Sequence[str]) -> None:
        """Raise `ValueError` for a prompt longer than the T5 encoder reads (it would be cut silently).

        `reference_sizes` is unused: references do not share the text encoder's context in Kontext.
        """
        for prompt in prompts:
            length = len(self.tokenizer_2(prompt, truncation=False, verbose=False).input_ids)
            if length > self.max_sequence_length:
                raise ValueError(
                    f"the prompt is {length} T5 tokens, more than the {self.max_sequence_length} "
                    "FLUX.1 Kontext reads; shorten it"
                )

    def prepare_prompts(self, subject_condition: KontextSubject, prompts: Sequence[str]) -> None:
        """Encode `prompts` now into the prompt cache (at most `prompt_cache_size`), so that with model
        offload the text encoders move onto the GPU once for them all, not once per `__call__`."""
        device = self._execution_device
        latest = list(dict.fromkeys(prompts))[-self.prompt_cache_size :]
        self.encode_prompts(latest, device, self.transformer.dtype)

    @torch.no_grad()
    def encode_prompts(
        self, prompts: Sequence[str], device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 embeddings (B, L, D) and CLIP pooled embeddings (B, P) of `prompts`, each encoded alone, cached.

        Each prompt is padded to `max_sequence_length` on its own, as FLUX does, so its encoding does not
        depend on the other prompts of the batch.
        """
        embeds, pooled = [], []
        key_models = (id(self.text_encoder), id(self.text_encoder_2))
        for prompt in prompts:

            def encode(prompt: str = prompt) -> tuple[torch.Tensor, torch.Tensor]:
                e, p, _ = self.encode_prompt(
                    prompt=[prompt],
                    prompt_2=None,
                    device=device,
                    max_sequence_length=self.max_sequence_length,
                )
                return e[0].detach(), p[0].detach()

            e, p = self._remember_prompt((*key_models, prompt, self.max_sequence_length), encode)
            embeds.append(e.to(device=device, dtype=dtype))
            pooled.append(p.to(device=device, dtype=dtype))
        return torch.stack(embeds), torch.stack(pooled)

    def _reference_tokens(
        self, subject: KontextSubject, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed reference tokens (n, C*4) and position ids (n, 3): reference k has index k (from 1)."""
        tokens, ids = [], []
        for index, latents in enumerate(subject.reference_latents, start=1):
            channels, height, width = latents.shape
            latents = latents.unsqueeze(0).to(device=device, dtype=dtype)
            tokens.append(self._pack_latents(latents, 1, channels, height, width)[0])
            reference_ids = self._prepare_latent_image_ids(1, height // 2, width // 2, device, dtype)
            reference_ids[..., 0] = index
            ids.append(reference_ids)
        return torch.cat(tokens), torch.cat(ids)

    # ----------------------------------------------------------------------------------------------------
    # Generation
    # ----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        subject_condition: KontextSubject | None = None,
        reference_images: PIL.Image.Image | list[PIL.Image.Image] | None = None,
        negative_prompt: str | None = None,
        true_cfg_scale: float = 1.0,
        height: int = 1024,
        width: int = 1024,
        num_inference_steps: int = 28,
        guidance_scale: float = 2.5,
        reference_size: int = 1024,
        step_cache: StepCache | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> KontextPipelineOutput | tuple:
        r"""
        Generate one image per prompt of a subject.

        Args:
            prompt (`str` or `list[str]`): the edit instruction(s), one image each.
            subject_condition ([`KontextSubject`], *optional*): from `encode_subject`; or give
                `reference_images` (encoded on the fly at `reference_size`).
            negative_prompt (`str`, *optional*): with `true_cfg_scale > 1`, a second transformer pass per step
                (real classifier-free guidance, on top of the distilled guidance).
            true_cfg_scale (`float`, defaults to 1.0): real CFG scale; 1 turns it off.
            height (`int`), width (`int`): output size in pixels, multiples of 16.
            num_inference_steps (`int`, defaults to 28): denoising steps.
            guidance_scale (`float`, defaults to 2.5): FLUX's distilled guidance (the transformer's guidance
                embedding), not classifier-free guidance. Black Forest Labs use 2.5 for Kontext [dev].
            reference_size (`int`, defaults to 1024): used with `reference_images` only.
            step_cache (`StepCache`, *optional*): opt-in step caching through diffusers' hooks (a method of
                `step_cache_methods`); faster, and the pixels differ a little from exact sampling. `None`
                samples exactly.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): one CPU generator per image
                makes each image independent of the batch it is in.
            latents (`torch.Tensor`, *optional*): packed starting noise (batch, tokens, channels * 4).
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` or `"latent"`.
            return_dict (`bool`, defaults to `True`): return a [`KontextPipelineOutput`] rather than a tuple.
            joint_attention_kwargs (`dict`, *optional*): passed to the attention processors (LoRA `scale`).
            callback_on_step_end (`Callable`, *optional*): `fn(pipe, step, timestep, callback_kwargs)` after
                each step; `callback_on_step_end_tensor_inputs` names the tensors it receives.

        Returns:
            [`KontextPipelineOutput`] or `tuple` `(images, None)`.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        multiple = self.vae_scale_factor * 2
        self._check_size(height, width, multiple)
        subject_condition = self._subject(subject_condition, reference_images, reference_size)
        self._check_callback_inputs(callback_on_step_end_tensor_inputs)
        batch_size = len(prompts)
        self._check_generators(generator, batch_size)

        self._guidance_scale = guidance_scale
        self._joint_attention_kwargs = dict(joint_attention_kwargs or {})
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device
        dtype = self.transformer.dtype

        # 1. Conditions
        prompt_embeds, pooled_prompt_embeds = self.encode_prompts(prompts, device, dtype)
        do_true_cfg = true_cfg_scale > 1 and negative_prompt is not None
        if do_true_cfg:
            assert negative_prompt is not None  # `do_true_cfg` says so
            negative_embeds, negative_pooled = self.encode_prompts(
                [negative_prompt] * batch_size, device, dtype
            )
        text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype)

        # 2. Noise (float32, per image) and reference tokens
        latent_height = 2 * (height // multiple)
        latent_width = 2 * (width // multiple)
        channels = self.transformer.config.in_channels // 4
        if latents is None:
            shape = (batch_size, channels, latent_height, latent_width)
            noise = self._initial_noise(shape, generator, device, dtype)
            latents = self._pack_latents(noise, batch_size, channels, latent_height, latent_width)
        else:
            latents = latents.to(device=device, dtype=dtype)
        latent_ids = self._prepare_latent_image_ids(
            batch_size, latent_height // 2, latent_width // 2, device, dtype
        )
        reference_tokens, reference_ids = self._reference_tokens(subject_condition, device, dtype)
        reference_tokens = reference_tokens.unsqueeze(0).expand(batch_size, -1, -1)
        image_ids = torch.cat([latent_ids, reference_ids])
        num_latent_tokens = latents.shape[1]

        # 3. Timesteps: FLUX's linear sigmas, shifted by the generated image's size (as diffusers' Kontext)
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        mu = calculate_shift(
            num_latent_tokens,
            self.scheduler.config.get("base_image_seq_len", 256),
            self.scheduler.config.get("max_image_seq_len", 4096),
            self.scheduler.config.get("base_shift", 0.5),
            self.scheduler.config.get("max_shift", 1.15),
        )
        # diffusers annotates `sigmas` as list[float]; its own pipelines pass this numpy array too.
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler,
            num_inference_steps,
            device,
            sigmas=sigmas,  # type: ignore[arg-type]
            mu=mu,
        )
        self._num_timesteps = len(timesteps)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([batch_size], guidance_scale, device=device, dtype=torch.float32)

        self._set_step_cache(step_cache)

        def predict(
            embeds: torch.Tensor,
            pooled: torch.Tensor,
            hidden: torch.Tensor,
            timestep: torch.Tensor,
            cache_name: str,
        ) -> torch.Tensor:
            with self.transformer.cache_context(cache_name):
                noise_pred = self.transformer(
                    hidden_states=hidden,
                    timestep=timestep / 1000,
                    guidance=guidance,
                    pooled_projections=pooled,
                    encoder_hidden_states=embeds,
                    txt_ids=text_ids,
                    img_ids=image_ids,
                    joint_attention_kwargs=self._joint_attention_kwargs,
                    return_dict=False,
                )[0]
            return noise_pred[:, :num_latent_tokens]  # the reference tokens' outputs are dropped

        # 4. Denoising loop
        self.scheduler.set_begin_index(0)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                hidden = torch.cat([latents, reference_tokens], dim=1)
                timestep = t.expand(batch_size).to(latents.dtype)
                noise_pred = predict(prompt_embeds, pooled_prompt_embeds, hidden, timestep, "cond")
                if do_true_cfg:
                    negative_pred = predict(negative_embeds, negative_pooled, hidden, timestep, "uncond")
                    noise_pred = negative_pred + true_cfg_scale * (noise_pred - negative_pred)
                latents_dtype = latents.dtype
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0].to(latents_dtype)
                callback_outputs = self._step_callback(
                    callback_on_step_end, i, t, callback_on_step_end_tensor_inputs, locals()
                )
                latents = callback_outputs.pop("latents", latents)
                prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                progress_bar.update()
        self._current_timestep = None

        # 5. Decode
        if output_type == "latent":
            image = latents
        else:
            unpacked = self._unpack_latents(latents, height, width, self.vae_scale_factor)
            unpacked = unpacked / self.vae.config.scaling_factor + self.vae.config.shift_factor
            image = self.vae.decode(unpacked.to(self.vae.dtype), return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image, None)
        return KontextPipelineOutput(images=image)
