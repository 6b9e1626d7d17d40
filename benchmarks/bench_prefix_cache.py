"""Prefix cache speed-up: encode K prompts for one subject with and without the per-subject prefix cache.

    python benchmarks/bench_prefix_cache.py                          # tiny models, both families
    python benchmarks/bench_prefix_cache.py --prompts 25 --references 3 --image-side 112 --config \
        '{"hidden_size": 256, "num_hidden_layers": 8, "intermediate_size": 704, "num_attention_heads": 4}'

`--config` overrides the tiny LLM's text config (a bigger random model, same classes); `--image-side` sets the
reference size (Qwen2.5-VL gets more image tokens from bigger images; InternVL then tiles them). Prints the
median wall time of each way over `--repeats` runs and their ratio. Uncached = `encode` per prompt; cached =
one `encode_prefix` + `encode_instruction` per prompt (the prefix cost is included).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from PIL import Image
from timing import median_seconds  # benchmarks/timing.py: the script's own folder is on sys.path

from squeeze_cli.pipelines.mllm import FAMILIES, MLLMEncoder
from squeeze_cli.pipelines.mllm.tiny import build_tiny_mllm

PROMPTS = (
    "a {} on the beach",
    "a {} in the jungle",
    "a {} in the snow",
    "a {} on top of a wooden floor",
    "a {} with a city in the background",
    "a {} floating on top of water",
    "a purple {}",
    "a {} on top of a mirror",
)


def _bigger(family: str, overrides: dict, seed: int):
    model, tokenizer, image_processor = build_tiny_mllm(family, seed=seed)
    if not overrides:
        return model, tokenizer, image_processor
    config = model.config
    text = config.get_text_config()
    for key, value in overrides.items():
        setattr(text, key, value)
    text.layer_types = ["full_attention"] * text.num_hidden_layers
    if family == "qwen2_5_vl":
        config.vision_config.out_hidden_size = text.hidden_size
        half = text.hidden_size // text.num_attention_heads // 2
        spatial = 3 * half // 8
        text.rope_parameters["mrope_section"] = [half - 2 * spatial, spatial, spatial]
    text.num_key_value_heads = min(text.num_key_value_heads, text.num_attention_heads)
    torch.manual_seed(seed)
    model = type(model)(config).to(torch.float32).eval()
    return model, tokenizer, image_processor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per subject (K)")
    parser.add_argument("--references", type=int, default=2)
    parser.add_argument(
        "--image-side", type=int, default=28, help="reference images are square, this many px"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--config", type=json.loads, default={}, help="JSON overrides of the LLM text config")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    references = [
        Image.fromarray(rng.integers(0, 256, (args.image_side, args.image_side, 3), dtype=np.uint8))
        for _ in range(args.references)
    ]
    prompts = [PROMPTS[i % len(PROMPTS)].format("backpack") for i in range(args.prompts)]

    for family in args.families:
        model, tokenizer, image_processor = _bigger(family, args.config, seed=0)
        crop = None
        if family == "qwen2_5_vl":
            side = max(8, args.image_side // 8 * 8)
            image_processor.size = {"shortest_edge": 64, "longest_edge": side * side}
        elif args.image_side > 28:
            crop = True
            image_processor.max_patches = 12
        encoder = MLLMEncoder(model, tokenizer, image_processor, crop_to_patches=crop)

        def uncached(encoder=encoder):
            for prompt in prompts:
                encoder.encode(references, prompt)

        def cached(encoder=encoder):
            prefix = encoder.encode_prefix(references)
            for prompt in prompts:
                encoder.encode_instruction(prefix, prompt)

        sample = encoder.encode(references, prompts[0])
        prefix_length = encoder.encode_prefix(references).prefix_length
        t_uncached = median_seconds(uncached, args.repeats)
        t_cached = median_seconds(cached, args.repeats)
        print(
            f"{family:11s} K={args.prompts} refs={args.references} seq={sample.input_ids.shape[0]} "
            f"(prefix {prefix_length}, image tokens {int(sample.image_mask.sum())}) "
            f"uncached {t_uncached * 1e3:8.1f} ms  cached {t_cached * 1e3:8.1f} ms  "
            f"speed-up x{t_uncached / t_cached:.2f}"
        )


if __name__ == "__main__":
    main()
