"""Joint MLLM encoding of reference image(s) + instruction, with an exact per-subject prefix cache.

Every family through transformers, with what differs in one adapter per family (`family.py`). The model's
full processor is never built: it needs a video processor, which needs torchvision, which our CPU machines do
not have. Instead the inputs are built here the way each processor builds them: the chat template (from the
tokenizer, or the family's own one), each image placeholder expanded to the number of image tokens the image
processor's output gives, and the pixel inputs from the slow image processor.

The joint prompt is one user turn: reference image(s) first, then the instruction. Because the LLM is causal,
every layer's hidden states over the part before the instruction — the *prefix*, which holds all the image
tokens — and its KV cache do not depend on the instruction. `encode_prefix` runs it once per subject and
`encode_instruction` runs only the instruction's own tokens (plus the few template tokens after it) on top;
the result equals a full `encode` pass up to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from .family import NO_IMAGES, ImageInputs, MLLMFamily, family_adapter

# Rendered in place of the instruction to find where it sits in the template. Letters only, so no template
# filter (trim, escaping) changes it.
_INSTRUCTION_SLOT = "SQUEEZEINSTRUCTIONSLOT"
_NO_LIMIT = 10**9  # tokenizers say "no limit" with a huge model_max_length (1e30)


@dataclass
class MLLMEncoding:
    """Every hidden state of one joint (images + instruction) sequence and which positions are conditions.

    Args:
        hidden_states (`torch.Tensor` of shape `(num_hidden_states, seq_len, hidden_size)`):
            The embedding output followed by each decoder layer's output (29 states for a 28-layer LLM; the
            last one after the final norm, as transformers returns it). Model dtype and device.
        image_mask (`torch.BoolTensor` of shape `(seq_len,)`):
            Image-token positions (`<IMG_CONTEXT>` / `<|image_pad|>`); the image begin/end markers are not.
        text_mask (`torch.BoolTensor` of shape `(seq_len,)`):
            The instruction's own tokens. Chat-template scaffolding (system prompt, role markers, newlines of
            the template, `<|im_end|>`, the assistant turn opener, image markers) is in neither mask. For an
            empty instruction one stand-in token is marked instead, see `MLLMEncoder`.
        input_ids (`torch.LongTensor` of shape `(seq_len,)`, *optional*):
            The token ids of the sequence, for inspection.
    """

    hidden_states: torch.Tensor
    image_mask: torch.Tensor
    text_mask: torch.Tensor
    input_ids: torch.Tensor | None = None

    @property
    def image_hidden_states(self) -> torch.Tensor:
        """`(num_hidden_states, num_image_tokens, hidden_size)`, in sequence order."""
        return self.hidden_states[:, self.image_mask.to(self.hidden_states.device)]

    @property
    def text_hidden_states(self) -> torch.Tensor:
        """`(num_hidden_states, num_text_tokens, hidden_size)`, in sequence order."""
        return self.hidden_states[:, self.text_mask.to(self.hidden_states.device)]


@dataclass
class PrefixCache:
    """Everything needed to continue a joint sequence after its image prefix (one per subject).

    The prefix is the chat template up to where the instruction starts: system prompt and user-turn opener,
    then every reference image (begin marker, image tokens, end marker and, for InternVL, the newline the
    template puts after each image). None of it depends on the instruction.

    Args:
        hidden_states (`torch.Tensor` of shape `(num_hidden_states, prefix_length, hidden_size)`, or `None`):
            Every hidden state over the prefix; `None` once released (`SqueezePipeline.encode_subject` keeps
            only the aggregated image tokens and the KV cache).
        image_mask (`torch.BoolTensor` of shape `(prefix_length,)`): image-token positions.
        text_mask (`torch.BoolTensor` of shape `(prefix_length,)`): all False (no instruction text in here).
        input_ids (`torch.LongTensor` of shape `(prefix_length,)`): the prefix tokens.
        cache (`Cache`): the LLM's KV cache over exactly the prefix. `encode_instruction` extends it and crops
            it back, so it stays reusable; do not hand it to anything else.
        position_ids (`torch.LongTensor`): the positions used for the prefix, `(1, prefix_length)`
            (InternVL) or the 3-D M-RoPE positions `(3, 1, prefix_length)` (Qwen2.5-VL).
        image_grid_thw (`torch.LongTensor` of shape `(num_images, 3)`, *optional*): Qwen2.5-VL's patch grids,
            needed to recompute M-RoPE positions for a full sequence.
        num_images (`int`): number of reference images in the prefix.
    """

    hidden_states: torch.Tensor | None
    image_mask: torch.Tensor
    text_mask: torch.Tensor
    input_ids: torch.Tensor
    cache: Cache
    position_ids: torch.Tensor
    image_grid_thw: torch.Tensor | None
    num_images: int

    @property
    def prefix_length(self) -> int:
        return int(self.input_ids.shape[0])


class MLLMEncoder:
    r"""Prefill-only encoder of (reference images, instruction) for InternVL3-hf and Qwen2.5-VL.

    Which tokens are conditions (`MLLMEncoding.text_mask` / `image_mask`):
        - image tokens: the positions of the image placeholder token after expansion;
        - text tokens: the instruction's own tokens. The instruction is tokenized on its own (with special
          tokens split, so prompt text can never inject image or role tokens) and spliced between the
          template's prefix and suffix; cached and uncached paths build the identical sequence.
        - empty instruction (and `encode_null`): the token right after the (empty) instruction stands in — the
          `<|im_end|>` that closes the user turn in both families' templates. It is part of the real prompt,
          carries no content words, and in a causal LLM it is the first position that has read the whole
          (empty) user turn, so it is the model's own "nothing was asked" state; it keeps the aggregator from
          pooling over zero tokens.

    Args:
        model ([`PreTrainedModel`]):
            `InternVLForConditionalGeneration` / `Qwen2_5_VLForConditionalGeneration` (or their base models).
            Its dtype and device are used as they are.
        tokenizer ([`PreTrainedTokenizerBase`]): the checkpoint's tokenizer (chat template, special tokens).
        image_processor ([`BaseImageProcessor`]): the checkpoint's image processor; the slow PIL one works
            without torchvision.
        max_length (`int`, *optional*):
            Longest joint sequence allowed, in tokens. Defaults to (and is capped by) the model's context: the
            smaller of `tokenizer.model_max_length` and the LLM's `max_position_embeddings`.
        crop_to_patches (`bool`, *optional*):
            InternVL only: dynamic tiling, see `InternVLFamily`. `None` keeps the image processor's setting.
        max_pixels (`int`, *optional*):
            Qwen2.5-VL only: the most pixels a reference is resized to, see `Qwen25VLFamily`. `None` keeps
            the image processor's setting.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer,
        image_processor,
        max_length: int | None = None,
        *,
        crop_to_patches: bool | None = None,
        max_pixels: int | None = None,
    ):
        adapter = family_adapter(model.config.model_type)  # ValueError for a family without an adapter
        if crop_to_patches is not None and adapter.name != "internvl":
            raise ValueError(f"`crop_to_patches` is an InternVL option; this MLLM is {adapter.name!r}.")
        if max_pixels is not None and adapter.name != "qwen2_5_vl":
            raise ValueError(f"`max_pixels` is a Qwen2.5-VL option; this MLLM is {adapter.name!r}.")
        options: dict[str, bool | int] = {}
        if crop_to_patches is not None:
            options["crop_to_patches"] = crop_to_patches
        if max_pixels is not None:
            options["max_pixels"] = max_pixels
        self.adapter: MLLMFamily = adapter(model, tokenizer, image_processor, **options)
        self.family: str = adapter.name
        self.model = model
        # The base model (no LM head): we need hidden states only; logits over a 150k vocabulary cost memory.
        self._backbone = model.model if hasattr(model, "lm_head") else model
        self.tokenizer = tokenizer
        self.image_processor = image_processor

        text_config = model.config.get_text_config()
        self.hidden_size: int = text_config.hidden_size
        self.num_hidden_states: int = text_config.num_hidden_layers + 1
        self.image_token_id: int = model.config.image_token_id

        limits = {"max_position_embeddings": text_config.max_position_embeddings}
        model_max_length = getattr(tokenizer, "model_max_length", None)
        if model_max_length is not None and model_max_length < _NO_LIMIT:
            limits["tokenizer.model_max_length"] = model_max_length
        if max_length is not None:
            limits["max_length"] = max_length
        self.max_length_source, self.max_length = min(limits.items(), key=lambda kv: kv[1])

        placeholder_id = tokenizer.convert_tokens_to_ids(self.adapter.image_placeholder)
        if placeholder_id != self.image_token_id:
            raise ValueError(
                f"The tokenizer's {self.adapter.image_placeholder} is id {placeholder_id} but the model's "
                f"image_token_id is {self.image_token_id}: they come from different checkpoints."
            )
        self._template_cache: dict[int, tuple[list[int], list[int]]] = {}

    # ----------------------------------------------------------------------------------------------------
    # Public API

    @torch.no_grad()
    def encode(self, images: list[Image.Image], instruction: str) -> MLLMEncoding:
        """Encode reference `images` followed by `instruction` in one full forward pass (no cache)."""
        image_inputs = self._preprocess_images(images)
        prefix_ids, suffix_ids = self._prefix_and_suffix_ids(image_inputs.tokens_per_image)
        instruction_ids = self._tokenize_instruction(instruction)
        self._check_length(len(prefix_ids), len(instruction_ids), len(suffix_ids))

        input_ids = torch.tensor(prefix_ids + instruction_ids + suffix_ids, dtype=torch.long)
        position_ids = self._position_ids(input_ids, image_inputs.image_grid_thw)
        hidden_states, _ = self._forward(input_ids, position_ids, image_inputs, cache=None)
        image_mask, text_mask = self._masks(input_ids, len(prefix_ids), len(instruction_ids))
        return MLLMEncoding(hidden_states, image_mask, text_mask, input_ids)

    @torch.no_grad()
    def encode_prefix(self, images: list[Image.Image]) -> PrefixCache:
        """Run the instruction-independent prefix (template opener + every reference image) once."""
        image_inputs = self._preprocess_images(images)
        prefix_ids, suffix_ids = self._prefix_and_suffix_ids(image_inputs.tokens_per_image)
        self._check_length(len(prefix_ids), 0, len(suffix_ids))

        input_ids = torch.tensor(prefix_ids, dtype=torch.long)
        position_ids = self._position_ids(input_ids, image_inputs.image_grid_thw)
        hidden_states, cache = self._forward(
            input_ids, position_ids, image_inputs, cache=None, use_cache=True
        )
        image_mask, _ = self._masks(input_ids, len(prefix_ids), 0)
        assert cache is not None, "_forward returns the cache with use_cache=True"
        return PrefixCache(
            hidden_states=hidden_states,
            image_mask=image_mask,
            text_mask=torch.zeros_like(image_mask),
            input_ids=input_ids,
            cache=cache,
            position_ids=position_ids,
            image_grid_thw=image_inputs.image_grid_thw,
            num_images=len(images),
        )

    @torch.no_grad()
    def encode_instruction(
        self, prefix: PrefixCache, instruction: str, include_prefix: bool = True
    ) -> MLLMEncoding:
        """Encode `instruction` on top of a cached `prefix`, running only the tokens after the prefix.

        Gives the same result as `encode(images, instruction)` for the prefix's images. The prefix's KV cache
        is cropped back to the prefix afterwards (also on error), so the next instruction can reuse it.
        With `include_prefix=False` the encoding covers only the positions after the prefix (no image
        positions): what the aggregator needs once the prefix's image tokens are aggregated, without copying
        the prefix's hidden states (layers x prefix tokens x width: ~170 MB per prompt for InternVL3-8B).
        """
        prefix_length = prefix.prefix_length
        if prefix.cache.get_seq_length() != prefix_length:
            raise RuntimeError(
                f"The prefix cache holds {prefix.cache.get_seq_length()} tokens but the prefix is "
                f"{prefix_length}; it was changed outside encode_instruction. Encode the prefix again."
            )
        _, suffix_ids = self._template_ids(prefix.num_images)
        instruction_ids = self._tokenize_instruction(instruction)
        self._check_length(prefix_length, len(instruction_ids), len(suffix_ids))

        new_ids = torch.tensor(instruction_ids + suffix_ids, dtype=torch.long)
        input_ids = torch.cat([prefix.input_ids, new_ids])
        # Positions are computed for the full sequence and sliced (Qwen: M-RoPE text positions continue from
        # the largest image position, not from the token count), never from the model's stored rope_deltas.
        position_ids = self._position_ids(input_ids, prefix.image_grid_thw)[..., prefix_length:]
        try:
            new_hidden_states, _ = self._forward(
                new_ids, position_ids, NO_IMAGES, cache=prefix.cache, use_cache=True
            )
        finally:
            grown = prefix.cache.get_seq_length() - prefix_length
            if grown > 0:
                prefix.cache.crop(-grown)  # transformers 5: a negative count of tokens to drop
        if prefix.cache.get_seq_length() != prefix_length:
            raise RuntimeError(
                "Could not restore the prefix KV cache (a sliding-window cache cannot be cropped)."
            )

        image_mask, text_mask = self._masks(input_ids, prefix_length, len(instruction_ids))
        if not include_prefix:
            after = slice(prefix_length, None)
            return MLLMEncoding(new_hidden_states, image_mask[after], text_mask[after], new_ids)
        if prefix.hidden_states is None:
            raise ValueError("The prefix's hidden states were released; pass include_prefix=False.")
        hidden_states = torch.cat([prefix.hidden_states, new_hidden_states], dim=1)
        return MLLMEncoding(hidden_states, image_mask, text_mask, input_ids)

    def check_fits(self, image_sizes: Sequence[tuple[int, int]], instructions: Sequence[str]) -> None:
        """Raise the `ValueError` of an instruction too long for the context, without running the model.

        Needs only the references' (width, height), upright: the image processor's patch count follows
        from the size alone, so a caller can check a whole manifest from image headers before it writes.
        """
        prefix_ids, suffix_ids = self._prefix_and_suffix_ids(
            [self.adapter.image_tokens(*size) for size in image_sizes]
        )
        for instruction in instructions:
            self._check_length(len(prefix_ids), len(self._tokenize_instruction(instruction)), len(suffix_ids))

    @torch.no_grad()
    def encode_null(self) -> MLLMEncoding:
        """The null condition: an empty instruction and no image.

        Its `text_mask` marks the stand-in token (the `<|im_end|>` closing the empty user turn), so it is
        never empty; the template scaffolding before it (Qwen's system prompt, role markers) is context only.
        """
        return self.encode([], "")

    # ----------------------------------------------------------------------------------------------------
    # Inputs

    def _preprocess_images(self, images: list[Image.Image]) -> ImageInputs:
        if not images:
            return NO_IMAGES
        return self.adapter.preprocess([image.convert("RGB") for image in images])

    def _template_ids(self, num_images: int) -> tuple[list[int], list[int]]:
        """Token ids of the chat template before and after the instruction, one placeholder per image."""
        if num_images not in self._template_cache:
            before, after = self._render_template(num_images)
            tokenize = self.tokenizer
            self._template_cache[num_images] = (
                tokenize(before, add_special_tokens=False)["input_ids"],
                tokenize(after, add_special_tokens=False)["input_ids"],
            )
        prefix, suffix = self._template_cache[num_images]
        return list(prefix), list(suffix)

    def _render_template(self, num_images: int) -> tuple[str, str]:
        content = [{"type": "image"} for _ in range(num_images)] + [
            {"type": "text", "text": _INSTRUCTION_SLOT}
        ]
        messages = [{"role": "user", "content": content}]
        placeholder = self.adapter.image_placeholder
        candidates: list[str | None] = [None] if getattr(self.tokenizer, "chat_template", None) else []
        candidates.append(self.adapter.chat_template)
        for chat_template in candidates:
            try:
                text = self.tokenizer.apply_chat_template(
                    messages, chat_template=chat_template, tokenize=False, add_generation_prompt=True
                )
            except Exception:  # a text-only template may choke on list content: use the family's own
                continue
            # Usable only if it places one placeholder per image, all before the instruction.
            if text.count(_INSTRUCTION_SLOT) == 1:
                before, after = text.split(_INSTRUCTION_SLOT)
                if before.count(placeholder) == num_images and placeholder not in after:
                    return before, after
        raise ValueError(f"Could not render a {self.family} chat template with {num_images} image(s).")

    def _prefix_and_suffix_ids(self, tokens_per_image: list[int]) -> tuple[list[int], list[int]]:
        """Template prefix with each image placeholder expanded as the family's processor does."""
        template_prefix, suffix = self._template_ids(len(tokens_per_image))
        image_token_counts = iter(tokens_per_image)
        prefix: list[int] = []
        for token_id in template_prefix:
            if token_id != self.image_token_id:
                prefix.append(token_id)
            else:
                prefix += self.adapter.expand_placeholder(next(image_token_counts))
        return prefix, suffix

    def _tokenize_instruction(self, instruction: str) -> list[int]:
        if not isinstance(instruction, str):
            raise TypeError(f"`instruction` must be a str, got {type(instruction).__name__}.")
        # split_special_tokens: a prompt that happens to contain "<IMG_CONTEXT>" or "<|im_end|>" stays text.
        return self.tokenizer(
            instruction, add_special_tokens=False, split_special_tokens=True, verbose=False
        )["input_ids"]

    def _check_length(self, prefix_length: int, instruction_length: int, suffix_length: int) -> None:
        total = prefix_length + instruction_length + suffix_length
        if total > self.max_length:
            raise ValueError(
                f"The instruction is {instruction_length} tokens; with the {prefix_length}-token image "
                f"prefix and {suffix_length} template tokens the sequence is {total} tokens, more than the "
                f"limit of {self.max_length} tokens ({self.max_length_source}). Shorten the instruction or "
                "use fewer or smaller reference images."
            )

    def _position_ids(self, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None) -> torch.Tensor:
        """Positions of `input_ids` as a full sequence: `(1, n)`, or Qwen2.5-VL's M-RoPE `(3, 1, n)`."""
        return self.adapter.position_ids(self._backbone, input_ids, image_grid_thw)

    def _masks(
        self, input_ids: torch.Tensor, instruction_start: int, instruction_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image_mask = input_ids == self.image_token_id
        text_mask = torch.zeros_like(image_mask)
        text_mask[instruction_start : instruction_start + instruction_length] = True
        if instruction_length == 0 and input_ids.shape[0] > instruction_start:
            # Empty instruction: the template token after it (`<|im_end|>`) stands in; see the class doc.
            text_mask[instruction_start] = True
        return image_mask, text_mask

    # ----------------------------------------------------------------------------------------------------
    # Model

    def _forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        image_inputs: ImageInputs,
        cache: Cache | None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, Cache | None]:
        device = self.model.device
        kwargs: dict[str, Any] = {}
        if image_inputs.pixel_values is not None:
            kwargs["pixel_values"] = image_inputs.pixel_values.to(device=device, dtype=self.model.dtype)
            if image_inputs.image_grid_thw is not None:
                kwargs["image_grid_thw"] = image_inputs.image_grid_thw.to(device)
        # Through the top-level module when there is one, so offload hooks on it (enable_model_cpu_offload)
        # see the call; logits_to_keep=1 keeps the unused LM head from computing a vocabulary per token.
        if self._backbone is not self.model:
            kwargs["logits_to_keep"] = 1
        outputs = self.model(
            input_ids=input_ids.unsqueeze(0).to(device),
            position_ids=position_ids.to(device),
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=True,
            return_dict=True,
            **kwargs,
        )
        hidden_states = torch.stack(outputs.hidden_states, dim=0)[:, 0]  # (num_hidden_states, seq, hidden)
        if hidden_states.shape[0] != self.num_hidden_states:
            raise RuntimeError(
                f"Expected {self.num_hidden_states} hidden states, got {hidden_states.shape[0]}."
            )
        return hidden_states, outputs.cache if use_cache else None
