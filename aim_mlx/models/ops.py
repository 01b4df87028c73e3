"""Device-aware building blocks: attention, GELU and the low-precision policy."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def on_gpu() -> bool:
    return mx.default_device() == mx.gpu


def widen_low_precision() -> bool:
    """Compute half-precision / quantized weights in float32 (True on the CPU).

    Only float32 reaches the BLAS on MLX's CPU backend; half precision and quantized
    matmuls run 40-100x slower there. On Metal they run natively.
    """
    return not on_gpu()


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """softmax(q k^T * scale) v over (B, H, N, head_dim) arrays."""
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)


def gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU."""
    return nn.gelu(x)
