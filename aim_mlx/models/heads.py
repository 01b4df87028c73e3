"""Trainable heads over the trunk's probe-layer tokens, besides `AttentionPoolingHead`."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .layers import FrozenBatchNorm


class LinearPoolingHead(nn.Module):
    """Mean of the tokens, standardised per channel (BatchNorm running statistics), then a
    linear layer with bias: (B, N, D) -> logits (B, num_classes).

    Standardising after the mean equals standardising every token first: the per-channel
    statistics are those of `AttentionPoolingHead`'s BatchNorm.
    """

    def __init__(self, embed_dim: int, num_classes: int, eps: float = 1e-6):
        super().__init__()
        self.bn = FrozenBatchNorm(embed_dim, eps=eps, affine=False)
        self.linear = nn.Linear(embed_dim, num_classes, bias=True)

    def pooled(self, x: mx.array) -> mx.array:
        """(B, N, D) -> the standardised mean token (B, D), in float32."""
        bn = self.bn
        x = x.astype(mx.float32).mean(axis=1)
        return (x - bn.running_mean) * mx.rsqrt(bn.running_var + bn.eps)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear(self.pooled(x))
