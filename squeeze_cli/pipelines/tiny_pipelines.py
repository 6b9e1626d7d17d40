"""Tiny random FLUX.1 Kontext, Qwen-Image-Edit-Plus, FLUX.2 [klein] and FLUX.2 [dev] checkpoints, written to
disk in the real layout.

Product code: the `tiny-kontext`, `tiny-qwen-image-edit`, `tiny-flux2-klein` and `tiny-flux2-dev` recipes and
the tests load these through the same `from_pretrained` as the full-size checkpoints. Every component is the
real class with a shrunk config (`save_pretrained` of each, plus `model_index.json`), and the tokenizers are
real `CLIPTokenizer`, `T5Tokenizer`, `Qwen2Tokenizer` and byte-level BPE objects over vocabularies trained
here, in-process, on a few sentences.
"""

from __future__ import annotations

import json
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

from .stages import DEFAULT_SCHEDULER_CONFIG
from .tiny import tiny_transformer, tiny_vae

__all__ = [
    "build_tiny_flux2_dev",
    "build_tiny_flux2_klein",
    "build_tiny_flux2_klein_kv",
    "build_tiny_kontext",
    "build_tiny_qwen_image_edit",
    "build_tiny_qwen_image_edit_2511",
]

TINY_TEXT_WIDTH = 32  # T5 d_model = transformer joint_attention_dim; CLIP width = pooled_projection_dim
TINY_T5_MAX_LENGTH = 64  # the tiny T5's `max_sequence_length` (the real one reads 512)

_CORPUS = (
    "a photo of a dog on the beach",
    "a red backpack in the snow with a mountain in the background",
    "a cat wearing a santa hat, sitting on a sofa",
    "the teapot floating in an ocean of milk",
    "put the subject on top of a wooden table, in the jungle, in the city at night",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "Make the dog wear sunglasses; keep its identity. Change the background to a beach.",
)


# CLIP -------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _clip_vocabulary() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """A byte-level BPE with CLIP's `</w>` end-of-word marker, trained through CLIPTokenizer's own backend."""
    seed = CLIPTokenizer(vocab={"<|startoftext|>": 0, "<|endoftext|>": 1}, merges=[])
    backend = Tokenizer.from_str(seed.backend_tokenizer.to_str())
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        end_of_word_suffix="</w>",
        min_frequency=1,
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS, trainer)
    bpe = json.loads(backend.to_str())["model"]
    merges = tuple(tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in bpe["merges"])
    vocab = dict(bpe["vocab"])
    # Every byte with and without the end-of-word marker, as in CLIP's vocabulary: no text is unknown.
    for symbol in pre_tokenizers.ByteLevel.alphabet():
        for token in (symbol, symbol + "</w>"):
            vocab.setdefault(token, len(vocab))
    return vocab, merges


def build_tiny_clip_tokenizer() -> CLIPTokenizer:
    vocab, merges = _clip_vocabulary()
    # transformers annotates `merges` as list[str]; its tokenizers backend takes (a, b) pairs as well.
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77)  # type: ignore[arg-type]


def build_tiny_clip_text_encoder(tokenizer: CLIPTokenizer, seed: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TINY_TEXT_WIDTH,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=TINY_TEXT_WIDTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPTextModel(config).eval()


# T5 ---------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _t5_vocabulary() -> tuple[tuple[str, float], ...]:
    """A Unigram vocabulary over T5's normalizer and Metaspace pre-tokenizer; pad, eos, unk first as in T5."""
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.Sequence([normalizers.Replace(Regex(" {2,}"), " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=200,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'-()"),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    return tuple((piece, float(score)) for piece, score in json.loads(tokenizer.to_str())["model"]["vocab"])


def build_tiny_t5_tokenizer() -> T5Tokenizer:
    return T5Tokenizer(vocab=list(_t5_vocabulary()), extra_ids=0, model_max_length=TINY_T5_MAX_LENGTH)


def build_tiny_t5_encoder(tokenizer: T5Tokenizer, seed: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=TINY_TEXT_WIDTH,
        d_kv=16,
        d_ff=64,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as FLUX's t5-v1_1-xxl
        is_encoder_decoder=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        # Not a declared T5Config field in transformers 5, but kept as a key of the config (config.json).
        decoder_start_token_id=tokenizer.pad_token_id,  # type: ignore[call-arg]
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return T5EncoderModel(config).eval()


# FLUX.1 Kontext ----------------------------------------------------------------------------------------


def build_tiny_kontext_components(seed: int = 0) -> dict[str, Any]:
    """Tiny random components of a `FluxKontextPipeline` (what its `__init__` takes)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    tokenizer = build_tiny_clip_tokenizer()
    tokenizer_2 = build_tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)
        transformer = tiny_transformer()
        torch.manual_seed(seed + 3)
        vae = tiny_vae()
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(**DEFAULT_SCHEDULER_CONFIG),
        "vae": vae.eval(),
        "text_encoder": build_tiny_clip_text_encoder(tokenizer, seed + 4),
        "tokenizer": tokenizer,
        "text_encoder_2": build_tiny_t5_encoder(tokenizer_2, seed + 5),
        "tokenizer_2": tokenizer_2,
        "transformer": transformer.eval(),
    }


def build_tiny_kontext(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random FLUX.1 Kontext checkpoint to `path` (`save_pretrained`'s layout) and return it.

    The folders are those of black-forest-labs/FLUX.1-Kontext-dev: `transformer/`, `vae/`, `text_encoder/`
    (CLIP), `tokenizer/`, `text_encoder_2/` (T5), `tokenizer_2/`, `scheduler/` and `model_index.json`.
    """
    from diffusers import FluxKontextPipeline

    path = Path(path)
    # Saved as diffusers' own class, so `model_index.json` reads exactly as the hub checkpoint's.
    FluxKontextPipeline(**build_tiny_kontext_components(seed)).save_pretrained(path)
    return path


# Qwen-Image-Edit-Plus -------------------------------------------------------------------------------

# Qwen-Image's scheduler config (exponential time shift with a fixed mu of log 3, shifted to end at 0.02).
QWEN_IMAGE_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": math.log(3),
    "max_image_seq_len": 8192,
    "max_shift": math.log(3),
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
}


def build_tiny_qwen_image_edit_components(seed: int = 0, zero_cond_t: bool = False) -> dict[str, Any]:
    """Tiny random components of a `QwenImageEditPlusPipeline`; `processor` is the Qwen2-VL image processor
    (see `squeeze_cli.pipelines.qwen_image_edit` for why not the full `Qwen2VLProcessor`). `zero_cond_t`
    is the transformer config switch of Qwen-Image-Edit-2511."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    from .mllm.tiny import TINY_HIDDEN_SIZE, build_tiny_mllm

    # The Qwen2.5-VL text encoder, tokenizer and image processor of the tiny squeeze MLLM: the same family.
    text_encoder, tokenizer, image_processor = build_tiny_mllm("qwen2_5_vl", seed=seed + 6)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 7)
        transformer = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=64,  # 16 latent channels packed 2×2
            out_channels=16,
            num_layers=2,  # First Block Cache needs a head and a tail block to run
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=TINY_HIDDEN_SIZE,
            axes_dims_rope=(4, 6, 6),  # sums to the head dim, like Qwen-Image's (16, 56, 56) for 128
            zero_cond_t=zero_cond_t,
        )
        torch.manual_seed(seed + 8)
        # Three downsamplings → 8× like the real VAE; 16 latent channels with its latents_mean/std.
        vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG),
        "vae": vae.eval(),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "processor": image_processor,
        "transformer": transformer.eval(),
    }


def build_tiny_qwen_image_edit(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random Qwen-Image-Edit-Plus checkpoint to `path` (`save_pretrained`'s layout).

    The folders are those of Qwen/Qwen-Image-Edit-2509: `transformer/`, `vae/`, `text_encoder/`
    (Qwen2.5-VL), `tokenizer/`, `processor/`, `scheduler/` and `model_index.json`; `processor/` holds the
    image processor's config only (the hub's also has the tokenizer and video processor files).
    """
    from .qwen_image_edit import QwenImageEditPlusPipeline

    path = Path(path)
    QwenImageEditPlusPipeline(**build_tiny_qwen_image_edit_components(seed)).save_pretrained(path)
    return path


def build_tiny_qwen_image_edit_2511(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random Qwen-Image-Edit-2511 checkpoint to `path`: 2509's layout and classes, with the
    transformer config's `zero_cond_t: true` as in Qwen/Qwen-Image-Edit-2511 (diffusers'
    `QwenImageTransformer2DModel` then modulates the reference tokens with timestep 0).
    """
    from .qwen_image_edit import QwenImageEditPlusPipeline

    path = Path(path)
    components = build_tiny_qwen_image_edit_components(seed, zero_cond_t=True)
    QwenImageEditPlusPipeline(**components).save_pretrained(path)
    return path


# FLUX.2 [klein] and FLUX.2 [dev] ------------------------------------------------------------------------

# Width and depth of both tiny text encoders. FLUX.2 reads the hidden states after each quarter of the
# encoder's layers (`flux2.text_encoder_out_layers`): layers 1, 2 and 3 of these 4, stacked into 3 × 32.
TINY_FLUX2_TEXT_WIDTH = 32
TINY_FLUX2_TEXT_LAYERS = 4

# The part of Qwen3's chat template a one-message conversation without tools goes through, with its
# `enable_thinking=False` branch (the empty think block FLUX.2 [klein] encodes after the prompt).
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)

# The text-only part of Mistral-Small-3.1's chat template (FLUX.2 [dev]'s text encoder): a system prompt and
# user turns, their content given as a string or as a list of text blocks.
MISTRAL3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}"
    "{%- else %}{%- set text = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + text + '[/INST]' }}"
    "{%- else %}{{- text + eos_token }}{%- endif %}"
    "{%- endfor %}"
)
_MISTRAL3_CONTROL_TOKENS = (
    "[INST]",
    "[/INST]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[IMG]",
    "[IMG_BREAK]",
    "[IMG_END]",
)

# FLUX.2's image path shrunk: 32 latent channels patchified 2×2 into the transformer's 128 (as the real
# model), 8× VAE downsampling from four levels; one double and one single block of 2 heads × 16.
_TINY_FLUX2_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 128,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 3 * TINY_FLUX2_TEXT_WIDTH,
    "timestep_guidance_channels": 256,
    "axes_dims_rope": (4, 4, 4, 4),  # (T, H, W, L), like FLUX.2's (32, 32, 32, 32) for 128
}


def build_tiny_qwen3_tokenizer() -> Any:
    """Qwen3's tokenizer class (`Qwen2Tokenizer`) over the tiny byte-level BPE, with Qwen3's think tokens."""
    from .mllm.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer("qwen2_5_vl")
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def build_tiny_mistral3_tokenizer() -> Any:
    """A byte-level BPE tokenizer (as Mistral's Tekken) with Mistral's control tokens and chat template."""
    from transformers import PreTrainedTokenizerFast

    from .mllm.tiny import build_tiny_tokenizer

    backend = Tokenizer.from_str(build_tiny_tokenizer("qwen2_5_vl").backend_tokenizer.to_str())
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=512,
    )
    tokenizer.add_tokens(list(_MISTRAL3_CONTROL_TOKENS), special_tokens=True)
    tokenizer.chat_template = MISTRAL3_CHAT_TEMPLATE
    return tokenizer


def _tiny_flux2_vae() -> Any:
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=32,
        norm_num_groups=4,
        sample_size=64,
    )
    # Random batch-norm statistics (a fresh BatchNorm has mean 0, variance 1), so that a latent that skipped
    # FLUX.2's normalisation would show.
    vae.bn.running_mean.copy_(0.1 * torch.randn_like(vae.bn.running_mean))
    vae.bn.running_var.copy_(1 + 0.5 * torch.rand_like(vae.bn.running_var))
    return vae.eval()


def build_tiny_flux2_klein_components(seed: int = 0) -> dict[str, Any]:
    """Tiny random components of a `Flux2KleinPipeline` (step-distilled, as FLUX.2 [klein] 4B)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = build_tiny_qwen3_tokenizer()
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=TINY_FLUX2_TEXT_WIDTH,
        intermediate_size=64,
        num_hidden_layers=TINY_FLUX2_TEXT_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=True,  # as Qwen3-4B
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 9)
        text_encoder = Qwen3ForCausalLM(config).eval()
        torch.manual_seed(seed + 10)
        transformer = Flux2Transformer2DModel(**_TINY_FLUX2_TRANSFORMER, guidance_embeds=False).eval()
        torch.manual_seed(seed + 11)
        vae = _tiny_flux2_vae()
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(**DEFAULT_SCHEDULER_CONFIG),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "transformer": transformer,
        "is_distilled": True,
    }


def build_tiny_flux2_klein(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random FLUX.2 [klein] checkpoint to `path` (`save_pretrained`'s layout) and return it.

    The folders are those of black-forest-labs/FLUX.2-klein-4B: `transformer/`, `vae/`, `text_encoder/`
    (Qwen3), `tokenizer/`, `scheduler/` and `model_index.json` (with `is_distilled: true`).
    """
    from diffusers import Flux2KleinPipeline

    path = Path(path)
    Flux2KleinPipeline(**build_tiny_flux2_klein_components(seed)).save_pretrained(path)
    return path


def build_tiny_flux2_klein_kv(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random FLUX.2 [klein] KV checkpoint to `path` and return it: the [klein] twin's components
    under `Flux2KleinKVPipeline` (the layout of black-forest-labs/FLUX.2-klein-9b-kv), whose reference tokens
    attend only to themselves; the architecture is the same, the attention processors differ."""
    from diffusers import Flux2KleinKVPipeline

    path = Path(path)
    Flux2KleinKVPipeline(**build_tiny_flux2_klein_components(seed)).save_pretrained(path)
    return path


def build_tiny_flux2_dev_components(seed: int = 0) -> dict[str, Any]:
    """Tiny random components of a `Flux2Pipeline`; `tokenizer` is the tokenizer of the checkpoint's
    `PixtralProcessor` (see `squeeze_cli.pipelines.flux2.Flux2DevPipeline.from_pretrained` for why)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    tokenizer = build_tiny_mistral3_tokenizer()
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = Mistral3Config(
        text_config={
            "model_type": "mistral",
            "vocab_size": len(tokenizer),
            "hidden_size": TINY_FLUX2_TEXT_WIDTH,
            "intermediate_size": 64,
            "num_hidden_layers": TINY_FLUX2_TEXT_LAYERS,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "max_position_embeddings": 512,
            "rope_theta": 1000000000.0,  # Mistral-Small-3.1's
            "sliding_window": None,
            **special,
        },
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "head_dim": 8,
            "image_size": 64,
            "patch_size": 8,
        },
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        **special,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 12)
        text_encoder = Mistral3ForConditionalGeneration(config).eval()
        torch.manual_seed(seed + 13)
        transformer = Flux2Transformer2DModel(**_TINY_FLUX2_TRANSFORMER, guidance_embeds=True).eval()
        torch.manual_seed(seed + 14)
        vae = _tiny_flux2_vae()
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(**DEFAULT_SCHEDULER_CONFIG),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "transformer": transformer,
    }


def build_tiny_flux2_dev(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random FLUX.2 [dev] checkpoint to `path` (`save_pretrained`'s layout) and return it.

    The folders are those of black-forest-labs/FLUX.2-dev: `transformer/`, `vae/`, `text_encoder/`
    (Mistral 3), `tokenizer/` (a `PixtralProcessor`: the tokenizer, the Pixtral image processor's config and
    `processor_config.json`), `scheduler/` and `model_index.json`.
    """
    from diffusers import Flux2Pipeline
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    path = Path(path)
    Flux2Pipeline(**build_tiny_flux2_dev_components(seed)).save_pretrained(path)
    # The processor's other files, written without the class itself (it needs torchvision to be built).
    PixtralImageProcessorPil(patch_size=8).save_pretrained(path / "tokenizer")
    processor = {"processor_class": "PixtralProcessor", "patch_size": 8, "spatial_merge_size": 2}
    (path / "tokenizer" / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    index_path = path / "model_index.json"
    index = json.loads(index_path.read_text())
    index["tokenizer"] = ["transformers", "PixtralProcessor"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return path
