"""The aggregator on long conditions: the LAP pools in chunks of tokens (bounded memory), exactly as in one
pass; and a layer list that permutes or repeats hidden states takes effect even when its length is the
stack's."""

import pytest
import torch

from squeeze_cli.pipelines.aggregator import DualLayerAggregator

NUM_STATES, HIDDEN = 5, 24


def make_aggregator(**kwargs) -> DualLayerAggregator:
    torch.manual_seed(0)
    config = dict(
        num_hidden_states=NUM_STATES,
        mllm_hidden_size=HIDDEN,
        width=16,
        num_heads=2,
        num_blocks=2,
        joint_attention_dim=16,
        pooled_projection_dim=12,
    )
    return DualLayerAggregator(**{**config, **kwargs}).eval()


def test_chunked_pooling_equals_one_pass() -> None:
    aggregator = make_aggregator()
    hidden_states = torch.randn(NUM_STATES, 11, HIDDEN, generator=torch.Generator().manual_seed(1)) * 3
    whole = aggregator.aggregate_text_tokens(hidden_states)
    aggregator.text_lap.chunk_tokens = 4  # 11 tokens → chunks of 4, 4, 3
    calls = []
    handle = aggregator.text_lap.proj_in.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    chunked = aggregator.aggregate_text_tokens(hidden_states)
    handle.remove()
    assert calls == [4, 4, 3]
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layers", [[4, 3, 2, 1, 0], [0, 0, 1, 2, 3], [2, 2]])
def test_a_permuted_or_repeated_layer_list_takes_effect(layers: list[int]) -> None:
    every = make_aggregator()
    selected = make_aggregator(layers=layers)
    if len(layers) == NUM_STATES:
        selected.load_state_dict(every.state_dict())  # same weights: only the selection differs
        reference = every
    else:
        reference = make_aggregator(num_hidden_states=len(layers))
        reference.load_state_dict(selected.state_dict())
    hidden_states = torch.randn(NUM_STATES, 3, HIDDEN, generator=torch.Generator().manual_seed(2))
    out = selected.aggregate_text_tokens(hidden_states)
    torch.testing.assert_close(out, reference.aggregate_text_tokens(hidden_states[layers]))
    if len(layers) == NUM_STATES:
        assert not torch.allclose(out, every.aggregate_text_tokens(hidden_states), atol=1e-4)
