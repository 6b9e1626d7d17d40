"""InternVL3-hf (`InternVLForConditionalGeneration`, LLM = Qwen2.5): 448-px tiles of 256 tokens each."""

from __future__ import annotations

import torch
from PIL import Image
from transformers import PreTrainedModel

from .family import ImageInputs, MLLMFamily

# The template InternVL3-hf's conversion script gives its processor.
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{'<|im_end|>\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif %}"
)


class InternVLFamily(MLLMFamily):
    """InternVL3-hf. Each image becomes ``<img>`` + ``<IMG_CONTEXT>`` × (256 · tiles) + ``</img>``.

    Args:
        crop_to_patches (`bool`, *optional*):
            Dynamic tiling (448-px tiles + a thumbnail, 256 tokens each). `None` keeps the image processor's
            own setting. `InternVLProcessor` turns it on for chat; off (one tile, 256 tokens per reference)
            keeps the DiT's condition sequence short.
    """

    name = "internvl"
    chat_template = INTERNVL_CHAT_TEMPLATE
    image_placeholder = "<IMG_CONTEXT>"

    def __init__(
        self, model: PreTrainedModel, tokenizer, image_processor, *, crop_to_patches: bool | None = None
    ):
        super().__init__(model, tokenizer, image_processor)
        self.crop_to_patches = crop_to_patches
        vision = model.config.vision_config
        grid = (vision.image_size[0] // vision.patch_size[0]) * (vision.image_size[1] // vision.patch_size[1])
        # Tokens per 448-px tile after pixel shuffle (256 for InternVL3): what `image_seq_length` says.
        self.tokens_per_tile = int(round(grid * model.config.downsample_ratio**2))
        self.image_start_id = tokenizer.convert_tokens_to_ids(
            getattr(tokenizer, "start_image_token", "<img>")
        )
        self.image_end_id = tokenizer.convert_tokens_to_ids(getattr(tokenizer, "end_image_token", "</img>"))

    def _tiling(self) -> dict[str, bool]:
        return {} if self.crop_to_patches is None else {"crop_to_patches": self.crop_to_patches}

    def preprocess(self, images: list[Image.Image]) -> ImageInputs:
        processed = self.image_processor(images=images, return_tensors="pt", **self._tiling())
        tokens = [self.tokens_per_tile * int(n) for n in processed["num_patches"]]
        return ImageInputs(processed["pixel_values"], None, tokens)

    def image_tokens(self, width: int, height: int) -> int:
        return self.tokens_per_tile * self.image_processor.get_number_of_image_patches(
            height, width, self._tiling()
        )

    def expand_placeholder(self, num_tokens: int) -> list[int]:
        return [self.image_start_id] + [self.image_token_id] * num_tokens + [self.image_end_id]

    def position_ids(
        self, backbone: PreTrainedModel, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None
    ) -> torch.Tensor:
        return torch.arange(input_ids.shape[0]).unsqueeze(0)  # (1, n)
