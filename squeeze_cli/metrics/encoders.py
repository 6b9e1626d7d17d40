"""The metric models, loaded through transformers' `from_pretrained`, and their embeddings.

Imports torch and transformers: only `squeeze eval` (when something is not cached) and `gen`'s identity
gate come here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from PIL import Image

from squeeze_cli.errors import ModelLoadError
from squeeze_cli.metrics.protocol import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec

if TYPE_CHECKING:
    from transformers import CLIPModel, Dinov2Model, ViTModel


def resize_center_crop(image: Image.Image, resize: int, crop: int) -> torch.Tensor:
    """DINO's evaluation transform (its release's `eval_knn.py`): torchvision's `Resize(resize, BICUBIC)`,
    `CenterCrop(crop)`, `ToTensor()`, `Normalize(ImageNet)`, pixel for pixel without torchvision.

    torchvision truncates the long side (`int(resize * long / short)`) and rounds the crop's offset
    (`round((size - crop) / 2)`, half to even); both decide which pixels are seen, so both are copied.

    Returns:
        `torch.Tensor`: (3, crop, crop), float32.
    """
    width, height = image.size
    short, long = min(width, height), max(width, height)
    resized_long = int(resize * long / short)
    size = (resize, resized_long) if width <= height else (resized_long, resize)
    image = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    left, top = round((size[0] - crop) / 2), round((size[1] - crop) / 2)
    image = image.crop((left, top, left + crop, top + crop))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (pixels - mean) / std


@dataclass
class ImageEmbeddings:
    """L2-normalised embeddings of a batch: `global_` (B, D) and, for DINO, `patches` (B, N, D)."""

    global_: torch.Tensor
    patches: torch.Tensor | None = None


def _load_error(spec: EncoderSpec, error: Exception) -> ModelLoadError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ModelLoadError(
        f"cannot load the {spec.role} metric model {spec.model_id!r}: {reason}",
        "download it once with network access (`hf download " + spec.model_id + "`), or try the command "
        "without a download with --metrics tiny",
    )


class Encoder:
    """One metric model on one device.

    Args:
        spec (`EncoderSpec`): which model, and how images are prepared for it.
        device (`str`): `cuda`, `cpu`, ...
    """

    def __init__(self, spec: EncoderSpec, device: str = "cpu"):
        self.spec = spec
        self.device = torch.device(device)
        kwargs: dict[str, Any] = {"revision": spec.revision} if spec.revision else {}
        import transformers

        transformers.utils.logging.disable_progress_bar()  # eval's own bar is the one to watch
        self.model: CLIPModel | ViTModel | Dinov2Model
        try:
            if spec.role == "clip":
                from transformers import CLIPModel, CLIPProcessor

                self.processor = CLIPProcessor.from_pretrained(spec.model_id, **kwargs)
                self.model = CLIPModel.from_pretrained(spec.model_id, **kwargs)
            elif spec.role == "dino":
                from transformers import ViTModel

                # DINO's CLS token is the embedding; the pooler is not part of the checkpoint.
                if spec.layer_norm_eps is not None:  # the hub config's differs from the release's
                    kwargs["layer_norm_eps"] = spec.layer_norm_eps
                self.model = ViTModel.from_pretrained(spec.model_id, add_pooling_layer=False, **kwargs)
            elif spec.role == "dinov2":
                from transformers import Dinov2Model

                self.model = Dinov2Model.from_pretrained(spec.model_id, **kwargs)
            else:
                raise ValueError(f"unknown encoder role {spec.role!r}")
        except (OSError, ValueError, ImportError) as error:
            raise _load_error(spec, error) from error
        # transformers types `PreTrainedModel.to` through functools.wraps, which loses the bound `self`.
        self.model.to(self.device, dtype=torch.float32).eval()  # type: ignore[arg-type]

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image]) -> ImageEmbeddings:
        """Normalised embeddings of `images` (CLS token for DINO/DINOv2, projected embedding for CLIP)."""
        if self.spec.role == "clip":
            pixel_values = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
            clip = cast("CLIPModel", self.model)  # the role's model
            features = clip.get_image_features(pixel_values=pixel_values.to(self.device)).pooler_output
            return ImageEmbeddings(_normalise(features))
        resize, crop = self.spec.resize, self.spec.crop
        assert resize is not None and crop is not None  # the protocol sets both for DINO and DINOv2
        pixel_values = torch.stack([resize_center_crop(i, resize, crop) for i in images])
        hidden = self.model(pixel_values=pixel_values.to(self.device)).last_hidden_state  # (B, 1 + N, D)
        patches = _normalise(hidden[:, 1:]) if self.spec.role == "dino" else None
        return ImageEmbeddings(_normalise(hidden[:, 0]), patches)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Normalised CLIP text embeddings (B, D); CLIP's 77-token context, longer prompts truncated."""
        tokens = self.processor.tokenizer(
            list(texts), padding=True, truncation=True, max_length=77, return_tensors="pt"
        ).to(self.device)
        clip = cast("CLIPModel", self.model)  # texts are embedded by the CLIP encoder only
        return _normalise(clip.get_text_features(**tokens).pooler_output)


def _normalise(features: torch.Tensor) -> torch.Tensor:
    features = features.float()
    return features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
