"""Tiny random MLLMs (InternVL3-hf and Qwen2.5-VL) in the real transformers classes, built offline.

Product code, not only test code: the offline `tiny` preset uses these. Everything here is exactly the real
layout — the real model classes, a real `Qwen2Tokenizer` (both families use it) with the family's special
tokens and chat template, and the family's slow (PIL) image processor — only small and random, so that the
same `from_pretrained` code path loads tiny and full-size checkpoints alike.

Save and load::

    model, tokenizer, image_processor = build_tiny_mllm("internvl", seed=0)
    model.save_pretrained(root / "mllm")
    tokenizer.save_pretrained(root / "tokenizer")
    image_processor.save_pretrained(root / "image_processor")

    model = AutoModelForImageTextToText.from_pretrained(root / "mllm")   # or the class itself
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    image_processor = GotOcr2ImageProcessorPil.from_pretrained(root / "image_processor")
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import lru_cache, partial

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    GotOcr2ImageProcessorPil,
    InternVLConfig,
    InternVLForConditionalGeneration,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLImageProcessorPil,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from squeeze_cli.params import FAMILY_ADAPTERS as FAMILIES

from .internvl import INTERNVL_CHAT_TEMPLATE
from .qwen2_5_vl import QWEN2_5_VL_CHAT_TEMPLATE

TINY_HIDDEN_SIZE = 32
TINY_NUM_LAYERS = 2
# Context of the tiny LLMs: long enough for a few references and a prompt, short enough that tests can
# exercise the "instruction too long" error cheaply.
TINY_MAX_POSITIONS = 512

# The `small` twin (benchmarks): hidden sizes in the hundreds and a few layers, so that model time, not
# Python, dominates a run on a CPU. Same classes and layout as `tiny`; only the sizes below differ.
SIZES = ("tiny", "small")
_SMALL_TEXT = {
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
}
_SMALL_VISION = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2}
_SMALL_TILE = 56  # InternVL tile side: 8×8 patches of 7 px → 16 image tokens per tile after pixel shuffle

# Deterministic training text for the tiny byte-level BPE: prompts like the ones the product sees.
_CORPUS = (
    "a photo of a dog on the beach",
    "a red backpack in the snow with a mountain in the background",
    "a cat wearing a santa hat, sitting on a sofa",
    "the teapot floating in an ocean of milk",
    "a {subject} {class} on top of a wooden table, in the jungle, in the city at night",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "Describe the image. A close-up shot, cube shaped, purple, shiny, wet, on the grass.",
)
_TOKENIZER_VOCAB_SIZE = 400  # byte alphabet (256) + merges; the special tokens come on top

# Qwen-family special tokens, in the order of the real vocabularies (ids follow the normal vocabulary).
_QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# InternVL3-hf adds its image markers to the Qwen2.5 vocabulary and names them in `extra_special_tokens`,
# which is where `InternVLProcessor` (and our encoder) look them up.
_INTERNVL_NAMED_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}


@lru_cache(maxsize=1)
def _byte_level_bpe() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """A small byte-level BPE (vocab, merges) trained on `_CORPUS`, with Qwen2's pre-tokenizer."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=_TOKENIZER_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    bpe = json.loads(tokenizer.to_str())["model"]
    merges = tuple(tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in bpe["merges"])
    return dict(bpe["vocab"]), merges


def build_tiny_tokenizer(family: str) -> Qwen2Tokenizer:
    """The family's tokenizer class (`Qwen2Tokenizer` for both) over a tiny byte-level BPE."""
    _check_family(family)
    vocab, merges = _byte_level_bpe()
    kwargs = {}
    if family == "internvl":
        kwargs["extra_special_tokens"] = dict(_INTERNVL_NAMED_TOKENS)
        chat_template = INTERNVL_CHAT_TEMPLATE
    else:
        chat_template = QWEN2_5_VL_CHAT_TEMPLATE
    tokenizer = Qwen2Tokenizer(
        vocab=dict(vocab),
        merges=list(merges),  # type: ignore[arg-type]  # list[str] to transformers; (a, b) pairs work too
        errors="replace",
        unk_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=TINY_MAX_POSITIONS,
        **kwargs,
    )
    tokenizer.add_tokens(
        [t for t in _QWEN_SPECIAL_TOKENS if t not in tokenizer.get_vocab()], special_tokens=True
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def build_tiny_image_processor(
    family: str, size: str = "tiny"
) -> GotOcr2ImageProcessorPil | Qwen2VLImageProcessorPil:
    """The family's slow (PIL + numpy, no torchvision) image processor, configured for tiny images."""
    _check_family(family)
    if size == "small":
        if family == "internvl":
            return GotOcr2ImageProcessorPil(
                size={"height": _SMALL_TILE, "width": _SMALL_TILE}, crop_to_patches=False, max_patches=4
            )
        # Up to 56×56 px → 7×7 merged tokens per reference.
        return Qwen2VLImageProcessorPil(
            size={"shortest_edge": 8 * 8, "longest_edge": _SMALL_TILE * _SMALL_TILE},
            patch_size=4,
            temporal_patch_size=2,
            merge_size=2,
        )
    if family == "internvl":
        # One 28×28 tile per image (no dynamic tiling) → 4×4 patches of 7 px → 2×2 tokens after pixel shuffle.
        return GotOcr2ImageProcessorPil(
            size={"height": 28, "width": 28}, crop_to_patches=False, max_patches=4
        )
    # Qwen2.5-VL resizes to a multiple of patch × merge (8 px) with a pixel budget: 8×8 … 24×24 px, i.e. 1 to
    # 9 image tokens per reference depending on its aspect ratio.
    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": 8 * 8, "longest_edge": 24 * 24},
        patch_size=4,
        temporal_patch_size=2,
        merge_size=2,
    )


def _text_config(vocab_size: int, tokenizer: Qwen2Tokenizer) -> dict:
    return {
        "vocab_size": vocab_size,
        "hidden_size": TINY_HIDDEN_SIZE,
        "intermediate_size": 64,
        "num_hidden_layers": TINY_NUM_LAYERS,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": TINY_MAX_POSITIONS,
        "rms_norm_eps": 1e-6,
        "bos_token_id": None,
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    }


def build_tiny_mllm(
    family: str, seed: int = 0, size: str = "tiny"
) -> tuple[PreTrainedModel, Qwen2Tokenizer, object]:
    """A tiny random MLLM of `family` ("internvl" or "qwen2_5_vl") with its tokenizer and image processor.

    Same seed → same weights (the caller's global RNG state is left untouched). Takes well under a second
    (`size="small"`, for benchmarks: hidden size 256, 4 layers, a few seconds).
    Returns `(model, tokenizer, image_processor)`, with the model in eval mode and float32.
    """
    _check_family(family)
    if size not in SIZES:
        raise ValueError(f"Unknown size {size!r}; expected one of {', '.join(SIZES)}.")
    small = size == "small"
    tokenizer = build_tiny_tokenizer(family)
    if small:
        tokenizer.model_max_length = _SMALL_TEXT["max_position_embeddings"]
    image_processor = build_tiny_image_processor(family, size)
    # Round the embedding table up so the special tokens fit (the real vocabularies are padded too).
    vocab_size = (len(tokenizer) + 63) // 64 * 64
    text_config = _text_config(vocab_size, tokenizer)
    if small:
        text_config.update(_SMALL_TEXT)

    # The model class and its config, paired for the type checker; built under the forked RNG below.
    build: Callable[[], PreTrainedModel]
    if family == "internvl":
        build = partial(
            InternVLForConditionalGeneration,
            InternVLConfig(
                vision_config={
                    "hidden_size": 16,
                    "intermediate_size": 32,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 2,
                    "image_size": [28, 28],
                    "patch_size": [7, 7],
                    **({**_SMALL_VISION, "image_size": [_SMALL_TILE] * 2} if small else {}),
                },
                text_config={"model_type": "qwen2", **text_config},
                image_token_id=_token_id(tokenizer, "<IMG_CONTEXT>"),
                # (tile / 7)² patches × downsample_ratio²: 16 × 0.25 = 4 (tiny), 64 × 0.25 = 16 (small)
                image_seq_length=16 if small else 4,
                downsample_ratio=0.5,
                tie_word_embeddings=True,
            ),
        )
    else:
        build = partial(
            Qwen2_5_VLForConditionalGeneration,
            Qwen2_5_VLConfig(
                vision_config={
                    "depth": 1,
                    "hidden_size": 16,
                    "intermediate_size": 32,
                    "num_heads": 2,
                    "patch_size": 4,
                    "spatial_merge_size": 2,
                    "temporal_patch_size": 2,
                    "window_size": 16,  # pixels: one 2×2 merged window
                    "out_hidden_size": text_config["hidden_size"],
                    "fullatt_block_indexes": [0],
                    **({"hidden_size": 128, "intermediate_size": 256, "depth": 2} if small else {}),
                },
                # head_dim 16 → 8 rotary frequencies split over (temporal, height, width); small: 64 → 32.
                text_config={
                    **text_config,
                    "rope_parameters": {
                        "rope_type": "default",
                        "mrope_section": [8, 12, 12] if small else [2, 3, 3],
                    },
                },
                image_token_id=_token_id(tokenizer, "<|image_pad|>"),
                video_token_id=_token_id(tokenizer, "<|video_pad|>"),
                vision_start_token_id=_token_id(tokenizer, "<|vision_start|>"),
                vision_end_token_id=_token_id(tokenizer, "<|vision_end|>"),
            ),
        )

    # Random init under a forked RNG so building a tiny model never perturbs the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    model.float().eval()  # float32 (`.float()`: type checkers misread transformers' wrapped `.to`)
    return model, tokenizer, image_processor


def _token_id(tokenizer: Qwen2Tokenizer, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(token_id, int):  # one token in, one id out: for the type checker
        raise TypeError(f"{token!r} has no single token id")
    return token_id


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"Unknown MLLM family {family!r}; expected one of {', '.join(FAMILIES)}.")
