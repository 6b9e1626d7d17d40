"""Tiny random SqueezePipeline checkpoints, written to disk in exactly the real layout.

Product code: the offline `tiny` preset and the tests load these through the same
`SqueezePipeline.from_pretrained` as the full-size checkpoints. The transformer, VAE and scheduler are
FLUX.1-dev's classes and configs shrunk (16 latent channels packed 2×2 into 64, 8× VAE downsampling, the
guidance embedding, FLUX-dev's scheduler config), so every shape rule of the real model holds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

from .aggregator import DualLayerAggregator
from .stages import DEFAULT_SCHEDULER_CONFIG

__all__ = ["build_small_pipeline", "build_tiny_components", "build_tiny_pipeline"]

TINY_JOINT_ATTENTION_DIM = 32
TINY_POOLED_PROJECTION_DIM = 32


# `small` (benchmarks): transformer width 256 (4 heads × 64), 2 double + 4 single blocks; VAE 32–64
# channels; aggregator width 128. Big enough that model forwards, not Python, dominate a CPU run.
_TRANSFORMER_SIZES = {
    "tiny": {
        "num_layers": 1,
        "num_single_layers": 1,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": TINY_JOINT_ATTENTION_DIM,
        "pooled_projection_dim": TINY_POOLED_PROJECTION_DIM,
        "axes_dims_rope": (4, 6, 6),  # sums to the head dim, like FLUX's (16, 56, 56) for 128
    },
    "small": {
        "num_layers": 2,
        "num_single_layers": 4,
        "attention_head_dim": 64,
        "num_attention_heads": 4,
        "joint_attention_dim": 256,
        "pooled_projection_dim": 128,
        "axes_dims_rope": (16, 24, 24),
    },
}
_VAE_SIZES = {
    "tiny": {"block_out_channels": (8, 8, 8, 8), "norm_num_groups": 4},
    "small": {"block_out_channels": (32, 32, 64, 64), "norm_num_groups": 8},
}
_AGGREGATOR_SIZES = {"tiny": {"width": 32, "num_heads": 2}, "small": {"width": 128, "num_heads": 4}}


def tiny_transformer(size: str = "tiny") -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels × 2×2 packing, as in FLUX
        guidance_embeds=True,
        **_TRANSFORMER_SIZES[size],
    )


def tiny_vae(size: str = "tiny") -> AutoencoderKL:
    # Four levels → 8× downsampling like FLUX's VAE; 16 latent channels; FLUX-dev's shift/scale.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=16,
        **_VAE_SIZES[size],
        sample_size=64,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def build_tiny_components(family: str = "internvl", seed: int = 0, size: str = "tiny") -> dict[str, Any]:
    """Tiny (or `size="small"`) random components of a SqueezePipeline (what `SqueezePipeline(**components)`
    takes)."""
    from .mllm.tiny import build_tiny_mllm

    mllm, tokenizer, image_processor = build_tiny_mllm(family, seed=seed, size=size)
    dims = _TRANSFORMER_SIZES[size]
    text_config = mllm.config.get_text_config()
    # Seed each component from its own offset so that changing one never changes the others, and leave
    # the caller's global RNG state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        aggregator = DualLayerAggregator(
            num_hidden_states=text_config.num_hidden_layers + 1,
            mllm_hidden_size=text_config.hidden_size,
            num_blocks=2,
            joint_attention_dim=dims["joint_attention_dim"],
            pooled_projection_dim=dims["pooled_projection_dim"],
            **_AGGREGATOR_SIZES[size],
        )
        torch.manual_seed(seed + 2)
        transformer = tiny_transformer(size)
        torch.manual_seed(seed + 3)
        vae = tiny_vae(size)
    scheduler = FlowMatchEulerDiscreteScheduler(**DEFAULT_SCHEDULER_CONFIG)
    return {
        "mllm": mllm,
        "tokenizer": tokenizer,
        "image_processor": image_processor,
        "aggregator": aggregator.eval(),
        "transformer": transformer.eval(),
        "vae": vae.eval(),
        "scheduler": scheduler,
    }


def build_tiny_pipeline(
    path: str | os.PathLike, family: str = "internvl", seed: int = 0, size: str = "tiny"
) -> Path:
    """Write a tiny random SqueezePipeline checkpoint to `path` and return it.

    The layout is `SqueezePipeline.save_pretrained`'s: `model_index.json` and one folder per component
    (`mllm/`, `tokenizer/`, `image_processor/`, `aggregator/`, `transformer/`, `vae/`, `scheduler/`).
    Deterministic from `seed`; takes about a second.

    Args:
        path: directory to write (created if missing).
        family: the MLLM family, `"internvl"` or `"qwen2_5_vl"`.
        seed: seed of every random weight.
        size: `"tiny"` (tests, the `tiny` recipe) or `"small"` (benchmarks; see `build_small_pipeline`).
    """
    from .squeeze import SqueezePipeline

    path = Path(path)
    pipeline = SqueezePipeline(**build_tiny_components(family, seed=seed, size=size))
    pipeline.save_pretrained(path)
    return path


def build_small_pipeline(path: str | os.PathLike, family: str = "internvl", seed: int = 0) -> Path:
    """Write the `small` random SqueezePipeline checkpoint (benchmarks) to `path` and return it.

    Same classes and layout as `build_tiny_pipeline`, with hidden sizes in the hundreds and a few layers
    (MLLM 256 wide × 4 layers, transformer 256 wide × 2 + 4 blocks, VAE 32–64 channels), so that on a CPU
    the model's forwards, not Python, take most of the time, as at full size.
    """
    return build_tiny_pipeline(path, family=family, seed=seed, size="small")
