"""The training objective: rectified-flow (velocity) loss on exactly the sequence `SqueezePipeline` denoises.

For a target latent x0 (packed 2×2 like inference), noise ε and a noise level σ ∈ (0, 1):

    x_σ = (1 − σ)·x0 + σ·ε,        v = ε − x0,        loss = Σ ‖v̂ − v‖² / (target tokens × channels)

v̂ is `SqueezePipeline.predict_velocity`, the transformer step `SqueezePipeline.__call__` runs too: the
aggregated MLLM condition as `encoder_hidden_states` (padded conditions masked), the packed latents with
FLUX's position ids, and in stage 2 the references' VAE tokens appended with their Kontext-style ids
(`_prepare_reference_tokens`), their output dropped. The loss is normalised per token over the whole
micro-batch, so every target token weighs the same whatever its sample's size.

σ is drawn logit-normal (σ = sigmoid(n), n ~ N(mean, std)) and then shifted like FLUX's sampler shifts its
schedule: σ' = e^μ / (e^μ + 1/σ − 1), μ linear in the target's token count (0.5 at 256 tokens, 1.15 at
4096, `squeeze_cli.pipelines.stages.calculate_shift`), so larger images train at higher noise, as they
are sampled.

Condition dropout replaces the MLLM condition by the pipeline's null condition — the aggregator applied to
`MLLMEncoder.encode_null()`, the same definition as `SqueezePipeline.encode_null_condition` — and/or leaves
the reference tokens out.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from squeeze_cli.pipelines.mllm import MLLMEncoding
from squeeze_cli.pipelines.squeeze import SqueezePipeline
from squeeze_cli.pipelines.stages import DEFAULT_SCHEDULER_CONFIG, calculate_shift, time_shift
from squeeze_cli.train.config import DropoutSpec, TimestepSpec
from squeeze_cli.train.models import TrainableModels

DROP_NONE, DROP_TEXT, DROP_REFERENCES, DROP_BOTH = "none", "text", "references", "both"


def resolution_mu(num_tokens: int, scheduler_config: dict | None = None) -> float:
    """FLUX's dynamic-shift μ for a target of `num_tokens` packed latent tokens."""
    config = {**DEFAULT_SCHEDULER_CONFIG, **dict(scheduler_config or {})}
    return calculate_shift(
        num_tokens,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )


def sample_sigmas(
    count: int,
    spec: TimestepSpec,
    num_tokens: int,
    generator: torch.Generator,
    scheduler_config: dict | None = None,
) -> torch.Tensor:
    """`count` noise levels: logit-normal, then FLUX's resolution-dependent shift (when enabled)."""
    normal = torch.randn(count, generator=generator, dtype=torch.float64) * spec.logit_std + spec.logit_mean
    sigmas = torch.sigmoid(normal).numpy()
    if spec.resolution_shift:
        config = {**DEFAULT_SCHEDULER_CONFIG, **dict(scheduler_config or {})}
        mu = resolution_mu(num_tokens, config)
        sigmas = time_shift(mu, sigmas, config.get("time_shift_type", "exponential"))
    # Keep σ strictly inside (0, 1): σ = 1 is pure noise with no information about x0 in x_σ.
    return torch.from_numpy(np.clip(np.asarray(sigmas, dtype=np.float64), 1e-5, 1 - 1e-5)).float()


def draw_dropout(count: int, spec: DropoutSpec, generator: torch.Generator) -> list[str]:
    """One of none / text / references / both per sample (mutually exclusive, `spec`'s probabilities)."""
    draws = torch.rand(count, generator=generator, dtype=torch.float64).tolist()
    out = []
    for u in draws:
        if u < spec.both:
            out.append(DROP_BOTH)
        elif u < spec.both + spec.text:
            out.append(DROP_TEXT)
        elif u < spec.both + spec.text + spec.references:
            out.append(DROP_REFERENCES)
        else:
            out.append(DROP_NONE)
    return out


@dataclass
class PreparedSample:
    """What the frozen models make of one sample: nothing here carries gradients."""

    id: str
    encoding: MLLMEncoding  # the MLLM's joint encoding of (references, instruction)
    target_latents: torch.Tensor  # (C, h, w), normalised like `SqueezePipeline._encode_vae_image`
    reference_latents: list[torch.Tensor]  # per reference (C, h', w'), as `encode_references` returns


def loss_on_batch(
    pipe: SqueezePipeline,
    models: TrainableModels,
    samples: Sequence[PreparedSample],
    drops: Sequence[str],
    sigmas: torch.Tensor,
    noise: Sequence[torch.Tensor],
    null_encoding: MLLMEncoding,
    *,
    use_references: bool,
    guidance: float,
) -> torch.Tensor:
    """The per-token velocity loss of one micro-batch (a scalar with gradients into the trained modules).

    Args:
        pipe: the pipeline whose packing, position ids and condition padding are used (its `transformer` and
            `aggregator` are the ones in `models`).
        models: the (unwrapped) `TrainableModels`: run this inside its `forward` (see `TrainableModels`).
        samples: the prepared samples, all with targets of one size.
        drops: per sample, the condition dropout drawn (`draw_dropout`).
        sigmas: per sample, its noise level.
        noise: per sample, packed Gaussian noise shaped like its packed target.
        null_encoding: `pipe.mllm_encoder.encode_null()`: the null condition's MLLM half.
        use_references: stage 2 (reference tokens in the image stream) or stage 1 (none).
        guidance: FLUX-dev's guidance-embedding input.
    """
    transformer = pipe.transformer
    device = next(p for p in models.parameters()).device
    dtype = transformer.dtype
    # Samples sharing a reference layout (shapes, so the image ids) run as one transformer call.
    groups: dict[tuple, list[int]] = defaultdict(list)
    for index, (sample, drop) in enumerate(zip(samples, drops, strict=True)):
        with_references = use_references and drop not in (DROP_REFERENCES, DROP_BOTH)
        layout = tuple(tuple(r.shape) for r in sample.reference_latents) if with_references else ()
        groups[layout].append(index)

    squared_error = torch.zeros((), device=device, dtype=torch.float32)
    num_values = 0
    for layout, members in groups.items():
        embeds, pooled = [], []
        for index in members:
            drop_text = drops[index] in (DROP_TEXT, DROP_BOTH)
            encoding = null_encoding if drop_text else samples[index].encoding
            e, p = models.aggregator(encoding)
            embeds.append(e.to(dtype))
            pooled.append(p.to(dtype))
        prompt_embeds, condition_mask = SqueezePipeline._pad_conditions(embeds)
        pooled_embeds = torch.stack(pooled)

        x0 = torch.stack([samples[i].target_latents for i in members]).to(device=device, dtype=torch.float32)
        batch, channels, height, width = x0.shape
        x0 = pipe._pack_latents(x0, batch, channels, height, width)
        eps = torch.stack([noise[i] for i in members]).to(device=device, dtype=torch.float32)
        sigma = sigmas[members].to(device=device, dtype=torch.float32)
        noisy = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * eps
        velocity = eps - x0
        image_ids = pipe._prepare_latent_image_ids(batch, height // 2, width // 2, device, dtype)
        num_target_tokens = noisy.shape[1]

        hidden_states = noisy.to(dtype)
        if layout:
            # Each sample its own references' tokens; only their ids, a function of the layout, are shared.
            prepared = [
                pipe._prepare_reference_tokens(samples[i].reference_latents, device, dtype) for i in members
            ]
            reference_tokens = torch.stack([tokens for tokens, _ in prepared])
            hidden_states = torch.cat([hidden_states, reference_tokens], 1)
            image_ids = torch.cat([image_ids, prepared[0][1]])
        guidance_tensor = (
            torch.full([batch], guidance, device=device, dtype=torch.float32)
            if transformer.config.guidance_embeds
            else None
        )
        prediction = pipe.predict_velocity(
            hidden_states,
            image_ids=image_ids,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_embeds,
            prompt_attention_mask=condition_mask,
            timestep=sigma.to(dtype),
            guidance=guidance_tensor,
            num_target_tokens=num_target_tokens,
            transformer=models.transformer,
        )
        squared_error = squared_error + (prediction.float() - velocity).pow(2).sum()
        num_values += velocity.numel()
    return squared_error / num_values


def noise_like_packed(target_latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise of a packed target's shape, drawn in the latent (C, h, w) layout then packed like
    `SqueezePipeline.prepare_latents` packs its starting noise."""
    channels, height, width = target_latents.shape
    noise = torch.randn(1, channels, height, width, generator=generator, dtype=torch.float32)
    return SqueezePipeline._pack_latents(noise, 1, channels, height, width)[0]


__all__ = [
    "DROP_BOTH",
    "DROP_NONE",
    "DROP_REFERENCES",
    "DROP_TEXT",
    "PreparedSample",
    "draw_dropout",
    "loss_on_batch",
    "noise_like_packed",
    "resolution_mu",
    "sample_sigmas",
]
