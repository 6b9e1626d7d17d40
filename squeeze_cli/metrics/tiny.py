"""Tiny RANDOM-weight metric checkpoints (DINO ViT, CLIP, DINOv2), built offline in the real layout.

`squeeze eval --metrics tiny` and the tests load them through the same `from_pretrained` code as the
real models; their numbers mean nothing. Built once into the squeeze cache, like the tiny pipeline.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from squeeze_cli.loading import build_into_cache, cache_dir

if TYPE_CHECKING:
    from transformers import ImageProcessingMixin, PreTrainedModel, ProcessorMixin

# Bump when a builder changes what it writes, so old caches are not reused.
TINY_METRIC_FORMAT = 1
TINY_METRIC_MODELS = ("dino", "clip", "dinov2")

# Prompts like the ones CLIP-T sees, for the tiny CLIP tokenizer's BPE.
_CORPUS = (
    "a dog in the jungle",
    "a backpack in the snow",
    "a teapot on the beach with a city in the background",
    "a red cat wearing a santa hat on top of a purple rug in a forest",
    "a cube shaped can floating in an ocean of milk, shiny, wet",
    "The quick brown fox jumps over the lazy dog. 0123456789",
)


def _build_clip_tokenizer():
    """`CLIPTokenizer` over a small byte-level BPE trained here with CLIP's own normaliser and splitter."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    bos, eos = "<|startoftext|>", "<|endoftext|>"
    tokenizer = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[bos, eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        min_frequency=1,
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    import json

    bpe = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in bpe["merges"]]
    # transformers annotates `merges` as list[str]; its tokenizers backend takes (a, b) pairs as well.
    return CLIPTokenizer(vocab=dict(bpe["vocab"]), merges=merges, model_max_length=77)  # type: ignore[arg-type]


def build_tiny_metric_model(name: str, path: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny random `name` checkpoint (`dino`, `clip` or `dinov2`) to `path`, in the hub layout.

    Returns:
        `Path`: `path`.
    """
    import torch
    from transformers import (
        BitImageProcessorPil,
        CLIPConfig,
        CLIPImageProcessorPil,
        CLIPModel,
        CLIPProcessor,
        Dinov2Config,
        Dinov2Model,
        ViTConfig,
        ViTImageProcessorPil,
        ViTModel,
    )
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    # ImageNet's statistics, the values of `protocol.IMAGENET_MEAN` and `IMAGENET_STD` (a test checks the
    # processors agree): from transformers, since `protocol` imports this module and not the reverse.
    mean, std = tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    path = Path(path)
    torch.manual_seed(seed)
    small: dict[str, Any] = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    model: PreTrainedModel
    processor: ImageProcessingMixin | ProcessorMixin
    if name == "dino":
        model = ViTModel(ViTConfig(image_size=32, patch_size=8, **small), add_pooling_layer=False)
        processor = ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=mean, image_std=std)
    elif name == "dinov2":
        model = Dinov2Model(Dinov2Config(image_size=28, patch_size=7, **small))
        processor = BitImageProcessorPil(
            size={"shortest_edge": 36},
            crop_size={"height": 28, "width": 28},
            image_mean=mean,
            image_std=std,
        )
    elif name == "clip":
        tokenizer = _build_clip_tokenizer()
        config = CLIPConfig(
            text_config=dict(
                vocab_size=len(tokenizer),
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **small,
            ),
            vision_config=dict(image_size=32, patch_size=8, **small),
            projection_dim=16,
        )
        model = CLIPModel(config)
        processor = CLIPProcessor(
            image_processor=CLIPImageProcessorPil(
                size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
            ),
            tokenizer=tokenizer,
        )
    else:
        raise ValueError(f"unknown tiny metric model {name!r}; known: {', '.join(TINY_METRIC_MODELS)}")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def ensure_tiny_metric_checkpoint(name: str) -> Path:
    """Build the tiny `name` checkpoint once into the squeeze cache, as the tiny pipeline
    (`squeeze_cli.loading.build_into_cache`)."""
    target = cache_dir() / f"tiny-metric-{name}-v{TINY_METRIC_FORMAT}"
    return build_into_cache(target, "config.json", lambda folder: build_tiny_metric_model(name, folder))
