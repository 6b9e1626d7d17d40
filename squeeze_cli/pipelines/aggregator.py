"""Dual Layer Aggregation (DLA): turns every MLLM layer's hidden states into FLUX's condition stream.

Each condition token of the MLLM sequence carries one hidden state per layer (embedding output +
every decoder layer). Layerwise Attention Pooling (LAP) treats those per-layer states as a short
sequence over the *layer* axis and pools it into one vector per token. Tokens are the batch
dimension, so LAP never mixes information across tokens: the MLLM has already done that. DLA keeps
one LAP for image tokens and one for text tokens (the paper's choice; `single_lap=True` is its
ablation that shares one LAP), and projects to FLUX's `joint_attention_dim` so the transformer's own
`context_embedder` is reused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

if TYPE_CHECKING:
    from .mllm import MLLMEncoding

__all__ = ["DualLayerAggregator", "LayerwiseAttentionPooling"]


class _LayerAxisAttention(nn.Module):
    """Multi-head self-attention whose sequence is the layer axis of one token."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        if width % num_heads != 0:
            raise ValueError(f"`width` ({width}) must be divisible by `num_heads` ({num_heads})")
        self.num_heads = num_heads
        self.to_qkv = nn.Linear(width, 3 * width)
        self.to_out = nn.Linear(width, width)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # hidden_states: (tokens, layers, width)
        query, key, value = self.to_qkv(hidden_states).chunk(3, dim=-1)
        # (tokens, layers, width) -> (tokens, heads, layers, head_dim)
        query, key, value = (
            t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (query, key, value)
        )
        hidden_states = F.scaled_dot_product_attention(query, key, value)
        return self.to_out(hidden_states.transpose(1, 2).flatten(2))


class _LayerAxisBlock(nn.Module):
    """Pre-norm transformer block (attention + GELU MLP) over the layer axis."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = _LayerAxisAttention(width, num_heads)
        self.norm2 = nn.LayerNorm(width)
        self.ff = nn.Sequential(
            nn.Linear(width, int(width * mlp_ratio)),
            nn.GELU(approximate="tanh"),
            nn.Linear(int(width * mlp_ratio), width),
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states))
        return hidden_states + self.ff(self.norm2(hidden_states))


class LayerwiseAttentionPooling(nn.Module):
    """LAP: per-token attention across MLLM layers, pooled by a learned query.

    Args:
        num_layers: number of hidden states it reads per token.
        in_dim: the MLLM hidden size.
        width: the width `d` the blocks run at.
        num_heads: attention heads in the blocks and the pooling.
        num_blocks: transformer blocks over the layer axis.
        out_dim: output size (FLUX's `joint_attention_dim`).
    """

    def __init__(
        self, num_layers: int, in_dim: int, width: int, num_heads: int, num_blocks: int, out_dim: int
    ):
        super().__init__()
        # Per-layer normalisation: hidden-state norms grow a lot with depth (and the last one is
        # post-norm), so each layer is RMS-normalised on its own and gets its own learned gain.
        self.layer_gain = nn.Parameter(torch.ones(num_layers, in_dim))
        self.proj_in = nn.Linear(in_dim, width)
        # Without it the layer order would be invisible to attention.
        self.layer_embedding = nn.Parameter(torch.randn(num_layers, width) * 0.02)
        self.blocks = nn.ModuleList([_LayerAxisBlock(width, num_heads) for _ in range(num_blocks)])
        self.norm_out = nn.LayerNorm(width)
        self.pool_query = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.pool_attn = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.proj_out = nn.Linear(width, out_dim)
        self.num_layers = num_layers

    # Tokens pooled per chunk: each token is pooled on its own, so chunking is exact, and it bounds the
    # fp32 transients (RMSNorm, blocks) to this many tokens: ~0.4 GB at InternVL3-8B's 29 × 3584 states.
    chunk_tokens = 1024

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(num_layers, tokens, in_dim) -> (tokens, out_dim)."""
        if hidden_states.shape[0] != self.num_layers:
            raise ValueError(
                f"expected {self.num_layers} hidden states per token, got {hidden_states.shape[0]}"
            )
        if hidden_states.shape[1] <= self.chunk_tokens:
            return self._pool(hidden_states)
        return torch.cat([self._pool(chunk) for chunk in hidden_states.split(self.chunk_tokens, dim=1)])

    def _pool(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # (layers, tokens, in_dim) -> (tokens, layers, in_dim): tokens become the batch.
        hidden_states = hidden_states.transpose(0, 1)
        hidden_states = F.rms_norm(hidden_states, (hidden_states.shape[-1],), eps=1e-6) * self.layer_gain
        hidden_states = self.proj_in(hidden_states) + self.layer_embedding
        for block in self.blocks:
            hidden_states = block(hidden_states)
        hidden_states = self.norm_out(hidden_states)
        query = self.pool_query.expand(hidden_states.shape[0], -1, -1)
        pooled, _ = self.pool_attn(
            query, hidden_states, hidden_states, need_weights=False
        )  # (tokens, 1, width)
        return self.proj_out(pooled.squeeze(1))


# diffusers' ConfigMixin.config_name is None, ModelMixin's a str: every diffusers model trips this check.
class DualLayerAggregator(ModelMixin, ConfigMixin):  # type: ignore[misc]
    r"""
    Dual Layer Aggregator: two LAP modules (image tokens, text tokens) over all MLLM hidden states.

    Args:
        num_hidden_states (`int`, defaults to 29):
            Hidden states the MLLM returns per token (embedding output + each decoder layer).
        mllm_hidden_size (`int`, defaults to 3584):
            The MLLM's hidden size.
        width (`int`, defaults to 1024):
            Width `d` of the LAP transformer blocks.
        num_heads (`int`, defaults to 8):
            Attention heads in the LAP blocks and pooling.
        num_blocks (`int`, defaults to 2):
            Transformer blocks over the layer axis per LAP.
        joint_attention_dim (`int`, defaults to 4096):
            Output size per token: the transformer's `joint_attention_dim`, fed to its `context_embedder`.
        pooled_projection_dim (`int`, defaults to 768):
            Size of `pooled_projections` the transformer expects.
        layers (`list[int]`, *optional*):
            Which hidden states to read (indices into the MLLM's stack, negatives allowed). `None` reads
            all of them; `[-1]` is the paper's last-layer-only ablation. Order and repeats are honoured:
            `[3, 2, 1, 0]` feeds the LAP those states in that order.
        single_lap (`bool`, defaults to `False`):
            One LAP shared by image and text tokens (the paper's single-LAP ablation).
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        num_hidden_states: int = 29,
        mllm_hidden_size: int = 3584,
        width: int = 1024,
        num_heads: int = 8,
        num_blocks: int = 2,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 768,
        layers: list[int] | None = None,
        single_lap: bool = False,
    ):
        super().__init__()
        if layers is not None:
            if len(layers) == 0:
                raise ValueError("`layers` must select at least one hidden state (or be None for all)")
            bad = [i for i in layers if not -num_hidden_states <= i < num_hidden_states]
            if bad:
                raise ValueError(f"`layers` {bad} out of range for {num_hidden_states} hidden states")
        self.layer_indices = (
            list(range(num_hidden_states)) if layers is None else [i % num_hidden_states for i in layers]
        )
        num_layers = len(self.layer_indices)

        def lap() -> LayerwiseAttentionPooling:
            return LayerwiseAttentionPooling(
                num_layers, mllm_hidden_size, width, num_heads, num_blocks, joint_attention_dim
            )

        self.text_lap = lap()
        self.image_lap = None if single_lap else lap()
        self.pooled_proj = nn.Linear(joint_attention_dim, pooled_projection_dim)

    def _select(self, hidden_states: torch.Tensor) -> torch.Tensor:
        config = self.config  # a FrozenDict, typed as a dict by diffusers
        if hidden_states.ndim != 3 or hidden_states.shape[0] != config["num_hidden_states"]:
            raise ValueError(
                f"expected hidden states of shape ({config['num_hidden_states']}, tokens, "
                f"{config['mllm_hidden_size']}), got {tuple(hidden_states.shape)}"
            )
        if self.layer_indices != list(range(hidden_states.shape[0])):  # a subset, permutation or repeat
            hidden_states = hidden_states[self.layer_indices]
        return hidden_states.to(device=self.device, dtype=self.dtype)

    def aggregate_image_tokens(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(num_hidden_states, n, H) of image-token positions -> (n, joint_attention_dim)."""
        lap = self.text_lap if self.image_lap is None else self.image_lap
        return lap(self._select(hidden_states))

    def aggregate_text_tokens(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(num_hidden_states, n, H) of text-token positions -> (n, joint_attention_dim)."""
        return self.text_lap(self._select(hidden_states))

    def pool_text(self, text_tokens: torch.Tensor) -> torch.Tensor:
        """(n, joint_attention_dim) aggregated text tokens -> (pooled_projection_dim,)."""
        if text_tokens.shape[0] == 0:
            # Nothing to average (a caller passed an empty instruction); a zero mean keeps it defined.
            mean = text_tokens.new_zeros(text_tokens.shape[-1])
        else:
            mean = text_tokens.mean(dim=0)
        return self.pooled_proj(mean)

    def forward(
        self, encoding: MLLMEncoding, image_tokens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Aggregate one MLLM encoding into FLUX's condition.

        Args:
            encoding: an `MLLMEncoding` (hidden states of every layer, image and text masks).
            image_tokens: the already aggregated image tokens of this encoding (`aggregate_image_tokens`
                of its image positions), so a subject's image half is computed once for all prompts. When
                the encoding has no image positions (an instruction encoded after a cached prefix with
                `include_prefix=False`), they are the prefix's and come first.

        Returns:
            `encoder_hidden_states` of shape (n_image + n_text, joint_attention_dim), the image and text
            tokens in sequence order, and `pooled_projections` of shape (pooled_projection_dim,).
        """
        hidden_states = encoding.hidden_states.to(self.device)
        image_mask = encoding.image_mask.to(self.device, torch.bool)
        text_mask = encoding.text_mask.to(self.device, torch.bool)
        if image_tokens is None:
            image_tokens = self.aggregate_image_tokens(hidden_states[:, image_mask])
        elif not image_mask.any():  # the prefix's image tokens, then this encoding's text
            text_tokens = self.aggregate_text_tokens(hidden_states[:, text_mask])
            image_tokens = image_tokens.to(device=text_tokens.device, dtype=text_tokens.dtype)
            return torch.cat([image_tokens, text_tokens]), self.pool_text(text_tokens)
        elif image_tokens.shape[0] != int(image_mask.sum()):
            raise ValueError(
                f"`image_tokens` has {image_tokens.shape[0]} tokens but the encoding has "
                f"{int(image_mask.sum())}"
            )
        text_tokens = self.aggregate_text_tokens(hidden_states[:, text_mask])

        # Scatter both halves back into sequence order (references come first, so this is usually
        # simply [image; text]).
        keep = image_mask | text_mask
        out = text_tokens.new_empty(hidden_states.shape[1], text_tokens.shape[-1])
        out[image_mask] = image_tokens.to(device=out.device, dtype=out.dtype)
        out[text_mask] = text_tokens
        return out[keep], self.pool_text(text_tokens)
