"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): 14-px patches merged 2×2, M-RoPE positions."""

from __future__ import annotations

import torch
from PIL import Image
from transformers import PreTrainedModel

from .family import ImageInputs, MLLMFamily

# Qwen2.5-VL-Instruct's template (default system prompt, no newline between image and text).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class Qwen25VLFamily(MLLMFamily):
    """Qwen2.5-VL. Each image becomes ``<|image_pad|>`` × (t·h·w / merge²) between the template's own
    ``<|vision_start|>`` / ``<|vision_end|>``; text positions continue after the largest image position."""

    name = "qwen2_5_vl"
    chat_template = QWEN2_5_VL_CHAT_TEMPLATE
    image_placeholder = "<|image_pad|>"

    def __init__(self, model: PreTrainedModel, tokenizer, image_processor, *, max_pixels: int | None = None):
        super().__init__(model, tokenizer, image_processor)
        self.merge_length = image_processor.merge_size**2
        # `max_pixels` caps the pixels an image is resized to (28×28 per token): 448² → 256 tokens.
        # The processor's `size` (not `min_pixels`/`max_pixels`, deprecated in transformers 5) for both the
        # resize and the token count, so the two cannot disagree.
        self._sizing: dict[str, dict[str, int]] = {}
        if max_pixels is not None:
            min_pixels = min(image_processor.size["shortest_edge"], max_pixels)
            self._sizing = {"size": {"shortest_edge": min_pixels, "longest_edge": max_pixels}}

    def preprocess(self, images: list[Image.Image]) -> ImageInputs:
        processed = self.image_processor(images=images, return_tensors="pt", **self._sizing)
        grid_thw = processed["image_grid_thw"]
        tokens = [int(thw.prod()) // self.merge_length for thw in grid_thw]
        return ImageInputs(processed["pixel_values"], grid_thw, tokens)

    def image_tokens(self, width: int, height: int) -> int:
        patches = self.image_processor.get_number_of_image_patches(height, width, self._sizing)
        return patches // self.merge_length

    def expand_placeholder(self, num_tokens: int) -> list[int]:
        return [self.image_token_id] * num_tokens

    def position_ids(
        self, backbone: PreTrainedModel, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None
    ) -> torch.Tensor:
        return mrope_positions(backbone, input_ids, self.image_token_id, image_grid_thw)


def mrope_positions(
    backbone: PreTrainedModel,
    input_ids: torch.Tensor,
    image_token_id: int,
    image_grid_thw: torch.Tensor | None,
) -> torch.Tensor:
    """Qwen2.5-VL's M-RoPE positions (3, 1, n) of one whole sequence: image tokens at their (t, h, w) grid
    positions, text after the largest one (so a text's positions depend on the images before it)."""
    mm_token_type_ids = (input_ids == image_token_id).to(torch.int32).unsqueeze(0)
    # A Qwen2_5_VLModel; typed as a PreTrainedModel, whose nn.Module __getattr__ hides get_rope_index.
    position_ids, _ = backbone.get_rope_index(  # type: ignore[operator]
        input_ids.unsqueeze(0), mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw
    )
    return position_ids
