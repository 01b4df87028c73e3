"""Levers for benchmarks/vs_pytorch_gpu.py: variants of aim-mlx's GPU forward, applied by
patching the model's classes for the length of a `with` block, so that one run on a borrowed GPU
measures what each would buy before any of them becomes the default.

- `fused_residual`: each block's two residual additions done by the matmul before them,
  `mx.addmm(x, a, w.T)` (cuBLASLt adds x in its epilogue), instead of a pass of their own.
- `compiled_blocks`: each block through `mx.compile`, which fuses its element-wise operations.
- `cuda_gelu`: GELU as a hand-written CUDA kernel (`mx.fast.cuda_kernel`, 16-byte loads and
  stores, erf in float32) instead of MLX's compiled one; CUDA only.
- `elementwise`: each element-wise operation of a block alone, at the model's shapes, as GB/s
  moved, to compare with the card's memory bandwidth.
- `floor`: only the trunk's matmuls (and, with `attention=True`, its fused attention), same
  shapes and count, no norms, GELU or additions: the time MLX's own kernels set as the floor.
"""

from __future__ import annotations

import contextlib
import time

import mlx.core as mx

from aim_mlx.constants import GiB
from aim_mlx.models import aim, ops

PATCHES = ("fused_residual", "compiled_blocks", "cuda_gelu")


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

# y = x Phi(x) = 0.5 x (1 + erf(x / sqrt 2)), V elements per thread through MLX's aligned-vector
# loads and stores (16 bytes where the pointers allow), erf in float32.
_GELU_SOURCE = """
    constexpr int V = 16 / sizeof(T);
    size_t n = 1;
    for (int d = 0; d < x_ndim; ++d) n *= x_shape[d];
    uint32_t index = blockIdx.x * blockDim.x + threadIdx.x;
    if (size_t(index) * V >= n) return;
    auto v = load_vector<V>(x, index, n, T(0.0f));
    #pragma unroll
    for (int j = 0; j < V; ++j) {
        float f = static_cast<float>(v[j]);
        v[j] = static_cast<T>(0.5f * f * (1.0f + erff(f * 0.70710678118654752f)));
    }
    store_vector<V>(y, index, v, n);
"""
_gelu_kernel = []


def cuda_gelu(x: mx.array) -> mx.array:
    """Exact GELU through `_GELU_SOURCE` (a CUDA kernel of this file's own)."""
    if not _gelu_kernel:
        _gelu_kernel.append(
            mx.fast.cuda_kernel(
                name="aim_gelu", input_names=["x"], output_names=["y"], source=_GELU_SOURCE
            )
        )
    per_thread = 16 // x.itemsize
    (y,) = _gelu_kernel[0](
        inputs=[x],
        template=[("T", x.dtype)],
        grid=(-(-x.size // per_thread), 1, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[x.shape],
        output_dtypes=[x.dtype],
    )
    return y


@contextlib.contextmanager
def patched(names=()):
    """Apply the named levers (from PATCHES) inside the block."""
    unknown = set(names) - set(PATCHES)
    if unknown:
        raise ValueError(f"unknown levers {sorted(unknown)}")
    saved = (aim.Block.update, ops.run_blocks, ops.gelu)
    try:
        if "cuda_gelu" in names:
            ops.gelu = cuda_gelu
        if "fused_residual" in names:
            aim.Block.update = _update_fused_residual
        if "compiled_blocks" in names:
            ops.run_blocks = _run_compiled_blocks
        yield
    finally:
        aim.Block.update, ops.run_blocks, ops.gelu = saved
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


def elementwise(model, batch: int, chain: int = 10, iters: int = 5) -> dict:
    """Each element-wise step of a block alone at `model`'s shapes (ms per call, and GB/s moved:
    bytes read + written), next to the matmuls around them (TFLOP/s); and how far `cuda_gelu`
    is from float32 GELU. Each timing is `chain` calls in one evaluation, best of `iters`."""
    import mlx.nn as nn

    args = model.args
    rows = batch * (args.img_size // args.patch_size) ** 2
    D, hidden = args.embed_dim, args.mlp_ratio * args.embed_dim
    dtype = model.activation_dtype()
    block = model.trunk.blocks[0]
    x = mx.random.normal((rows, D), key=mx.random.key(2)).astype(dtype)
    h = mx.random.normal((rows, hidden), key=mx.random.key(3)).astype(dtype)
    w1, w2 = block.mlp.fc1.weight_as(dtype), block.mlp.fc2.weight_as(dtype)
    mx.eval(x, h, w1, w2)
    b = x.itemsize
    mm = 2 * rows * D * hidden  # FLOPs of fc1 or fc2
    # name: (step, input, chained (the output feeds the next call), bytes moved, FLOPs)
    steps = {
        "layer norm": (block.norm_2, x, True, 2 * x.size * b, None),
        "residual add": (lambda y: y + x, x, True, 3 * x.size * b, None),
        "GELU (MLX)": (nn.gelu, h, True, 2 * h.size * b, None),
        "fc1 matmul": (lambda y: y @ w1.T, x, False, None, mm),
        "fc2 matmul": (lambda y: y @ w2.T, h, False, None, mm),
        "fc2 matmul + residual (addmm)": (lambda y: mx.addmm(x, y, w2.T), h, False, None, mm),
    }
    if mx.cuda.is_available():
        steps["GELU (cuda_gelu)"] = (cuda_gelu, h, True, 2 * h.size * b, None)

    def run(step, start, chained):
        if not chained:
            return [step(start) for _ in range(chain)]
        y = start
        for _ in range(chain):
            y = step(y)
        return y

    out = {}
    for name, (step, start, chained, nbytes, flops) in steps.items():
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
    cuda = out.get("GELU (cuda_gelu)", {})
    if cuda and "error" not in cuda:
        exact = nn.gelu(h.astype(mx.float32))
        for name, gelu in (("GELU (cuda_gelu)", cuda_gelu), ("GELU (MLX)", nn.gelu)):
            diff = mx.abs(gelu(h).astype(mx.float32) - exact).max().item()
            out[name]["max_abs_diff_vs_float32"] = diff
    return out
