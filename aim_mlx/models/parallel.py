"""The trunk on MLX's CPU backend with the tokens split over two streams.

MLX runs each CPU stream's kernels on its own thread, and its element-wise kernels are
single-threaded: one stream leaves a core idle during GELU, softmax and layer norms. Here each
stream takes half of the tokens through every per-token operation (layer norms, qkv, proj,
MLP), with the BLAS on one thread per stream, and each half's queries attend over the keys and
values of both halves: the one point per block where the streams wait for each other.
"""

from __future__ import annotations

import mlx.core as mx

from . import ops


def run_blocks(blocks, x: mx.array, streams) -> list[mx.array]:
    """Outputs of `blocks` applied in turn to x (B, N, D), each (B, N, D)."""
    B, N, D = x.shape
    bounds = [N * i // len(streams) for i in range(1, len(streams))]
    parts = mx.split(x, bounds, axis=1)
    outputs = []
    for block in blocks:
        attn, mlp = block.attn, block.mlp
        H = attn.num_heads
        # Half-precision or quantized weights are widened once, for both streams.
        with mx.stream(streams[0]):
            w_qkv, w_proj, w_fc1, w_fc2 = (
                m.weight_as(x.dtype) for m in (attn.qkv, attn.proj, mlp.fc1, mlp.fc2)
            )
        qkv = []  # per stream: (3, B, H, n, head_dim)
        for stream, part in zip(streams, parts, strict=True):
            with mx.stream(stream):
                t = block.norm_1(part) @ w_qkv.T
                qkv.append(t.reshape(B, -1, 3, H, D // H).transpose(2, 0, 3, 1, 4))
        new_parts = []
        for stream, part, (q, _, _) in zip(streams, parts, qkv, strict=True):
            with mx.stream(stream):
                k = mx.concatenate([t[1] for t in qkv], axis=2)  # every token's keys
                v = mx.concatenate([t[2] for t in qkv], axis=2)
                o = ops.attention(q, k, v, attn.scale).transpose(0, 2, 1, 3)
                part = part + o.reshape(B, -1, D) @ w_proj.T
                hidden = ops.gelu(block.norm_2(part) @ w_fc1.T)
                new_parts.append(part + hidden @ w_fc2.T)
        parts = new_parts
        outputs.append(mx.concatenate(parts, axis=1))  # lazy: only the probe layers are used
    return outputs
