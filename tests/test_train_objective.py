"""The training objective on the tiny model: stage 1 leaves reference tokens out, stage 2 uses them, dropout
swaps in the null condition, timesteps follow FLUX's resolution shift."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from squeeze_cli.train.config import DropoutSpec, TimestepSpec, load_config
from squeeze_cli.train.data import load_data
from squeeze_cli.train.loop import Trainer, group_learning_rate, stage_of
from squeeze_cli.train.objective import (
    DROP_NONE,
    DROP_REFERENCES,
    DROP_TEXT,
    PreparedSample,
    draw_dropout,
    loss_on_batch,
    noise_like_packed,
    resolution_mu,
    sample_sigmas,
)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    out = tmp_path_factory.mktemp("objective") / "run"
    loaded = load_config("tiny", [f"output_dir={out}"])
    trainer = Trainer(loaded, load_data(loaded))
    trainer._setup()
    return trainer


def _loss(trainer: Trainer, samples, drops, use_references: bool) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    noise = [noise_like_packed(s.target_latents, generator) for s in samples]
    sigmas = torch.full((len(samples),), 0.5)
    with torch.no_grad():
        return loss_on_batch(
            trainer.pipe,
            trainer.trainable,
            samples,
            drops,
            sigmas,
            noise,
            trainer.null_encoding,
            use_references=use_references,
            guidance=1.0,
        )


def test_reference_tokens_enter_in_stage_two_only(trainer: Trainer) -> None:
    sample = trainer.prepare_sample(0, (64, 64))
    other = trainer.prepare_sample(2, (64, 64))  # the other subject's reference latents
    swapped = type(sample)(sample.id, sample.encoding, sample.target_latents, other.reference_latents)
    # Stage 1: the references' VAE tokens are not in the sequence, so swapping them changes nothing.
    assert torch.equal(
        _loss(trainer, [sample], [DROP_NONE], False), _loss(trainer, [swapped], [DROP_NONE], False)
    )
    # Stage 2: they are, unless dropped.
    assert not torch.equal(
        _loss(trainer, [sample], [DROP_NONE], True), _loss(trainer, [swapped], [DROP_NONE], True)
    )
    assert torch.equal(
        _loss(trainer, [sample], [DROP_REFERENCES], True), _loss(trainer, [swapped], [DROP_REFERENCES], True)
    )
    assert torch.equal(
        _loss(trainer, [sample], [DROP_REFERENCES], True), _loss(trainer, [sample], [DROP_NONE], False)
    )


def test_text_dropout_is_the_null_condition(trainer: Trainer) -> None:
    first, second = trainer.prepare_sample(0, (64, 64)), trainer.prepare_sample(3, (64, 64))
    mixed = type(first)(first.id, second.encoding, first.target_latents, first.reference_latents)
    # With the text dropped, whose MLLM encoding the sample had no longer matters.
    assert torch.equal(
        _loss(trainer, [first], [DROP_TEXT], False), _loss(trainer, [mixed], [DROP_TEXT], False)
    )
    assert not torch.equal(
        _loss(trainer, [first], [DROP_NONE], False), _loss(trainer, [mixed], [DROP_NONE], False)
    )


def test_loss_is_normalised_per_token(trainer: Trainer) -> None:
    sample = trainer.prepare_sample(0, (64, 64))
    noise = noise_like_packed(sample.target_latents, torch.Generator().manual_seed(0))

    def loss(count: int) -> torch.Tensor:
        with torch.no_grad():
            return loss_on_batch(
                trainer.pipe,
                trainer.trainable,
                [sample] * count,
                [DROP_NONE] * count,
                torch.full((count,), 0.5),
                [noise] * count,
                trainer.null_encoding,
                use_references=False,
                guidance=1.0,
            )

    # The same sample twice has the same per-token loss as once: a mean over tokens, not a sum.
    assert torch.allclose(loss(1), loss(2), rtol=1e-5)


@pytest.mark.parametrize("use_references", [False, True], ids=["stage1", "stage2"])
def test_a_batch_of_two_subjects_trains_like_each_alone(trainer: Trainer, use_references: bool) -> None:
    """Every sample of a micro-batch is conditioned on its own references, also when the references of
    different subjects share a shape (they are batched together then)."""
    red, blue = trainer.prepare_sample(0, (64, 64)), trainer.prepare_sample(2, (64, 64))
    assert [r.shape for r in red.reference_latents] == [r.shape for r in blue.reference_latents]
    assert not torch.equal(red.reference_latents[0], blue.reference_latents[0])
    generator = torch.Generator().manual_seed(0)
    noise = [noise_like_packed(s.target_latents, generator) for s in (red, blue)]
    sigmas = torch.tensor([0.3, 0.8])
    params = [p for group in trainer.groups.values() for _, p in group]

    def loss_and_gradients(indices: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        loss = loss_on_batch(
            trainer.pipe,
            trainer.trainable,
            [(red, blue)[i] for i in indices],
            [DROP_NONE] * len(indices),
            sigmas[indices],
            [noise[i] for i in indices],
            trainer.null_encoding,
            use_references=use_references,
            guidance=1.0,
        )
        gradients = torch.autograd.grad(loss, params, allow_unused=True)
        return loss.detach(), [
            torch.zeros_like(p) if g is None else g for p, g in zip(params, gradients, strict=True)
        ]

    batch_loss, batch_gradients = loss_and_gradients([0, 1])
    red_loss, red_gradients = loss_and_gradients([0])
    blue_loss, blue_gradients = loss_and_gradients([1])
    # Equal target sizes: the per-token mean over the batch is the mean of the two samples' losses.
    assert torch.allclose(batch_loss, (red_loss + blue_loss) / 2, rtol=1e-5)
    for batched, alone_red, alone_blue in zip(batch_gradients, red_gradients, blue_gradients, strict=True):
        assert torch.allclose(batched, (alone_red + alone_blue) / 2, rtol=1e-4, atol=1e-7)


def test_stage_one_never_encodes_the_references(trainer: Trainer, monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("stage 1 VAE-encoded references it never uses")

    monkeypatch.setattr(trainer.pipe, "encode_references", refuse)
    monkeypatch.setattr(trainer.state, "step", 0)  # stage 1
    with torch.no_grad():
        loss, count = trainer.micro_step(0)
    assert count == 2 and torch.isfinite(loss)


def test_sharded_training_is_refused(tmp_path: Path, monkeypatch) -> None:
    """Checkpoints and exports read whole parameters: FSDP or DeepSpeed would save shards."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    from squeeze_cli.train.checkpoints import RunError

    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.FSDP))
    loaded = load_config("tiny", [f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(RunError, match="squeeze train runs under DDP only, not FSDP"):
        Trainer(loaded, load_data(loaded))._setup()
    assert not (tmp_path / "run").exists()


def test_loss_has_gradients_only_for_trained_groups(trainer: Trainer) -> None:
    sample = trainer.prepare_sample(1, (64, 64))
    generator = torch.Generator().manual_seed(1)
    loss = loss_on_batch(
        trainer.pipe,
        trainer.trainable,
        [sample],
        [DROP_NONE],
        torch.tensor([0.7]),
        [noise_like_packed(sample.target_latents, generator)],
        trainer.null_encoding,
        use_references=True,
        guidance=1.0,
    )
    loss.backward()
    lora = [p for _, p in trainer.groups["lora"]]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    assert all(p.grad is not None for _, p in trainer.groups["aggregator"][:3])
    assert all(p.grad is None for p in trainer.pipe.mllm.parameters())
    assert all(p.grad is None for n, p in trainer.pipe.transformer.named_parameters() if "lora_" not in n)
    trainer.trainable.zero_grad(set_to_none=True)


def test_timesteps_are_logit_normal_with_flux_resolution_shift() -> None:
    spec = TimestepSpec()
    small = sample_sigmas(4000, spec, 256, torch.Generator().manual_seed(0))
    large = sample_sigmas(4000, spec, 4096, torch.Generator().manual_seed(0))
    unshifted = sample_sigmas(
        4000, TimestepSpec(resolution_shift=False), 4096, torch.Generator().manual_seed(0)
    )
    assert resolution_mu(256) == pytest.approx(0.5) and resolution_mu(4096) == pytest.approx(1.15)
    assert 0.0 < small.min() and large.max() < 1.0
    assert unshifted.median() == pytest.approx(0.5, abs=0.03)  # logit-normal(0, 1) is centred on 0.5
    assert large.mean() > small.mean() > unshifted.mean()  # larger images train at higher noise


def test_dropout_draws_follow_the_configured_rates() -> None:
    drops = draw_dropout(
        20000, DropoutSpec(text=0.2, references=0.1, both=0.05), torch.Generator().manual_seed(0)
    )
    rates = {kind: drops.count(kind) / len(drops) for kind in set(drops)}
    assert rates["text"] == pytest.approx(0.2, abs=0.01)
    assert rates["references"] == pytest.approx(0.1, abs=0.01)
    assert rates["both"] == pytest.approx(0.05, abs=0.01)


def test_learning_rates_follow_stage_and_warmup(tmp_path: Path) -> None:
    config = load_config(
        "tiny",
        [
            "stages.stage1.warmup_steps=4",
            "stages.stage2.train=[lora]",
            "stages.stage2.learning_rates={lora: 0.5}",
        ],
    ).config
    stages = [("stage1", config.stages.stage1), ("stage2", config.stages.stage2)]
    assert [group_learning_rate(s, "aggregator", stages) for s in range(4)] == pytest.approx(
        [2.5e-4, 5e-4, 7.5e-4, 1e-3]
    )
    assert stage_of(6, stages)[0] == "stage2"
    assert group_learning_rate(6, "aggregator", stages) == 0.0  # frozen in stage 2
    assert group_learning_rate(6, "lora", stages) == 0.5


def test_training_and_sampling_share_one_transformer_step(trainer: Trainer, monkeypatch) -> None:
    """`loss_on_batch` and `SqueezePipeline.__call__` both predict through `predict_velocity`, and for the
    same inputs (σ = 1, x0 = 0, so x_σ is the sampler's starting noise; no references; one prompt) the
    two predictions are bit-identical."""
    pipe, text = trainer.pipe, "a photo of a dog on the beach"
    predictions: list[torch.Tensor] = []
    predict_velocity = type(pipe).predict_velocity

    def recording(self, *args, **kwargs):
        predictions.append(predict_velocity(self, *args, **kwargs))
        return predictions[-1]

    monkeypatch.setattr(type(pipe), "predict_velocity", recording)
    channels = pipe.transformer.config.in_channels // 4
    target = torch.zeros(channels, 8, 8)  # 64 px / vae_scale_factor 8
    noise = noise_like_packed(target, torch.Generator().manual_seed(3))
    with torch.no_grad():
        pipe(
            text,
            stage_thresholds=(0.0, 0.0),  # MLLM condition only: no references, as training's stage 1
            height=64,
            width=64,
            num_inference_steps=2,
            guidance_scale=1.0,
            latents=noise.unsqueeze(0),
            output_type="latent",
        )
        sampled = predictions[0]
        predictions.clear()
        sample = PreparedSample("s", pipe.mllm_encoder.encode([], text), target, [])
        loss_on_batch(
            pipe,
            trainer.trainable,
            [sample],
            [DROP_NONE],
            torch.ones(1),  # σ = 1: the first sampling step's noise level
            [noise],
            trainer.null_encoding,
            use_references=False,
            guidance=1.0,
        )
    assert len(predictions) == 1
    assert torch.equal(predictions[0], sampled)
