"""Qwen-Image-Edit-2509 and -2511 through squeeze: diffusers' `QwenImageEditPlusPipeline` with the runner's
contract (2511 differs only in its checkpoint: the transformer config's `zero_cond_t`, which diffusers'
transformer reads).

What differs from diffusers' `__call__`:

- a subject's references are prepared once (`encode_subject`): their VAE latents, and the Qwen2.5-VL pass
  over the part of the sequence before the instruction (system prompt, "Picture 1: <image> ..."), kept as
  its last hidden layer and KV cache. That part does not depend on the instruction (causal attention), so
  each prompt then runs only its own tokens on top of the cache: exact, and the vision tower runs once per
  subject;
- each prompt's encoding is kept on the subject, so the seeds of a prompt (and the negative prompt) share it;
- batches of several prompts (diffusers' pipeline takes one): each prompt is encoded alone and the batch
  pads the encodings with an attention mask;
- each image's noise comes from its own CPU generator (float32), so a seed gives the same image whatever
  the batch size or number of processes;
- the VL inputs are built from the tokenizer and the (PIL) image processor, exactly as `Qwen2VLProcessor`
  does (each `<|image_pad|>` expanded to the image's merged patch count): that processor cannot be built
  without torchvision in transformers 5 (its video processor needs it), so the pipeline's `processor` is the
  image processor itself (a `Qwen2VLProcessor` is also accepted);
- references are sized for the VAE as diffusers sizes them, at `reference_size`² area (`vae_reference_size`;
  1024: diffusers' own sizes), and for the VL encoder at diffusers' ~384² area.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
from diffusers import QwenImageEditPlusPipeline as DiffusersQwenImageEditPlusPipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (
    CONDITION_IMAGE_SIZE,
    calculate_dimensions,
    calculate_shift,
    retrieve_timesteps,
)
from diffusers.utils import BaseOutput
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen2VLImageProcessorPil

from squeeze_cli.params import StepCache

from .contract import SubjectBatchMixin
from .mllm.qwen2_5_vl import mrope_positions
from .registry import PIPELINES

__all__ = ["QwenImageEditPlusPipeline", "QwenImageEditPlusOutput", "QwenEditSubject", "vae_reference_size"]

IMAGE_PROMPT = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
SIZE_MULTIPLE = 32  # `calculate_dimensions` rounds each side to a multiple of 32


def vae_reference_size(width: int, height: int, reference_size: int) -> tuple[int, int]:
    """(width, height) a `width`×`height` reference is resized to for the VAE, as diffusers'
    `QwenImageEditPlusPipeline` does (`calculate_dimensions`) but at `reference_size`² area in place of its
    `VAE_IMAGE_SIZE` (1024²): aspect kept, sides rounded to multiples of 32, never below 32 (where diffusers
    would make 0 at a small area and an extreme aspect ratio)."""
    new_width, new_height = calculate_dimensions(reference_size * reference_size, width / height)
    return max(SIZE_MULTIPLE, new_width), max(SIZE_MULTIPLE, new_height)


@dataclass
class QwenEditSubject:
    """A subject's references as Qwen-Image-Edit sees them, computed once by `encode_subject`.

    Args:
        reference_latents: per reference, normalised VAE latents of shape (z_dim, 1, h, w).
        vl_inputs: the Qwen2.5-VL image inputs: `pixel_values` and `image_grid_thw` of the condition images.
        reference_size: the side of the square whose area the references were resized to for the VAE.
        prefix_ids: the tokens before the instruction (system prompt, then each "Picture k: <image>").
        prefix_hidden: Qwen2.5-VL's last hidden layer over `prefix_ids`, (prefix_length, D).
        prefix_cache: the KV cache over `prefix_ids`; `encode_instruction` extends it and crops it back.
        prompt_encodings: per prompt, its VL encoding (tokens, D), filled in as prompts are run.
    """

    reference_latents: list[torch.Tensor]
    vl_inputs: dict[str, torch.Tensor]
    reference_size: int
    prefix_ids: torch.Tensor | None = None
    prefix_hidden: torch.Tensor | None = None
    prefix_cache: Any = None
    prompt_encodings: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_references(self) -> int:
        return len(self.reference_latents)


@dataclass
class QwenImageEditPlusOutput(BaseOutput):
    """
    Output of [`QwenImageEditPlusPipeline`].

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`): the generated images.
        stage_plan (`None`): one-stage denoising; present for the runner's contract.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    stage_plan: None = None


class QwenImageEditPlusPipeline(SubjectBatchMixin, DiffusersQwenImageEditPlusPipeline):
    r"""
    [`~diffusers.QwenImageEditPlusPipeline`] for subject-driven batches: several references natively, their
    VAE latents and VL image inputs prepared once per subject, VL encodings cached per prompt, one CPU
    generator per image, batches of several prompts.

    Loads the same checkpoints (`Qwen/Qwen-Image-Edit-2509`, `Qwen/Qwen-Image-Edit-2511`); `from_pretrained`
    takes the image processor from `processor/` (see there).
    """

    sampling_parameters = PIPELINES["qwen-image-edit-plus"].sampling_parameters
    step_cache_methods = PIPELINES["qwen-image-edit-plus"].step_cache_methods
    _optional_components = ["processor"]

    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKLQwenImage,
        text_encoder: Qwen2_5_VLForConditionalGeneration,
        tokenizer: Qwen2Tokenizer,
        processor: Any,
        transformer: QwenImageTransformer2DModel,
    ):
        super().__init__(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            processor=processor,
            transformer=transformer,
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        """diffusers' `from_pretrained`, with the image processor from the checkpoint's `processor/` folder in
        place of the `Qwen2VLProcessor` its `model_index.json` names (which diffusers would build, and which
        needs torchvision in transformers 5), unless `processor=` is given."""
        if "processor" in kwargs:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        pipe = super().from_pretrained(pretrained_model_name_or_path, processor=None, **kwargs)
        options = {key: kwargs[key] for key in ("revision", "cache_dir", "local_files_only") if key in kwargs}
        processor = Qwen2VLImageProcessorPil.from_pretrained(
            pretrained_model_name_or_path, subfolder="processor", **options
        )
        pipe.register_modules(processor=processor)
        return pipe

    # ----------------------------------------------------------------------------------------------------
    # Inputs of the vision-language encoder
    # ----------------------------------------------------------------------------------------------------

    @property
    def vl_image_processor(self) -> Any:
        """The Qwen2-VL image processor: `processor` itself, or a full processor's `image_processor`."""
        return getattr(self.processor, "image_processor", self.processor)

    @property
    def max_vl_tokens(self) -> int:
        """Longest VL sequence: diffusers' 1024-token bound, or the encoder's context if shorter."""
        context = self.text_encoder.config.get_text_config().max_position_embeddings
        return min(self.tokenizer_max_length, context)

    def _template_parts(self, num_images: int) -> tuple[str, str]:
        """The text before and after the instruction, images included (diffusers' template)."""
        images = "".join(IMAGE_PROMPT.format(i + 1) for i in range(num_images))
        before, after = self.prompt_template_encode.split("{}")
        return before + images, after

    def _drop_length(self) -> int:
        """Tokens of the system part of the template, which the transformer does not see.

        diffusers hard-codes 64, the length with Qwen2.5-VL's tokenizer; computed here from the tokenizer, so
        it is also right for other tokenizers (the tiny checkpoint's).
        """
        system = self.prompt_template_encode.split("<|im_start|>user\n")[0] + "<|im_start|>user\n"
        return len(self.tokenizer(system, add_special_tokens=False).input_ids)

    def _image_tokens(self, grid_thw: torch.Tensor) -> list[int]:
        merge = self.vl_image_processor.merge_size
        return [int(torch.prod(grid).item()) // merge**2 for grid in grid_thw]

    def _prefix_ids(self, tokens_per_image: Sequence[int]) -> list[int]:
        """The tokens before the instruction as `Qwen2VLProcessor` makes them: each `<|image_pad|>`
        repeated once per merged patch of its image."""
        before, _ = self._template_parts(len(tokens_per_image))
        pad_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        ids: list[int] = []
        counts = iter(tokens_per_image)
        for token in self.tokenizer(before, add_special_tokens=False, verbose=False).input_ids:
            ids += [token] * next(counts) if token == pad_id else [token]
        return ids

    def _instruction_ids(self, prompt: str, num_images: int) -> list[int]:
        """The instruction's tokens and the end of the template after it."""
        _, after = self._template_parts(num_images)
        # The instruction stays text even if it happens to contain a special token's spelling.
        ids = self.tokenizer(
            prompt, add_special_tokens=False, split_special_tokens=True, verbose=False
        ).input_ids
        return ids + self.tokenizer(after, add_special_tokens=False, verbose=False).input_ids

    def _input_ids(self, prompt: str, tokens_per_image: Sequence[int]) -> list[int]:
        """The whole sequence the VL encoder reads for `prompt` with images of these token counts."""
        return self._prefix_ids(tokens_per_image) + self._instruction_ids(prompt, len(tokens_per_image))

    def _mrope_positions(self, input_ids: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        image_token_id = self.text_encoder.config.image_token_id
        return mrope_positions(self.text_encoder.model, input_ids, image_token_id, grid_thw)

    def _condition_size(self, width: int, height: int) -> tuple[int, int]:
        return calculate_dimensions(CONDITION_IMAGE_SIZE, width / height)

    # ----------------------------------------------------------------------------------------------------
    # Subject and prompts
    # ----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_subject(
        self, reference_images: PIL.Image.Image | Sequence[PIL.Image.Image], reference_size: int = 1024
    ) -> QwenEditSubject:
        r"""
        Prepare a subject's references once, for all its prompts.

        Args:
            reference_images (`PIL.Image.Image` or `list[PIL.Image.Image]`): the subject's photo(s).
            reference_size (`int`, defaults to 1024): each reference is resized for the VAE to this side's
                square area, aspect kept (`vae_reference_size`; 1024 sizes as diffusers). The VL encoder sees
                them at ~384² area (diffusers' size).

        Returns:
            [`QwenEditSubject`]: the VAE latents (normalised with the VAE's latents_mean/std) and the
            Qwen2.5-VL image inputs.
        """
        if isinstance(reference_images, PIL.Image.Image):
            reference_images = [reference_images]
        if not reference_images:
            raise ValueError("Qwen-Image-Edit needs at least one reference image.")
        device = self._execution_device
        images = [image.convert("RGB") for image in reference_images]
        condition_images = []
        for image in images:
            width, height = self._condition_size(image.width, image.height)
            condition_images.append(self.image_processor.resize(image, height, width))
        vl_inputs = dict(self.vl_image_processor(images=condition_images, return_tensors="pt"))

        mean = torch.tensor(self.vae.config.latents_mean).view(1, self.latent_channels, 1, 1, 1)
        std = torch.tensor(self.vae.config.latents_std).view(1, self.latent_channels, 1, 1, 1)
        latents = []
        for image in images:
            width, height = vae_reference_size(image.width, image.height, reference_size)
            pixels = self.image_processor.preprocess(image, height=height, width=width).unsqueeze(2)
            encoded = self.vae.encode(pixels.to(device=device, dtype=self.vae.dtype)).latent_dist.mode()
            latents.append(((encoded - mean.to(encoded)) / std.to(encoded))[0])
        subject = QwenEditSubject(latents, vl_inputs, reference_size)
        self._encode_prefix(subject)
        self.maybe_free_model_hooks()
        return subject

    def _encode_prefix(self, subject: QwenEditSubject) -> None:
        """Run Qwen2.5-VL (vision tower included) over the tokens before the instruction, once."""
        device = self._execution_device
        grid_thw = subject.vl_inputs["image_grid_thw"]
        input_ids = torch.tensor(self._prefix_ids(self._image_tokens(grid_thw)), dtype=torch.long)
        outputs = self.text_encoder(
            input_ids=input_ids.unsqueeze(0).to(device),
            position_ids=self._mrope_positions(input_ids, grid_thw).to(device),
            pixel_values=subject.vl_inputs["pixel_values"].to(device=device, dtype=self.text_encoder.dtype),
            image_grid_thw=grid_thw.to(device),
            use_cache=True,
            output_hidden_states=True,
            logits_to_keep=1,  # the LM head is not used
        )
        subject.prefix_ids = input_ids
        subject.prefix_hidden = outputs.hidden_states[-1][0].detach()
        subject.prefix_cache = outputs.cache

    def check_prompt_fits(self, reference_sizes: Sequence[tuple[int, int]], prompts: Sequence[str]) -> None:
        """Raise `ValueError` when references + prompt exceed the VL encoder's sequence (`max_vl_tokens`).

        Counts image tokens from the sizes alone (the image processor's patch count), without decoding.
        """
        processor = self.vl_image_processor
        tokens_per_image = []
        for width, height in reference_sizes:
            cw, ch = self._condition_size(width, height)
            tokens_per_image.append(
                processor.get_number_of_image_patches(ch, cw, {}) // processor.merge_size**2
            )
        for prompt in prompts:
            total = len(self._input_ids(prompt, tokens_per_image))
            if total > self.max_vl_tokens:
                raise ValueError(
                    f"with its {len(reference_sizes)} reference image(s) the prompt makes a {total}-token "
                    f"sequence, more than the {self.max_vl_tokens} Qwen-Image-Edit reads; shorten it"
                )

    def prepare_prompts(self, subject_condition: QwenEditSubject, prompts: Sequence[str]) -> None:
        """Encode `prompts` now on the subject's prefix (kept on the subject), so that with model offload the
        VL encoder moves onto the GPU once for them all, not once per `__call__`."""
        for prompt in dict.fromkeys(prompts):
            self.encode_instruction(subject_condition, prompt)

    @torch.no_grad()
    def encode_instruction(self, subject: QwenEditSubject, prompt: str) -> torch.Tensor:
        """The transformer's text condition (tokens, D) for one prompt with the subject's references, cached
        on the subject: the last hidden layer of Qwen2.5-VL without the system part of the template."""
        if prompt in subject.prompt_encodings:
            return subject.prompt_encodings[prompt]
        device = self._execution_device
        assert subject.prefix_ids is not None and subject.prefix_hidden is not None  # set by encode_subject
        cache, prefix_length = subject.prefix_cache, subject.prefix_ids.shape[0]
        if cache.get_seq_length() != prefix_length:
            raise RuntimeError("The subject's prefix cache was changed outside encode_instruction.")
        new_ids = torch.tensor(self._instruction_ids(prompt, subject.num_references), dtype=torch.long)
        # Positions of the whole sequence, sliced: M-RoPE text positions continue from the images' largest.
        full_ids = torch.cat([subject.prefix_ids, new_ids])
        grid_thw = subject.vl_inputs["image_grid_thw"]
        position_ids = self._mrope_positions(full_ids, grid_thw)[..., prefix_length:]
        try:
            outputs = self.text_encoder(
                input_ids=new_ids.unsqueeze(0).to(device),
                position_ids=position_ids.to(device),
                cache=cache,
                use_cache=True,
                output_hidden_states=True,
                logits_to_keep=1,
            )
        finally:
            grown = cache.get_seq_length() - prefix_length
            if grown > 0:
                cache.crop(-grown)  # back to the prefix, for the next prompt
        hidden = torch.cat([subject.prefix_hidden, outputs.hidden_states[-1][0].detach()])
        encoding = hidden[self._drop_length() :]
        subject.prompt_encodings[prompt] = encoding
        return encoding

    @torch.no_grad()
    def encode_instruction_uncached(self, subject: QwenEditSubject, prompt: str) -> torch.Tensor:
        """`encode_instruction` in one full pass over references and prompt (to check the cached path
        against; generation does not use it).

        The M-RoPE positions are passed explicitly: transformers 5 computes them only when given
        `mm_token_type_ids`, which diffusers' own `_get_qwen_prompt_embeds` does not pass (it then gets
        plain 1-D positions, unlike the transformers 4 the model was released with).
        """
        device = self._execution_device
        grid_thw = subject.vl_inputs["image_grid_thw"]
        input_ids = torch.tensor(self._input_ids(prompt, self._image_tokens(grid_thw)), dtype=torch.long)
        outputs = self.text_encoder(
            input_ids=input_ids.unsqueeze(0).to(device),
            position_ids=self._mrope_positions(input_ids, grid_thw).to(device),
            pixel_values=subject.vl_inputs["pixel_values"].to(device=device, dtype=self.text_encoder.dtype),
            image_grid_thw=grid_thw.to(device),
            output_hidden_states=True,
        )
        return outputs.hidden_states[-1][0, self._drop_length() :]

    def _batch_encodings(
        self, subject: QwenEditSubject, prompts: Sequence[str], device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, L, D) encodings zero-padded at the end, and the (B, L) mask (None when nothing is padded)."""
        encodings = [self.encode_instruction(subject, p).to(device=device, dtype=dtype) for p in prompts]
        longest = max(e.shape[0] for e in encodings)
        embeds = encodings[0].new_zeros(len(encodings), longest, encodings[0].shape[-1])
        mask = torch.zeros(len(encodings), longest, dtype=torch.long, device=device)
        for i, e in enumerate(encodings):
            embeds[i, : e.shape[0]] = e
            mask[i, : e.shape[0]] = 1
        return embeds, (None if bool(mask.all()) else mask)

    # ----------------------------------------------------------------------------------------------------
    # Generation
    # ----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        subject_condition: QwenEditSubject | None = None,
        reference_images: PIL.Image.Image | list[PIL.Image.Image] | None = None,
        negative_prompt: str | None = None,
        true_cfg_scale: float = 4.0,
        height: int = 1024,
        width: int = 1024,
        num_inference_steps: int = 40,
        reference_size: int = 1024,
        step_cache: StepCache | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> QwenImageEditPlusOutput | tuple:
        r"""
        Generate one image per prompt of a subject.

        Args:
            prompt (`str` or `list[str]`): the edit instruction(s), one image each.
            subject_condition ([`QwenEditSubject`], *optional*): from `encode_subject`; or give
                `reference_images` (prepared on the fly at `reference_size`).
            negative_prompt (`str`, *optional*): the negative instruction of real CFG (Qwen uses `" "`).
            true_cfg_scale (`float`, defaults to 4.0): real classifier-free guidance, on with a negative
                prompt; as diffusers, the guided prediction is rescaled to the conditional one's norm.
            height (`int`), width (`int`): output size in pixels, multiples of 16.
            num_inference_steps (`int`, defaults to 40): denoising steps.
            step_cache (`StepCache`, *optional*): opt-in step caching through diffusers' hooks (a method of
                `step_cache_methods`); faster, and the pixels differ a little from exact sampling. `None`
                samples exactly.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): one CPU generator per image
                makes each image independent of the batch it is in.
            latents (`torch.Tensor`, *optional*): packed starting noise.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` or `"latent"`.
            return_dict (`bool`, defaults to `True`): return a [`QwenImageEditPlusOutput`], not a tuple.
            attention_kwargs (`dict`, *optional*): passed to the attention processors (LoRA `scale`).
            callback_on_step_end (`Callable`, *optional*): `fn(pipe, step, timestep, callback_kwargs)`.

        Returns:
            [`QwenImageEditPlusOutput`] or `tuple` `(images, None)`.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        multiple = self.vae_scale_factor * 2
        self._check_size(height, width, multiple)
        subject_condition = self._subject(subject_condition, reference_images, reference_size)
        self._check_callback_inputs(callback_on_step_end_tensor_inputs)
        batch_size = len(prompts)
        self._check_generators(generator, batch_size)
        self._guidance_scale = None
        self._attention_kwargs = dict(attention_kwargs or {})
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device
        dtype = self.transformer.dtype

        # 1. Conditions
        prompt_embeds, prompt_mask = self._batch_encodings(subject_condition, prompts, device, dtype)
        do_true_cfg = true_cfg_scale > 1 and negative_prompt is not None
        if do_true_cfg:
            assert negative_prompt is not None  # `do_true_cfg` says so
            negative_embeds, negative_mask = self._batch_encodings(
                subject_condition, [negative_prompt] * batch_size, device, dtype
            )

        # 2. Noise (float32, per image) and reference tokens
        latent_height, latent_width = 2 * (height // multiple), 2 * (width // multiple)
        channels = self.transformer.config.in_channels // 4
        if latents is None:
            shape = (batch_size, 1, channels, latent_height, latent_width)
            noise = self._initial_noise(shape, generator, device, dtype)
            latents = self._pack_latents(noise, batch_size, channels, latent_height, latent_width)
        else:
            latents = latents.to(device=device, dtype=dtype)
        packed_references, shapes = [], [(1, latent_height // 2, latent_width // 2)]
        for reference in subject_condition.reference_latents:
            _, _, h, w = reference.shape
            packed = self._pack_latents(
                reference.unsqueeze(0).to(device=device, dtype=dtype), 1, channels, h, w
            )
            packed_references.append(packed)
            shapes.append((1, h // 2, w // 2))
        reference_tokens = torch.cat(packed_references, dim=1).expand(batch_size, -1, -1)
        img_shapes = [shapes] * batch_size
        num_latent_tokens = latents.shape[1]

        # 3. Timesteps, as diffusers
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

        self._set_step_cache(step_cache)

        def predict(embeds, mask, hidden, timestep, cache_name):
            with self.transformer.cache_context(cache_name):
                noise_pred = self.transformer(
                    hidden_states=hidden,
                    timestep=timestep / 1000,
                    guidance=None,
                    encoder_hidden_states_mask=mask,
                    encoder_hidden_states=embeds,
                    img_shapes=img_shapes,
                    attention_kwargs=self._attention_kwargs,
                    return_dict=False,
                )[0]
            return noise_pred[:, :num_latent_tokens]

        # 4. Denoising loop
        self.scheduler.set_begin_index(0)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                hidden = torch.cat([latents, reference_tokens], dim=1)
                timestep = t.expand(batch_size).to(latents.dtype)
                noise_pred = predict(prompt_embeds, prompt_mask, hidden, timestep, "cond")
                if do_true_cfg:
                    negative_pred = predict(negative_embeds, negative_mask, hidden, timestep, "uncond")
                    guided = negative_pred + true_cfg_scale * (noise_pred - negative_pred)
                    # diffusers' norm rescaling: the guided prediction keeps the conditional one's norm.
                    cond_norm = torch.norm(noise_pred, dim=-1, keepdim=True)
                    noise_pred = guided * (cond_norm / torch.norm(guided, dim=-1, keepdim=True))
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
            unpacked = self._unpack_latents(latents, height, width, self.vae_scale_factor).to(self.vae.dtype)
            mean = torch.tensor(self.vae.config.latents_mean).view(1, self.latent_channels, 1, 1, 1)
            std = torch.tensor(self.vae.config.latents_std).view(1, self.latent_channels, 1, 1, 1)
            unpacked = unpacked * std.to(unpacked) + mean.to(unpacked)
            image = self.vae.decode(unpacked, return_dict=False)[0][:, :, 0]
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image, None)
        return QwenImageEditPlusOutput(images=image)
