"""The CPU fast paths: error bounds against float64 references, and model parity."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import REF, build_reference_model, rel_err, to_np

from aim_mlx.models import ops

GRID = np.linspace(-8.0, 8.0, 400_001)  # step 4e-5, covers the clamp at +-4 and beyond


def erf64(x: np.ndarray) -> np.ndarray:
    return np.array([math.erf(v) for v in x])


def gelu64(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + erf64(x / math.sqrt(2.0)))


def test_erf_approx_error_bound():
    out = np.array(ops.erf_approx(mx.array(GRID.astype(np.float32))), dtype=np.float64)
    # float32 input rounding moves x by up to 6e-8 relative; erf' <= 1.13, so compare
    # against erf of the float32 input itself.
    ref = erf64(GRID.astype(np.float32).astype(np.float64))
    assert np.abs(out - ref).max() <= 4e-7
    assert np.all(np.abs(out) <= 1.0)


def test_erf_approx_odd_and_saturates():
    x = mx.array([0.0, 0.5, 4.0, 4.5, 100.0, 1e30])
    pos, neg = ops.erf_approx(x), ops.erf_approx(-x)
    assert to_np(pos).tolist() == (-to_np(neg)).tolist()
    assert to_np(pos)[0] == 0.0
    assert to_np(pos)[2:].tolist() == [1.0] * 4


@pytest.mark.parametrize("compiled", [False, True])
def test_gelu_error_bound(compiled):
    x32 = np.concatenate([GRID, np.linspace(-1e4, 1e4, 20_001)]).astype(np.float32)
    fn = ops.gelu if compiled else ops.gelu_approx
    out = np.array(fn(mx.array(x32)), dtype=np.float64)
    x = x32.astype(np.float64)
    err = np.abs(out - gelu64(x)) / np.maximum(1.0, np.abs(x))
    assert err.max() <= 1e-6
    # Large negative inputs give exactly 0, large positive ones exactly x.
    big = mx.array([-1e30, -1e4, -20.0, 20.0, 1e4])
    assert to_np(ops.gelu(big)).tolist() == [0.0, 0.0, 0.0, 20.0, 1e4]


def test_gelu_matches_mlx_exact_gelu():
    x = mx.random.normal((64, 1024), key=mx.random.key(0)) * 3
    assert np.abs(to_np(ops.gelu(x)) - to_np(nn.gelu(x))).max() <= 2e-6


def test_gelu_keeps_other_dtypes_exact():
    x = mx.random.normal((256,), key=mx.random.key(1)).astype(mx.float16)
    out = ops.gelu(x)
    assert out.dtype == mx.float16
    assert np.array_equal(to_np(out), to_np(nn.gelu(x)))


def test_attention_matches_numpy():
    keys = mx.random.split(mx.random.key(2), 3)
    q, k, v = (mx.random.normal((2, 3, 17, 16), key=kk) for kk in keys)
    out = to_np(ops.attention(q, k, v, 0.25))
    qn, kn, vn = (to_np(a).astype(np.float64) for a in (q, k, v))
    s = qn @ kn.transpose(0, 1, 3, 2) * 0.25
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = (p / p.sum(-1, keepdims=True)) @ vn
    assert np.abs(out - ref).max() <= 1e-5


def test_fast_paths_keep_reference_parity(variant):
    """The float32 model with the CPU fast paths stays within 1e-4 x std of PyTorch."""
    model = build_reference_model(variant)
    x = mx.array(np.load(REF / "input.npy"))
    ref = np.load(REF / f"logits_{variant}.npy")
    assert rel_err(to_np(model(x)), ref) <= 1e-4


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32])
def test_dequantize_float32_matches_mlx(bits, group_size, dtype):
    w = (0.02 * mx.random.normal((48, 256), key=mx.random.key(bits))).astype(dtype)
    packed, scales, biases = mx.quantize(w, group_size, bits)
    out = ops.dequantize_float32(packed, scales, biases, group_size, bits)
    assert out.dtype == mx.float32 and out.shape == (48, 256)
    s32, b32 = scales.astype(mx.float32), biases.astype(mx.float32)
    ref = to_np(mx.dequantize(packed, s32, b32, group_size, bits))
    assert np.abs(to_np(out) - ref).max() <= 1e-7


def test_quantized_linear_on_cpu_uses_float32():
    from aim_mlx.models.aim import Linear

    lin = Linear(128, 64)
    lin.weight = (0.05 * mx.random.normal((64, 128), key=mx.random.key(3))).astype(mx.float16)
    q = lin.to_quantized(group_size=64, bits=4)
    x = mx.random.normal((5, 128), key=mx.random.key(4))
    w = mx.dequantize(q.weight, q.scales.astype(mx.float32), q.biases.astype(mx.float32), 64, 4)
    out = q(x)
    assert out.dtype == mx.float32
    assert np.abs(to_np(out) - to_np(x @ w.T)).max() <= 1e-5
