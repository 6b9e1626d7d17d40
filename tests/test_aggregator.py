"""DualLayerAggregator: per-token pooling across MLLM layers, dual/single LAP, layer selection."""

import pytest
import torch

from squeeze_cli.pipelines.aggregator import DualLayerAggregator
from squeeze_cli.pipelines.mllm import MLLMEncoder, MLLMEncoding

NUM_STATES, HIDDEN, JOINT, POOLED = 5, 24, 16, 12


def make_aggregator(**kwargs) -> DualLayerAggregator:
    torch.manual_seed(0)
    config = dict(
        num_hidden_states=NUM_STATES,
        mllm_hidden_size=HIDDEN,
        width=16,
        num_heads=2,
        num_blocks=2,
        joint_attention_dim=JOINT,
        pooled_projection_dim=POOLED,
    )
    return DualLayerAggregator(**{**config, **kwargs}).eval()


def make_encoding(seq_len: int = 12, seed: int = 0) -> MLLMEncoding:
    generator = torch.Generator().manual_seed(seed)
    hidden_states = torch.randn(NUM_STATES, seq_len, HIDDEN, generator=generator) * 3
    image_mask = torch.zeros(seq_len, dtype=torch.bool)
    image_mask[2:6] = True  # after two template tokens
    text_mask = torch.zeros(seq_len, dtype=torch.bool)
    text_mask[7:10] = True  # template token between image and text, two after
    return MLLMEncoding(hidden_states=hidden_states, image_mask=image_mask, text_mask=text_mask)


def test_shapes_and_sequence_order():
    aggregator = make_aggregator()
    encoding = make_encoding()
    embeds, pooled = aggregator(encoding)
    assert embeds.shape == (4 + 3, JOINT)
    assert pooled.shape == (POOLED,)
    image_tokens = aggregator.aggregate_image_tokens(encoding.hidden_states[:, encoding.image_mask])
    text_tokens = aggregator.aggregate_text_tokens(encoding.hidden_states[:, encoding.text_mask])
    torch.testing.assert_close(embeds, torch.cat([image_tokens, text_tokens]))
    torch.testing.assert_close(pooled, aggregator.pooled_proj(text_tokens.mean(0)))


def test_no_mixing_across_tokens():
    aggregator = make_aggregator()
    hidden_states = torch.randn(NUM_STATES, 6, HIDDEN)
    before = aggregator.aggregate_text_tokens(hidden_states)
    perturbed = hidden_states.clone()
    perturbed[:, 3] += torch.randn(NUM_STATES, HIDDEN)
    after = aggregator.aggregate_text_tokens(perturbed)
    changed = (after - before).abs().amax(dim=-1) > 1e-6
    assert changed.tolist() == [False, False, False, True, False, False]
    # And a token's output does not depend on how many other tokens are in the batch.
    torch.testing.assert_close(aggregator.aggregate_text_tokens(hidden_states[:, 2:3]), before[2:3])


def test_image_and_text_laps_are_separate_unless_single_lap():
    hidden_states = torch.randn(NUM_STATES, 4, HIDDEN)
    dual = make_aggregator()
    assert not torch.allclose(
        dual.aggregate_image_tokens(hidden_states), dual.aggregate_text_tokens(hidden_states)
    )
    single = make_aggregator(single_lap=True)
    torch.testing.assert_close(
        single.aggregate_image_tokens(hidden_states), single.aggregate_text_tokens(hidden_states)
    )
    assert single.image_lap is None
    assert sum(p.numel() for p in single.parameters()) < sum(p.numel() for p in dual.parameters())


def test_all_layers_are_read_and_their_order_matters():
    aggregator = make_aggregator()
    hidden_states = torch.randn(NUM_STATES, 3, HIDDEN)
    base = aggregator.aggregate_text_tokens(hidden_states)
    for layer in (0, NUM_STATES // 2, NUM_STATES - 1):
        perturbed = hidden_states.clone()
        perturbed[layer] += 1.0
        assert not torch.allclose(aggregator.aggregate_text_tokens(perturbed), base)
    reversed_layers = hidden_states.flip(0)
    assert not torch.allclose(aggregator.aggregate_text_tokens(reversed_layers), base)


def test_last_layer_only_ignores_other_layers():
    aggregator = make_aggregator(layers=[-1])
    assert aggregator.text_lap.layer_embedding.shape[0] == 1
    hidden_states = torch.randn(NUM_STATES, 3, HIDDEN)
    base = aggregator.aggregate_text_tokens(hidden_states)
    perturbed = hidden_states.clone()
    perturbed[:-1] += 5.0
    torch.testing.assert_close(aggregator.aggregate_text_tokens(perturbed), base)
    perturbed[-1] += 1.0
    assert not torch.allclose(aggregator.aggregate_text_tokens(perturbed), base)


def test_per_layer_norm_makes_it_scale_invariant_per_layer():
    # Deep layers have much larger norms than early ones; each layer is normalised on its own.
    aggregator = make_aggregator()
    hidden_states = torch.randn(NUM_STATES, 3, HIDDEN)
    scaled = hidden_states * torch.tensor([1.0, 10.0, 100.0, 0.1, 1000.0])[:, None, None]
    torch.testing.assert_close(
        aggregator.aggregate_text_tokens(scaled),
        aggregator.aggregate_text_tokens(hidden_states),
        atol=1e-4,
        rtol=1e-4,
    )


def test_precomputed_image_tokens_give_the_same_condition():
    aggregator = make_aggregator()
    encoding = make_encoding()
    image_tokens = aggregator.aggregate_image_tokens(encoding.image_hidden_states)
    embeds, pooled = aggregator(encoding)
    embeds_cached, pooled_cached = aggregator(encoding, image_tokens=image_tokens)
    torch.testing.assert_close(embeds_cached, embeds)
    torch.testing.assert_close(pooled_cached, pooled)
    with pytest.raises(ValueError, match="image_tokens"):
        aggregator(encoding, image_tokens=image_tokens[:2])


def test_save_and_load(tmp_path):
    aggregator = make_aggregator(layers=[0, -1], single_lap=True)
    aggregator.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file()
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = DualLayerAggregator.from_pretrained(tmp_path).eval()
    assert loaded.config.layers == [0, -1] and loaded.config.single_lap
    encoding = make_encoding()
    for a, b in zip(aggregator(encoding), loaded(encoding), strict=True):
        torch.testing.assert_close(a, b)


def test_invalid_config_and_inputs():
    with pytest.raises(ValueError, match="layers"):
        make_aggregator(layers=[NUM_STATES])
    with pytest.raises(ValueError, match="layers"):
        make_aggregator(layers=[])
    with pytest.raises(ValueError, match="num_heads"):
        make_aggregator(width=15)
    with pytest.raises(ValueError, match="hidden states"):
        make_aggregator().aggregate_text_tokens(torch.randn(NUM_STATES + 1, 2, HIDDEN))


def test_bfloat16_inputs_are_cast():
    aggregator = make_aggregator()
    hidden_states = torch.randn(NUM_STATES, 2, HIDDEN)
    out = aggregator.aggregate_text_tokens(hidden_states.to(torch.bfloat16))
    assert out.dtype == torch.float32 and out.shape == (2, JOINT)


@pytest.mark.parametrize("family", ["internvl", "qwen2_5_vl"])
def test_on_a_real_tiny_mllm_encoding(family):
    from PIL import Image

    from squeeze_cli.pipelines.mllm.tiny import build_tiny_mllm

    model, tokenizer, image_processor = build_tiny_mllm(family)
    encoder = MLLMEncoder(model, tokenizer, image_processor)
    encoding = encoder.encode([Image.new("RGB", (40, 32), (200, 30, 30))], "a photo of a dog")
    aggregator = DualLayerAggregator(
        num_hidden_states=encoder.num_hidden_states,
        mllm_hidden_size=encoder.hidden_size,
        width=16,
        num_heads=2,
        joint_attention_dim=JOINT,
        pooled_projection_dim=POOLED,
    )
    embeds, pooled = aggregator(encoding)
    n_image, n_text = int(encoding.image_mask.sum()), int(encoding.text_mask.sum())
    assert n_image > 0 and n_text > 0
    assert embeds.shape == (n_image + n_text, JOINT) and pooled.shape == (POOLED,)
    null_embeds, _ = aggregator(encoder.encode_null())
    assert null_embeds.shape[0] >= 1
