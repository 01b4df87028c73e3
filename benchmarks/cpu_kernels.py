"""aim-mlx's CPU element-wise kernels against the formulations they replaced, side by side.

    python benchmarks/cpu_kernels.py [--rounds 7] [--tokens 128]

On MLX's CPU backend a kernel made by `mx.compile` is a plain C++ loop that the compiler
vectorises only when every operation in it is simple arithmetic: a maximum or minimum inside
(as in a clamp) turns the whole loop into scalar code, and MLX's reductions are scalar loops
too. The present kernels keep the clamps in MLX's own (vectorised) element-wise kernels and
send row sums to the BLAS as products with a vector of ones. MLX's float16 to float32
conversion on x86-64 is a scalar loop in software; the present one is integer arithmetic in a
compiled kernel. Each row here times the previous formulation ("before") and the present one
("after") alternately, on one thread (one CPU stream, one BLAS thread), with aim-mlx's CPU buffer
cache, at aim-600M's shapes for `--tokens` tokens of one image (128: as many values as one
stream's share at batch 1; the weight: one stream's share of fc1's); the median over rounds of
each, and their ratio per round.
"""

from __future__ import annotations

import argparse
import statistics
import time

import aim_mlx  # noqa: F401  (first: it loads an optimized BLAS before mlx.core)

# isort: split
import mlx.core as mx

from aim_mlx import blas
from aim_mlx.models import cpu_runner, ops

D, HIDDEN, HEADS, HEAD_DIM, ALL_TOKENS = 1536, 6144, 12, 128, 256


def gelu_before():
    def f(x):  # the clamps inside the compiled kernel
        t = mx.clip(x, -ops.GELU_CLAMP, ops.GELU_CLAMP)
        s = t * t
        q = ops._poly6(ops.GELU_Q, s)
        x = mx.maximum(x, -ops.GELU_CLAMP)
        return ((x * t) * ops._poly6(ops.GELU_P, s) + (0.5 * x) * q) / q

    return mx.compile(f)


def exp_before(scale: float):
    def small(s, m):  # the clamp inside the compiled kernel
        t = mx.maximum((s - m) * (scale / 32), ops.EXP_FLOOR / 32)
        return t * ops._poly6(ops.EXPM1_P, t)

    small, square = mx.compile(small), mx.compile(ops._square_up)
    return lambda s, m: square(small(s, m))


def attention_before(q, k, v, scale, exp):
    s = q @ k.swapaxes(-1, -2)
    e = exp(s, s.max(-1, keepdims=True))
    return (e @ v) / e.sum(-1, keepdims=True)


def cases(tokens: int):
    keys = iter(mx.random.split(mx.random.key(0), 9))
    h = mx.random.normal((1, tokens, HIDDEN), key=next(keys)) * 2
    x = mx.random.normal((1, tokens, D), key=next(keys)) * 3 + 1
    w, b = (mx.random.normal((D,), key=next(keys)) for _ in range(2))
    q = mx.random.normal((1, HEADS, tokens, HEAD_DIM), key=next(keys))
    k, v = (mx.random.normal((1, HEADS, ALL_TOKENS, HEAD_DIM), key=next(keys)) for _ in range(2))
    s = q @ k.swapaxes(-1, -2)
    m = s.max(-1, keepdims=True)
    fc1_share = mx.random.normal((HIDDEN // 2, D), key=next(keys)).astype(mx.float16)
    mx.eval(h, x, w, b, q, k, v, s, m, fc1_share)
    scale = HEAD_DIM**-0.5
    old_gelu, old_exp = gelu_before(), exp_before(scale)
    return {
        f"GELU ({tokens} x {HIDDEN})": (lambda: old_gelu(h), lambda: ops.gelu(h)),
        f"softmax exp ({HEADS} x {tokens} x {ALL_TOKENS})": (
            lambda: old_exp(s, m),
            lambda: ops.exp_neg_approx(s - m, scale, fused=True),
        ),
        f"layer norm ({tokens} x {D})": (
            lambda: mx.fast.layer_norm(x, w, b, 1e-6),
            lambda: ops.layer_norm(x, w, b, 1e-6),
        ),
        f"attention ({HEADS} heads, {tokens} queries, {ALL_TOKENS} keys)": (
            lambda: attention_before(q, k, v, scale, old_exp),
            lambda: ops.attention(q, k, v, scale),
        ),
        f"float16 to float32 ({HIDDEN // 2} x {D})": (
            lambda: fc1_share.astype(mx.float32),
            lambda: ops.widen(fc1_share, mx.float32),
        ),
    }


def seconds(fn, repeats: int = 5) -> float:
    mx.eval(fn())  # warm: compile, allocate
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        best = min(best, time.perf_counter() - start)
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--tokens", type=int, default=128)
    a = p.parse_args()
    mx.set_default_device(mx.cpu)
    mx.set_cache_limit(cpu_runner.CACHE_MB << 20)
    blas.set_threads(1)
    print(f"MLX {mx.__version__}, {blas.describe()}, one thread")
    print("| kernel | before ms | after ms | after / before speed |")
    print("| --- | --- | --- | --- |")
    for name, (before, after) in cases(a.tokens).items():
        times = [(seconds(before), seconds(after)) for _ in range(a.rounds)]
        b, n = (statistics.median(t[i] for t in times) for i in (0, 1))
        ratios = [t[0] / t[1] for t in times]
        print(
            f"| {name} | {b * 1e3:.3f} | {n * 1e3:.3f} | {statistics.median(ratios):.2f}x "
            f"({min(ratios):.2f}x-{max(ratios):.2f}x) |"
        )


if __name__ == "__main__":
    main()
