"""Device-aware building blocks: attention, GELU, the low-precision policy, CPU streams.

On Metal the GPU computes erf and exp in hardware: the fused MLX kernels are used as they are.
On MLX's CPU backend erf and exp are scalar library calls that cost more than the matmuls
around them, so there they are rebuilt from plain arithmetic (which `mx.compile` fuses into
one vectorised loop) with a tested error bound, and the work is split over two CPU streams
so that these single-threaded kernels run on both cores.
"""

from __future__ import annotations

import contextvars
import math
import os
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn

from .. import blas


def on_gpu() -> bool:
    return mx.default_device() == mx.gpu


def cpu_streams() -> int:
    """How many CPU streams the work is split over (`AIM_MLX_CPU_STREAMS`, default 2).

    MLX's CPU element-wise kernels run on one thread; splitting the batch (or, for a single
    image, its tokens) over two streams runs them on two cores at once, and the BLAS with the
    cores divided between the streams: measured faster on 2 cores (benchmarks/README.md).
    """
    default = "2" if (os.cpu_count() or 1) > 1 else "1"
    return max(1, int(os.environ.get("AIM_MLX_CPU_STREAMS", default)))


def _blas_threads_per_stream(n: int) -> None:
    blas.set_threads(max(1, (os.cpu_count() or 1) // n) if n > 1 else None)


@lru_cache(maxsize=4)
def _new_cpu_streams(n: int) -> tuple:
    return tuple(mx.new_stream(mx.cpu) for _ in range(n))


_in_batch_split = contextvars.ContextVar("aim_mlx_in_batch_split", default=False)


def map_batch(fn, x: mx.array) -> mx.array:
    """fn(x) for a function of independent images; on the CPU, a batch split over two streams.

    The streams share the cores for their BLAS threads. (Set when the graph is built, which is
    just before it runs when `model(x)` is evaluated.) On Metal, or with one stream, fn(x).
    """
    n = min(cpu_streams(), x.shape[0])
    if on_gpu() or n < 2:
        return fn(x)
    _blas_threads_per_stream(n)
    bounds = [x.shape[0] * i // n for i in range(1, n)]
    outs = []
    token = _in_batch_split.set(True)
    try:
        for stream, part in zip(_new_cpu_streams(n), mx.split(x, bounds), strict=True):
            with mx.stream(stream):
                outs.append(fn(part))
    finally:
        _in_batch_split.reset(token)
    return mx.concatenate(outs)


def token_streams(x: mx.array) -> tuple:
    """CPU streams to split the tokens of x (B, N, D) over (parallel.py), where the batch is not
    split: one image, or narrow weights; () on Metal, with one stream, or inside `map_batch`."""
    if on_gpu() or _in_batch_split.get():
        return ()
    n = min(cpu_streams(), x.shape[1])
    _blas_threads_per_stream(n)
    return _new_cpu_streams(n) if n > 1 else ()


def widen_low_precision() -> bool:
    """Compute half-precision / quantized weights in float32 (True on the CPU).

    Only float32 reaches the BLAS on MLX's CPU backend; half precision and quantized
    matmuls run 40-100x slower there. On Metal they run natively.
    """
    return not on_gpu()


# erf(x) ~ x P(x^2) / Q(x^2) on [-4, 4] (erf(4) = 1 - 1.5e-8: beyond, the clamp gives +-1).
# Fitted for this project (weighted least squares, then Lawson iterations towards equal
# ripple, in float64): max abs error 7.5e-8 in float64, 3.8e-7 evaluated in float32.
_FIT_P = (
    1.1283785494308585,
    0.2050581180247821,
    0.054645106668405,
    0.004389497878936856,
    0.00029816955980633246,
    1.923541113082406e-06,
)
ERF_Q = (
    1.0,
    0.5150553612421981,
    0.12013242141995405,
    0.016208988281998432,
    0.0013130239210307644,
    3.748464515915625e-05,
)
# P is scaled up by 9e-8 so that erf_approx(+-4) rounds to +-1 or beyond in float32; the final
# clip then makes it exactly +-1, so GELU is exactly 0 for large negative inputs.
ERF_P = tuple(c * (1 + 9e-8) for c in _FIT_P)
ERF_CLAMP = 4.0


def _poly(coeffs, s):
    """coeffs[0] + coeffs[1] s + ... (Horner)."""
    out = coeffs[-1]
    for c in reversed(coeffs[:-1]):
        out = out * s + c
    return out


def _poly6(c, s):
    """c[0] + c[1] s + ... + c[5] s^5, evaluated in 5 dependent steps (Estrin), not 10.

    `mx.compile` fuses chains of at most 11 dependent element-wise operations into one kernel;
    anything deeper is split into several kernels with full-size intermediates in between.
    """
    s2 = s * s
    return (c[0] + c[1] * s) + s2 * (c[2] + c[3] * s) + (s2 * s2) * (c[4] + c[5] * s)


def erf_approx(x: mx.array) -> mx.array:
    """erf from plain arithmetic: |error| <= 4e-7 in float32 (tested in tests/test_ops.py)."""
    x = mx.clip(x, -ERF_CLAMP, ERF_CLAMP)
    s = x * x
    return mx.clip(x * _poly(ERF_P, s) / _poly(ERF_Q, s), -1.0, 1.0)


# 0.5 erf(x / sqrt(2)) = x GELU_P(x^2) / GELU_Q(x^2): ERF_P, ERF_Q with the scalings folded in.
GELU_P = tuple(c * 0.5 / math.sqrt(2) / 2**i for i, c in enumerate(ERF_P))
GELU_Q = tuple(c / 2**i for i, c in enumerate(ERF_Q))
GELU_CLAMP = ERF_CLAMP * math.sqrt(2)


def gelu_approx(x: mx.array) -> mx.array:
    """Exact-form GELU, x Phi(x), with the erf of `erf_approx`: |error| <= 1e-6 max(1, |x|).

    Written as (0.5 x Q + x t P) / Q so that its longest chain is 11 operations: `mx.compile`
    makes it one kernel, a single pass over the activations. Below -GELU_CLAMP (-5.66, where
    GELU is above -5e-8) x is clamped too, so large negative inputs give |GELU| < 3e-7.
    """
    t = mx.clip(x, -GELU_CLAMP, GELU_CLAMP)
    s = t * t
    q = _poly6(GELU_Q, s)
    x = mx.maximum(x, -GELU_CLAMP)
    return ((x * t) * _poly6(GELU_P, s) + (0.5 * x) * q) / q


@lru_cache(maxsize=1)
def _compiled_gelu():
    """`mx.compile`d `gelu_approx`, or None where compiling fails (no C++ compiler)."""
    fn = mx.compile(gelu_approx)
    try:
        mx.eval(fn(mx.zeros((4,))))
    except Exception:  # MLX's CPU compile needs a C++ compiler at run time
        return None
    return fn


def gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU: MLX's kernel on Metal, the fused arithmetic one on the CPU."""
    fast = None if on_gpu() or x.dtype != mx.float32 else _compiled_gelu()
    return fast(x) if fast is not None else nn.gelu(x)


def _dequantize_arith(w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int):
    # w: (O, I * bits / 32) uint32, scales/biases: (O, I / group_size) -> (O, I) float32
    rows = w.shape[0]
    words = group_size * bits // 32  # uint32 words per group
    shifts = mx.arange(0, 32, bits, dtype=mx.uint32)
    q = (w.reshape(rows, -1, words, 1) >> shifts) & ((1 << bits) - 1)  # (O, groups, words, 32/bits)
    s = scales.astype(mx.float32)[..., None, None]
    b = biases.astype(mx.float32)[..., None, None]
    return (q.astype(mx.float32) * s + b).reshape(rows, -1)  # one fused kernel, then a free view


_dequantize_compiled = mx.compile(_dequantize_arith)


def dequantize_float32(w, scales, biases, group_size: int, bits: int) -> mx.array:
    """Affine-quantized weights as float32, for a BLAS matmul on the CPU.

    A fused shift-mask-scale kernel with float32 scales: about 5x faster on the CPU than
    `mx.dequantize` with half-precision scales followed by a cast (which also rounds the
    weights to half precision on the way).
    """
    if 32 % bits or (group_size * bits) % 32 or _compiled_gelu() is None:  # else MLX's own
        return mx.dequantize(
            w, scales.astype(mx.float32), biases.astype(mx.float32), group_size, bits
        )
    return _dequantize_compiled(w, scales, biases, group_size, bits)


# expm1(x) / x on [-1, 0] ~ EXPM1_P(x), fitted like ERF_P: max relative error 8e-8 in float64.
EXPM1_P = (
    0.9999999223986121,
    0.49999465564221424,
    0.16660575661534424,
    0.04140803815902182,
    0.007825305818908206,
    0.0009077832994287997,
)
EXP_SQUARINGS = 5  # exp(x) = exp(x / 32) ** 32
EXP_FLOOR = -32.0  # exp(-32) = 1.3e-14: anything below it is 0 to float32 softmax weights


def _expm1_small(x: mx.array, scale: float) -> mx.array:
    # t = x * scale / 32 in [-1, 0]; returns exp(t) - 1 (9 dependent operations)
    t = mx.maximum(x * (scale * 0.5**EXP_SQUARINGS), EXP_FLOOR * 0.5**EXP_SQUARINGS)
    return t * _poly6(EXPM1_P, t)


def _square_up(r: mx.array) -> mx.array:
    # exp(t) - 1 -> exp(32 t), carried as r = exp(.) - 1 (11 dependent operations)
    for _ in range(EXP_SQUARINGS):
        r = r * (2.0 + r)
    return 1.0 + r


def exp_neg_approx(x: mx.array, scale: float = 1.0) -> mx.array:
    """exp(x * scale) for x * scale <= 0, from plain arithmetic: absolute error <= 2.5e-7.

    Squares exp(x / 32) five times, carried as r = exp(.) - 1 (r <- r (2 + r)) so that no
    rounding near 1 is amplified; softmax only needs this absolute accuracy. Two fused kernels
    on the CPU (see `_poly6` on depth); tested in tests/test_ops.py.
    """
    return _square_up(_expm1_small(x, scale))


@lru_cache(maxsize=32)
def _compiled_exp(scale: float):
    small = mx.compile(lambda s, m: _expm1_small(s - m, scale))
    square = mx.compile(_square_up)
    return lambda s, m: square(small(s, m))


def _attention_cpu(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    s = q @ k.swapaxes(-1, -2)  # (B, H, Nq, Nk), unscaled
    e = _compiled_exp(scale)(s, s.max(-1, keepdims=True))  # exp((s - max) * scale)
    # Normalise after the product with v: a pass over (Nq, head_dim) instead of (Nq, Nk).
    return (e @ v) / e.sum(-1, keepdims=True)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """softmax(q k^T * scale) v over (B, H, N, head_dim) arrays.

    MLX's fused kernel on Metal; on the CPU a softmax with `exp_neg_approx`, whose exp is
    about 3x cheaper than the library one that dominates attention there.
    """
    if on_gpu() or q.dtype != mx.float32 or _compiled_gelu() is None:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    return _attention_cpu(q, k, v, scale)
