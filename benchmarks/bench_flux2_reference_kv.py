"""FLUX.2 [klein] KV: the references' keys and values once per subject, side by side with diffusers' own KV
pipeline (once per call, in its first step) and with the references run through every step.

    python benchmarks/bench_flux2_reference_kv.py [--rounds 4] [--prompts 4] [--references 4] [--size-px 256]

One subject, `--prompts` prompts, one image each, batch 1, 4 steps, per round:

- squeeze-kv:   `Flux2KleinKVPipeline` as `squeeze gen` runs it: `encode_subject` (VAE + the references'
                keys and values) and `prepare_prompts` once, then every step on the image and text tokens;
- diffusers-kv: diffusers' `Flux2KleinKVPipeline`, one call per image (VAE, prompt and the references'
                first-step pass again in every call);
- every-step:   squeeze's `Flux2KleinPipeline` on the same weights: the reference tokens in every step (what
                FLUX.2 [klein] 4B and [dev] must do; other images, same cost as a model not trained for KV).

The weights are the tiny [klein] KV twin's with its transformer swapped for a small one (width 256: 4 heads
× 64, 2 double + 4 single blocks), so that transformer arithmetic, not Python, dominates. Ratios are of this
process's CPU time (the machine is shared), median (min–max) over the rounds after a warm-up; squeeze-kv's
and diffusers-kv's images are compared too.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from bench_micro import alternate, fmt, ratios, summary  # the script's own folder is on sys.path
from diffusers import Flux2KleinKVPipeline as DiffusersKV
from diffusers import Flux2Transformer2DModel
from PIL import Image

from squeeze_cli.pipelines.flux2 import Flux2KleinKVPipeline, Flux2KleinPipeline
from squeeze_cli.pipelines.tiny_pipelines import build_tiny_flux2_klein_components

PROMPTS = (
    "a dog on the beach",
    "a dog in the snow",
    "a dog in the jungle",
    "a dog on a sofa",
    "a purple dog",
)
STEPS = 4


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--references", type=int, default=4)
    parser.add_argument("--size-px", type=int, default=256)
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    components = build_tiny_flux2_klein_components(seed=0)
    text_width = components["text_encoder"].config.hidden_size
    torch.manual_seed(1)
    components["transformer"] = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=128,
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=64,
        num_attention_heads=4,
        joint_attention_dim=3 * text_width,
        axes_dims_rope=(16, 16, 16, 16),
        guidance_embeds=False,
    ).eval()
    kv = Flux2KleinKVPipeline(**components)  # sets the KV attention processors, shared by the three
    every_step = Flux2KleinPipeline(**components)
    reference = DiffusersKV(**components)
    for pipe in (kv, every_step, reference):
        pipe.set_progress_bar_config(disable=True)

    size = args.size_px
    rng = np.random.default_rng(0)
    references = [
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(args.references)
    ]
    prompts = list(PROMPTS[: args.prompts])
    common = {"height": size, "width": size, "num_inference_steps": STEPS, "output_type": "np"}
    images: dict[str, list[np.ndarray]] = {}

    def squeeze_way(pipe) -> list[np.ndarray]:
        pipe.__dict__.pop("_prompt_cache", None)  # each round pays for its prompts once, as a run does
        subject = pipe.encode_subject(references, reference_size=size)
        pipe.prepare_prompts(subject, prompts)
        generator = torch.Generator
        return [
            pipe([p], subject_condition=subject, generator=[generator().manual_seed(i)], **common).images[0]
            for i, p in enumerate(prompts)
        ]

    def diffusers_way() -> list[np.ndarray]:
        return [
            reference(
                prompt=p,
                image=references,
                generator=torch.Generator().manual_seed(i),
                max_sequence_length=kv.max_sequence_length,
                text_encoder_out_layers=kv.text_encoder_out_layers,
                **common,
            ).images[0]
            for i, p in enumerate(prompts)
        ]

    variants = {
        "squeeze-kv": lambda: images.__setitem__("squeeze-kv", squeeze_way(kv)),
        "diffusers-kv": lambda: images.__setitem__("diffusers-kv", diffusers_way()),
        "every-step": lambda: images.__setitem__("every-step", squeeze_way(every_step)),
    }
    cpu: dict[str, list[float]] = {}
    alternate(variants, args.rounds, cpu)
    per_image = {name: summary([t / len(prompts) for t in times]) for name, times in cpu.items()}
    difference = max(
        float(np.abs(a - b).max()) for a, b in zip(images["squeeze-kv"], images["diffusers-kv"], strict=True)
    )
    result = {
        "setup": {
            "prompts": len(prompts),
            "references": args.references,
            "size_px": size,
            "steps": STEPS,
            "rounds": args.rounds,
            "tokens": {"image": (size // 16) ** 2, "references": args.references * (size // 16) ** 2},
        },
        "cpu_s_per_image": {name: fmt(stats, " s") for name, stats in per_image.items()},
        "speed-up over diffusers-kv": fmt(ratios(cpu, "diffusers-kv", "squeeze-kv"), "x", digits=2),
        "speed-up over every-step": fmt(ratios(cpu, "every-step", "squeeze-kv"), "x", digits=2),
        "max |squeeze-kv - diffusers-kv| (0-1 pixels)": difference,
    }
    print(json.dumps(result, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
