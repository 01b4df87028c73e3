"""Levers for benchmarks/vs_pytorch_gpu.py: variants of aim-mlx's GPU forward, applied by
patching the model's classes (or an environment variable) for the length of a `with` block, so
that one run on a borrowed GPU measures what each buys or costs against the default.

- `separate_residual`: each block's two residual additions as a pass of their own, `x + f(x)`,
  instead of in the matmul before them (`mx.addmm`, the default on a GPU).
- `mlx_kernels`: MLX's own GELU and layer norm on CUDA (AIM_MLX_CUDA_KERNELS=off) instead of
  `aim_mlx.models.cuda`'s.
- `compiled_blocks`: each block through `mx.compile`, which fuses its element-wise operations.
- `contiguous_attention`: queries, keys and values copied out of the qkv matmul's output into
  arrays of their own before the fused attention, instead of passed as strided views.
- `indexed_qkv`: queries, keys and values taken from the qkv matmul's output by integer index
  (`out[0]`, as before 2026-11-28), which MLX computes as a gather: a copy of each.
- `steps`: each step of a block alone, at the model's shapes: GB/s moved by the element-wise
  ones (against the card's memory bandwidth), TFLOP/s of the matmuls and the attention.
- `floor`: only the trunk's matmuls (and, with `attention=True`, its fused attention), same
  shapes and count, no norms, GELU or additions: the time MLX's own kernels set as the floor.
"""

from __future__ import annotations

import contextlib
import os
import time

import mlx.core as mx

from aim_mlx.constants import GiB
from aim_mlx.models import aim, cuda, ops

PATCHES = (
    "separate_residual",
    "mlx_kernels",
    "compiled_blocks",
    "contiguous_attention",
    "indexed_qkv",
)


def _block_separate_residual(self, x):
    # Block.__call__ with the additions as passes of their own.
    x = x + self.attn.proj(self.attention(x))
    return x + self.mlp(self.norm_2(x))


def _project_contiguous(self, x):
    return tuple(mx.contiguous(a) for a in _project(self, x))


_project = aim.Attention.project


def _qkv_indexed(x, qkv, num_heads):
    B, N, _ = x.shape
    out = qkv(x).reshape(B, N, 3, num_heads, -1).transpose(2, 0, 3, 1, 4)
    return out[0], out[1], out[2]  # each a Gather


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
    saved = (aim.Block.__call__, aim.Attention.project, ops.run_blocks, ops.qkv_heads)
    saved_env = os.environ.get(ops.CUDA_KERNELS_ENV)
    try:
        if "separate_residual" in names:
            aim.Block.__call__ = _block_separate_residual
        if "contiguous_attention" in names:
            aim.Attention.project = _project_contiguous
        if "compiled_blocks" in names:
            ops.run_blocks = _run_compiled_blocks
        if "mlx_kernels" in names:
            os.environ[ops.CUDA_KERNELS_ENV] = "off"
        if "indexed_qkv" in names:
            ops.qkv_heads = _qkv_indexed
        yield
    finally:
        aim.Block.__call__, aim.Attention.project, ops.run_blocks, ops.qkv_heads = saved
        if saved_env is None:
            os.environ.pop(ops.CUDA_KERNELS_ENV, None)
        else:
            os.environ[ops.CUDA_KERNELS_ENV] = saved_env
        _compiled.clear()


def floor(model, batch: int, warmup: int, iters: int, attention: bool) -> dict:
    """Images/s of the trunk's matmuls alone (plus fused attention if asked) on `model`'s
    weights, timed like `aim_mlx.bench.run`."""
    args = model.args
    blocks = model.trunk.blocks[: max(args.probe_layers) + 1]
    N = (args.img_size // args.patch_size) ** 2
    D = args.embed_dim
    dtype = model.activation_dtype()
    x0 = mx.random.normal((batch, N, D), key=mx.random.key(1)).astype(dtype)
    mx.eval(x0)

    def forward(x):
        for block in blocks:
            q, k, v = block.attn.project(x)
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


def steps(model, batch: int, chain: int = 10, iters: int = 5) -> dict:
    """Each step of a block alone at `model`'s shapes: ms per call; GB/s moved (bytes read +
    written) by the element-wise ones, TFLOP/s of the matmuls and the attention; and the
    largest error of each GELU and layer norm against float32. Each timing is `chain` calls in
    one evaluation, best of `iters`."""
    import mlx.nn as nn

    args = model.args
    n_tokens = (args.img_size // args.patch_size) ** 2
    rows = batch * n_tokens
    D, hidden, H = args.embed_dim, args.mlp_ratio * args.embed_dim, args.num_heads
    dtype = model.activation_dtype()
    block = model.trunk.blocks[0]
    x = mx.random.normal((rows, D), key=mx.random.key(2)).astype(dtype)
    h = mx.random.normal((rows, hidden), key=mx.random.key(3)).astype(dtype)
    w1, w2 = block.mlp.fc1.weight_as(dtype), block.mlp.fc2.weight_as(dtype)
    ln_w, ln_b = block.norm_2.weight.astype(dtype), block.norm_2.bias.astype(dtype)
    eps = block.norm_2.eps
    qkv = mx.random.normal((batch, n_tokens, 3 * D), key=mx.random.key(4)).astype(dtype)
    q, k, v = (  # strided views, as in the model
        t.reshape(batch, n_tokens, H, -1).transpose(0, 2, 1, 3) for t in mx.split(qkv, 3, -1)
    )
    qc, kc, vc = (mx.contiguous(a) for a in (q, k, v))
    mx.eval(x, h, w1, w2, ln_w, ln_b, q, k, v, qc, kc, vc)
    b = x.itemsize
    mm = 2 * rows * D * hidden  # FLOPs of fc1 or fc2
    attn = 4 * batch * H * n_tokens**2 * (D // H)
    scale = block.attn.scale

    def mlx_ln(y):
        return mx.fast.layer_norm(y, ln_w, ln_b, eps)

    # name: (step, input, chained (each output feeds the next call), bytes moved, FLOPs)
    table = {
        "layer norm (MLX)": (mlx_ln, x, True, 2 * x.size * b, None),
        "residual add": (lambda y: y + x, x, True, 3 * x.size * b, None),
        "GELU (MLX)": (nn.gelu, h, True, 2 * h.size * b, None),
        "fc1 matmul": (lambda y: y @ w1.T, x, False, None, mm),
        "fc2 matmul": (lambda y: y @ w2.T, h, False, None, mm),
        "fc2 matmul + residual (addmm)": (lambda y: mx.addmm(x, y, w2.T), h, False, None, mm),
        "attention, strided q k v (as in the model)": (
            lambda _: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale),
            q, False, None, attn,
        ),
        "attention, contiguous q k v": (
            lambda _: mx.fast.scaled_dot_product_attention(qc, kc, vc, scale=scale),
            q, False, None, attn,
        ),
    }  # fmt: skip
    if mx.cuda.is_available():
        table["layer norm (aim-mlx CUDA)"] = (
            lambda y: cuda.layer_norm(y, ln_w, ln_b, eps), x, True, 2 * x.size * b, None
        )  # fmt: skip
        table["GELU (aim-mlx CUDA)"] = (cuda.gelu, h, True, 2 * h.size * b, None)

    def run(step, start, chained):
        if not chained:
            return [step(start) for _ in range(chain)]
        y = start
        for _ in range(chain):
            y = step(y)
        return y

    out = {}
    for name, (step, start, chained, nbytes, flops) in table.items():
        try:
            mx.eval(run(step, start, chained))
            times = []
            for _ in range(iters):
                t = time.perf_counter()
                mx.eval(run(step, start, chained))
                times.append((time.perf_counter() - t) / chain)
            seconds = min(times)
            row = {"ms": 1e3 * seconds}
            if nbytes:
                row["GB_per_s"] = nbytes / seconds / 1e9
            if flops:
                row["TFLOP_per_s"] = flops / seconds / 1e12
            out[name] = row
        except Exception as e:  # e.g. a kernel that does not compile: say so, go on
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}

    exact_gelu = nn.gelu(h.astype(mx.float32))
    f32 = (ln_w.astype(mx.float32), ln_b.astype(mx.float32))
    exact_ln = mx.fast.layer_norm(x.astype(mx.float32), *f32, eps)
    checks = {
        "GELU (MLX)": (lambda: nn.gelu(h), exact_gelu),
        "GELU (aim-mlx CUDA)": (lambda: cuda.gelu(h), exact_gelu),
        "layer norm (MLX)": (lambda: mlx_ln(x), exact_ln),
        "layer norm (aim-mlx CUDA)": (lambda: cuda.layer_norm(x, ln_w, ln_b, eps), exact_ln),
    }
    for name, (compute, exact) in checks.items():
        if name in out and "error" not in out[name]:
            error = mx.abs(compute().astype(mx.float32) - exact).max().item()
            out[name]["max_abs_diff_vs_float32"] = error
    return out
