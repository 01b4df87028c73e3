"""Device-dependent kernels: attention and its q, k, v, GELU, layer norm, dequantization, float16
widening, the residual additions, and how the trunk's blocks run.

On Metal (and MLX's CUDA backend) the GPU computes erf and exp in hardware: MLX's fused kernels
are used as they are, except that on CUDA GELU and layer norm are this project's own (`cuda`,
which move data at nearer the card's bandwidth) and each residual addition is done by the matmul
before it. On MLX's CPU backend erf and exp are scalar library calls that cost more
than the matmuls around them, so there they are rebuilt from plain arithmetic (which
`mx.compile` fuses into one vectorised loop, as long as no maximum or minimum is inside it) with
a tested error bound; row sums go to the BLAS, faster than MLX's CPU reductions; and the blocks
run through `cpu_runner`, which spreads the work over CPU streams (measured in
benchmarks/README.md).
"""

from __future__ import annotations

import math
import platform
import threading
from contextlib import contextmanager
from functools import lru_cache, partial

import mlx.core as mx

from ..runtime import switched_off
from . import cuda

CUDA_KERNELS_ENV = "AIM_MLX_CUDA_KERNELS"  # "off": MLX's own GELU and layer norm on CUDA too


def on_gpu() -> bool:
    return mx.default_device() == mx.gpu


def widen_low_precision() -> bool:
    """Compute half-precision / quantized weights in float32 (True on the CPU).

    Only float32 reaches the BLAS on MLX's CPU backend, where half-precision and quantized
    matmuls are much slower; on the GPU they run natively.
    """
    return not on_gpu()


def quantized_kernels() -> bool:
    """Whether quantized layers run MLX's quantized matmul kernels: on Metal.

    On the CPU the weights are widened for the BLAS (`widen_low_precision`). On MLX's CUDA
    backend (0.32) each layer's weights are dequantized just before a dense matmul instead: its
    quantized kernels cover only some shapes, and gave NaN logits on the test fixture's.
    """
    return on_gpu() and not mx.cuda.is_available()


def cuda_kernels() -> bool:
    """Whether GELU and layer norm run this project's CUDA kernels: on MLX's CUDA backend, unless
    AIM_MLX_CUDA_KERNELS=off."""
    return on_gpu() and mx.cuda.is_available() and not switched_off(CUDA_KERNELS_ENV)


def fused_residual() -> bool:
    """Whether `x + a @ w.T` is one matmul with x added in its epilogue (`mx.addmm`): on the GPU,
    where it saves a pass over the activations; on the CPU the BLAS gains nothing from it."""
    return on_gpu()


_this_thread = threading.local()


class _AtThreadEnd:
    def __del__(self):
        mx.clear_streams()  # the thread's streams, and its random key


def this_thread() -> dict:
    """aim-mlx's state of this thread; in a worker thread, MLX's is then freed in time too.

    MLX (0.32) keeps a thread's random key and compiled graphs, which hold Python objects, in
    C++ thread-local storage, and frees them after the thread's Python state is gone, taking
    the GIL: when the interpreter exits meanwhile (a worker thread loaded or ran the model,
    then the program ended), the process aborts ("terminate called without an active
    exception"). What is kept here goes with the thread's Python state, while Python still
    runs: compiled functions (`compiled`), which empty their cache, and in a worker thread a
    finalizer that clears the thread's streams and random key (`mx.clear_streams`).
    """
    state = _this_thread.__dict__
    if "end" not in state:
        main = threading.current_thread() is threading.main_thread()
        state["end"] = None if main else _AtThreadEnd()
    return state


def compiled(fn, shapeless: bool = False, **constants):
    """`mx.compile(fn, shapeless)`, with `constants` bound as keyword arguments, made once in
    each thread and dropped with it (`this_thread`)."""
    made = this_thread().setdefault("compiled", {})
    key = (fn, shapeless, *sorted(constants.items()))
    if key not in made:
        made[key] = mx.compile(partial(fn, **constants) if constants else fn, shapeless=shapeless)
    return made[key]


@contextmanager
def random_key_kept():
    """Build layers whose random initial weights are then replaced by loaded ones, leaving MLX's
    random key (this thread's) as it was: a program that seeds MLX draws the same numbers
    whether or not it loads a model meanwhile.

    Each layer built draws from the key lazily, splitting it into a new lazy key; restoring the
    key also drops that chain of splits (about 2 KB a layer), which would otherwise be kept for
    as long as the process ran.
    """
    this_thread()  # the key is the thread's
    high, low = mx.random.state[0].tolist()
    try:
        yield
    finally:
        mx.random.seed((high << 32) | low)  # mx.random.key(s) is [s >> 32, s & 0xFFFFFFFF]


@lru_cache(maxsize=1)
def can_compile() -> bool:
    """Whether `mx.compile` works here (MLX's CPU backend compiles with a C++ compiler at run
    time; without one the fused CPU kernels below fall back to MLX's own)."""
    try:
        mx.eval(mx.compile(lambda a: a * 2 + 1)(mx.zeros((4,))))
    except Exception:
        return False
    return True


def run_blocks(blocks, x: mx.array) -> list[mx.array]:
    """Outputs of `blocks` applied in turn to x (B, N, D), each (B, N, D).

    On the GPU one after the other; on the CPU as `cpu_runner` schedules them.
    """
    if not on_gpu():
        from . import cpu_runner

        return cpu_runner.run_blocks(blocks, x)
    outputs = []
    for block in blocks:
        x = block(x)
        outputs.append(x)
    return outputs


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


def _gelu_rational(x: mx.array, t: mx.array) -> mx.array:
    # x Phi(x) for x >= -GELU_CLAMP, given t = min(x, GELU_CLAMP): 11 dependent operations
    s = t * t
    q = _poly6(GELU_Q, s)
    return ((x * t) * _poly6(GELU_P, s) + (0.5 * x) * q) / q


def _gelu_erf(x: mx.array) -> mx.array:
    return x * (1 + mx.erf(x / math.sqrt(2))) / 2  # as MLX's nn.gelu


def gelu_approx(x: mx.array, rational=_gelu_rational) -> mx.array:
    """Exact-form GELU, x Phi(x), with the erf of `erf_approx`: |error| <= 1e-6 max(1, |x|).

    Written as (0.5 x Q + x t P) / Q so that its longest chain is 11 operations: `mx.compile`
    makes `rational` one kernel, a single pass over the activations. The clamps run before it,
    as MLX's own kernels: inside a compiled kernel a maximum or minimum is scalar code that keeps
    the compiler from vectorising the loop. Below -GELU_CLAMP (-5.66, where GELU is above
    -5e-8) x is clamped too, so large negative inputs give |GELU| < 3e-7.
    """
    x = mx.maximum(x, -GELU_CLAMP)
    return rational(x, mx.minimum(x, GELU_CLAMP))


def gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU: MLX's formula on Metal, this project's kernel on CUDA (`cuda.gelu`),
    the fused arithmetic one on the CPU."""
    if cuda_kernels() and x.size:
        return cuda.gelu(x)
    if not can_compile():
        return _gelu_erf(x)
    if on_gpu() or x.dtype != mx.float32:
        return compiled(_gelu_erf, shapeless=True)(x)  # element-wise: as nn.gelu, any shape
    return gelu_approx(x, compiled(_gelu_rational))


def qkv_heads(x: mx.array, qkv, num_heads: int) -> tuple[mx.array, mx.array, mx.array]:
    """q, k, v, each (B, H, N, head_dim), of x (B, N, D) by the layer `qkv` (outputs: q, k, v
    side by side, each head's features together).

    On the GPU: one matmul, whose output's thirds are viewed as the heads (no copy: the fused
    attention reads strided heads; an integer index such as `out[0]` would be a gather, a copy).
    On the CPU: a product per head with that head's rows of the weight, whose outputs are
    contiguous: MLX's CPU matmul copies a strided operand, and attention's products would copy
    views of one output.
    """
    if on_gpu():
        B, N, _ = x.shape
        thirds = mx.split(qkv(x), 3, axis=-1)  # (B, N, D) views
        return tuple(t.reshape(B, N, num_heads, -1).transpose(0, 2, 1, 3) for t in thirds)
    heads = []
    for part in qkv.split(3):  # q, k, v
        w = part.weight_as(x.dtype).reshape(num_heads, -1, x.shape[-1])  # (H, head_dim, D)
        heads.append(x[:, None] @ w.swapaxes(-1, -2))  # (B, 1, N, D) @ (H, D, head_dim)
    return tuple(heads)


def _row_sums(x: mx.array) -> mx.array:
    """Sums over x's last axis, kept as an axis of 1: a product with ones, which the BLAS does
    faster than MLX's CPU reduction (a scalar loop)."""
    return x @ mx.ones((x.shape[-1], 1), x.dtype)


def layer_norm(x: mx.array, weight: mx.array, bias: mx.array, eps: float) -> mx.array:
    """Layer norm over x's last axis, weight and bias in x's dtype: MLX's kernel, on CUDA this
    project's (`cuda.layer_norm`) where the rows fit it, on the CPU in float32 with the row
    sums done by the BLAS."""
    if cuda_kernels() and x.size and cuda.layer_norm_fits(x):
        return cuda.layer_norm(x, weight, bias, eps)
    if on_gpu() or x.dtype != mx.float32:
        return mx.fast.layer_norm(x, weight, bias, eps)
    xc = x - _row_sums(x) / x.shape[-1]
    return xc * mx.rsqrt(_row_sums(xc * xc) / x.shape[-1] + eps) * weight + bias


def _dequantize_arith(w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int):
    # w: (O, I * bits / 32) uint32, scales/biases: (O, I / group_size) -> (O, I) float32
    rows = w.shape[0]
    words = group_size * bits // 32  # uint32 words per group
    shifts = mx.arange(0, 32, bits, dtype=mx.uint32)
    q = (w.reshape(rows, -1, words, 1) >> shifts) & ((1 << bits) - 1)  # (O, groups, words, 32/bits)
    s = scales.astype(mx.float32)[..., None, None]
    b = biases.astype(mx.float32)[..., None, None]
    return (q.astype(mx.float32) * s + b).reshape(rows, -1)  # one fused kernel, then a free view


def dequantize_float32(w, scales, biases, group_size: int, bits: int) -> mx.array:
    """Affine-quantized weights as float32, for a BLAS matmul on the CPU.

    A fused shift-mask-scale kernel with float32 scales: faster on the CPU than `mx.dequantize`
    with half-precision scales followed by a cast (which also rounds the weights to half
    precision on the way).
    """
    if 32 % bits or (group_size * bits) % 32 or not can_compile():  # else MLX's own
        return mx.dequantize(
            w, scales.astype(mx.float32), biases.astype(mx.float32), group_size, bits
        )
    return compiled(_dequantize_arith)(w, scales, biases, group_size, bits)


def _float16_bits(u: mx.array) -> mx.array:
    # float16 bits (uint16) -> the float32 bits of that value / 2**112; exponent 31 (inf, NaN)
    # becomes 255, so that the scaling below leaves it as it is
    u = u.astype(mx.uint32)
    special = ((u & 0x7C00) == 0x7C00).astype(mx.uint32) * 0x7F800000
    return ((u & 0x7FFF) << 13) | ((u & 0x8000) << 16) | special


# MLX's x86-64 wheels convert float16 in software, one value at a time (ARM has instructions).
SOFTWARE_FLOAT16 = platform.machine().lower() in ("x86_64", "amd64")


def widen(w: mx.array, dtype: mx.Dtype) -> mx.array:
    """`w` as `dtype`. float16 to float32 on an x86-64 CPU by integer arithmetic that the
    compiler vectorises, where MLX's conversion is a scalar loop: the same value for every
    float16 (infinities and NaN included; tested over all 65536)."""
    fast = SOFTWARE_FLOAT16 and not on_gpu() and can_compile()
    if not fast or w.dtype != mx.float16 or dtype != mx.float32:
        return w.astype(dtype)
    scaled = compiled(_float16_bits)(w.view(mx.uint16)).view(mx.float32)
    return scaled * 2.0**112  # exact; subnormal float16 values become normal float32 ones


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
    # x * scale / 32 = t in [EXP_FLOOR / 32, 0]; returns exp(t) - 1 (7 dependent operations)
    t = x * (scale * 0.5**EXP_SQUARINGS)
    return t * _poly6(EXPM1_P, t)


def _square_up(r: mx.array) -> mx.array:
    # exp(t) - 1 -> exp(32 t), carried as r = exp(.) - 1 (11 dependent operations)
    for _ in range(EXP_SQUARINGS):
        r = r * (2.0 + r)
    return 1.0 + r


def exp_neg_approx(x: mx.array, scale: float = 1.0, fused: bool = False) -> mx.array:
    """exp(x * scale) for x * scale <= 0, from plain arithmetic: absolute error <= 2.5e-7.

    Squares exp(x / 32) five times, carried as r = exp(.) - 1 (r <- r (2 + r)) so that no
    rounding near 1 is amplified; softmax only needs this absolute accuracy. `fused` (attention
    on the CPU): the clamp at EXP_FLOOR in MLX's own kernel (see `gelu_approx`), then two
    compiled kernels (see `_poly6` on depth). Tested in tests/test_ops.py.
    """
    x = mx.maximum(x, EXP_FLOOR / scale)
    if fused:
        return compiled(_square_up)(compiled(_expm1_small, scale=scale)(x))
    return _square_up(_expm1_small(x, scale))


def _attention_cpu(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    s = q @ k.swapaxes(-1, -2)  # (B, H, Nq, Nk), unscaled
    e = exp_neg_approx(s - s.max(-1, keepdims=True), scale, fused=True)  # exp((s - max) scale)
    # Normalise after the product with v: a pass over (Nq, head_dim) instead of (Nq, Nk).
    return (e @ v) / _row_sums(e)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """softmax(q k^T * scale) v over (B, H, N, head_dim) arrays.

    MLX's fused kernel on the GPU; on the CPU a softmax with `exp_neg_approx`, whose exp is
    cheaper than the library one that dominates attention there.
    """
    if on_gpu() or q.dtype != mx.float32 or not can_compile():
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    return _attention_cpu(q, k, v, scale)
