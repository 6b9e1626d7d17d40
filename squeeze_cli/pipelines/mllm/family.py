"""What differs between MLLM families, behind one small protocol, and the registry that finds a family's
adapter from its name (the manifest's `model.family`) or from a checkpoint's `config.model_type`.

An adapter knows its family's chat template and image placeholder, turns images into the model's pixel
inputs and a token count per image, expands each placeholder as the family's processor does, and computes
position ids. `MLLMEncoder` does everything else (templates, caching, masks) the same way for every family.
Adding a family: one module with an `MLLMFamily` subclass, one line in `params.FAMILY_ADAPTERS`, one test.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import PreTrainedModel

from squeeze_cli.params import FAMILY_ADAPTERS


@dataclass
class ImageInputs:
    """The model inputs of a list of images, and how many image tokens each becomes."""

    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    tokens_per_image: list[int]


NO_IMAGES = ImageInputs(None, None, [])


class MLLMFamily:
    """One MLLM family's conventions. Subclasses set the class attributes and implement the methods.

    Args:
        model ([`PreTrainedModel`]): the checkpoint (or its base model); its config is read, never changed.
        tokenizer: the checkpoint's tokenizer.
        image_processor: the checkpoint's image processor (the slow PIL one works without torchvision).
    """

    name: str  # the `model.family` value and the checkpoints' `config.model_type`
    chat_template: str  # used when the tokenizer has no template that can place images
    image_placeholder: str  # what the template emits once per image, before expansion

    def __init__(self, model: PreTrainedModel, tokenizer, image_processor):
        self.config = model.config
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token_id: int = model.config.image_token_id

    def preprocess(self, images: list[Image.Image]) -> ImageInputs:
        """Pixel inputs of RGB `images` and the number of image tokens of each."""
        raise NotImplementedError

    def image_tokens(self, width: int, height: int) -> int:
        """Image tokens of one upright image of this size, from its size alone (as `preprocess` counts)."""
        raise NotImplementedError

    def expand_placeholder(self, num_tokens: int) -> list[int]:
        """The token ids one image placeholder becomes (as the family's processor expands it)."""
        raise NotImplementedError

    def position_ids(
        self, backbone: PreTrainedModel, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None
    ) -> torch.Tensor:
        """Positions of `input_ids` (1-D) as one full sequence."""
        raise NotImplementedError


def family_names() -> tuple[str, ...]:
    return tuple(FAMILY_ADAPTERS)


def family_adapter(name: str) -> type[MLLMFamily]:
    """The adapter class of family `name`; an unknown family is a `ValueError`, never a fallback."""
    if name not in FAMILY_ADAPTERS:
        raise ValueError(f"Unsupported MLLM {name!r}; supported families: {', '.join(FAMILY_ADAPTERS)}.")
    module_name, _, class_name = FAMILY_ADAPTERS[name].partition(":")
    return getattr(importlib.import_module(module_name), class_name)
