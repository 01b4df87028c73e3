"""Levers for benchmarks/vs_pytorch_gpu.py: variants of aim-mlx's GPU forward, applied by
patching the model's classes for the length of a `with` block, so that one run on a borrowed GPU
measures what each would buy before any of them becomes the default.

- `fused_residual`: each block's two residual additions done by the matmul before them,
  `mx.addmm(x, a, w.T)` (cuBLASLt adds x in its epilogue), instead of a pass of their own.
- `compiled_blocks`: each block through `mx.compile`, which fuses its element-wise operations.
- `floor`: only the trunk's matmuls (and, with `attention=True`, its fused attention), same
  shapes and count, no norms, GELU or additions: the time MLX's own kernels set as the floor.
"""

from __future__ import annotations

import contextlib
import time

import mlx.core as mx

from aim_mlx.constants import GiB
from aim_mlx.models import aim, ops

PATCHES = ("fused_residual", "compiled_blocks")


def _update_fused_residual(self, x, q, k, v):
    # The same math as Block.update, with x + proj(heads) and x + fc2(h) as one addmm each.
    out = ops.attention(q, k, v, self.attn.scale)  # (B, H, N, head_dim)
    B, H, N, hd = out.shape
    heads = out.transpose(0, 2, 1, 3).reshape(B, N, H * hd)
    x = mx.addmm(x, heads, self.attn.proj.weight_as(x.dtype).T)
    h = ops.gelu(self.mlp.fc1(self.norm_2(x)))
    return mx.addmm(x, h, self.mlp.fc2.weight_as(x.dtype).T)


def _run_compiled_blocks(blocks, x):
    outputs = []
    for block in blocks:
        key = id(block)
        if key not in _compiled:
            _compiled[key] = (block, mx.compile(block))  # keeps the block alive with its id
        x = _compiled[key][1](x)
        outputs.append(x)
    return outputs


_compiled: dict = {}


@contextlib.contextmanager
def patched(names=()):
    """Apply the named levers (from PATCHES) inside the block."""
    unknown = set(names) - set(PATCHES)
    if unknown:
        raise ValueError(f"unknown levers {sorted(unknown)}")
    saved = (aim.Block.update, ops.run_blocks)
    try:
        if "fused_residual" in names:
            aim.Block.update = _update_fused_residual
        if "compiled_blocks" in names:
            ops.run_blocks = _run_compiled_blocks
        yield
    finally:
        aim.Block.update, ops.run_blocks = saved
        _compiled.clear()


def floor(model, batch: int, warmup: int, iters: int, attention: bool) -> dict:
    """Images/s of the trunk's matmuls alone (plus fused attention if asked) on `model`'s
    weights, timed like `aim_mlx.bench.run`."""
    args = model.args
    blocks = model.trunk.blocks[: max(args.probe_layers) + 1]
    N = (args.img_size // args.patch_size) ** 2
    H, D = args.num_heads, args.embed_dim
    dtype = model.activation_dtype()
    x0 = mx.random.normal((batch, N, D), key=mx.random.key(1)).astype(dtype)
    mx.eval(x0)

    def forward(x):
        for block in blocks:
            qkv = block.attn.qkv(x).reshape(batch, N, 3, H, -1).transpose(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            heads = ops.attention(q, k, v, block.attn.scale) if attention else v
            x = block.attn.proj(heads.transpose(0, 2, 1, 3).reshape(batch, N, D))
            x = block.mlp.fc2(block.mlp.fc1(x))
        return x

    mx.reset_peak_memory()
    times = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        mx.eval(forward(x0))
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {
        "images_per_s": batch * len(times) / sum(times),
        "peak_memory_gb": mx.get_peak_memory() / GiB,
    }
