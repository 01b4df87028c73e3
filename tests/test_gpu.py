"""The GPU path: what runs where MLX's default device is a GPU (Metal on a Mac; MLX's CUDA
backend as the stand-in elsewhere). Skipped, saying why, where the default device is the CPU."""

import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import (
    HALF_BOUND,
    REF,
    TF32_BOUND,
    convert_fixture,
    float32_bound,
    gelu64,
    layer_norm64,
    rel_err,
    to_np,
)

import aim_mlx
from aim_mlx import bench, runtime
from aim_mlx.models import cuda, ops
from aim_mlx.models.layers import Linear
from aim_mlx.resolve import default_dtype

pytestmark = pytest.mark.gpu

INPUTS = {"input.npy": "", "input_252x196.npy": "_252x196"}
# Logits against the reference, x std: float32 is the CPU's bound (TF32 off) or TF32's, half
# precision conftest's HALF_BOUND.


def test_gpu_defaults():
    assert ops.on_gpu() and not ops.widen_low_precision()
    assert default_dtype() == "float16"
    env = bench.environment()
    assert "GiB" in env["gpu"] and "command buffer" in env["gpu_runtime"]


@pytest.mark.parametrize("dtype", HALF_BOUND)
def test_native_half_precision_in_the_forward(converted, dtype):
    model = aim_mlx.load(converted["best", dtype])
    assert model.activation_dtype() == getattr(mx, dtype)  # no widening to float32
    x = mx.array(np.load(REF / "input.npy"))
    assert all(f.dtype == getattr(mx, dtype) for f in model.extract_features(x))
    assert model(x).dtype == mx.float32


@pytest.mark.parametrize("input_name", INPUTS)
@pytest.mark.parametrize("dtype", ["float32", *HALF_BOUND])
def test_parity_with_the_reference(converted, variant, dtype, input_name):
    model = aim_mlx.load(converted[variant, dtype])
    ref = np.load(REF / f"logits_{variant}{INPUTS[input_name]}.npy")
    out = np.array(model(mx.array(np.load(REF / input_name))))
    bound = float32_bound(1e-4) if dtype == "float32" else HALF_BOUND[dtype]
    assert out.shape == ref.shape and rel_err(out, ref) < bound  # so top-1 kept where clear


def test_quantized_model_matches_the_reference(tmp_path):
    # Metal runs MLX's quantized kernels; MLX's CUDA backend dequantizes one layer at a time
    # (its quantized kernels gave NaN logits on this fixture's layer shapes).
    out = convert_fixture(tmp_path / "q8", dtype="float16", quantize=True, q_bits=8)
    model = aim_mlx.load(out)
    assert isinstance(model.trunk.blocks[0].mlp.fc1, nn.QuantizedLinear)
    ref = np.load(REF / "logits_best.npy")
    logits = np.array(model(mx.array(np.load(REF / "input.npy"))))
    assert rel_err(logits, ref) < 0.05  # 8-bit trunk: 0.032 x std on the CPU


def softmax_attention_f64(q, k, v, scale):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = q @ k.swapaxes(-1, -2) * scale
    e = np.exp(s - s.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("n_query", [257, 1], ids=["self", "pooling"])
@pytest.mark.parametrize("dtype, bound", [("float32", 3e-5), ("float16", 1e-2)])
def test_fused_attention(n_query, dtype, bound):
    keys = mx.random.split(mx.random.key(3), 3)
    q = mx.random.normal((2, 4, n_query, 16), key=keys[0]).astype(getattr(mx, dtype))
    k, v = (mx.random.normal((2, 4, 257, 16), key=kk).astype(q.dtype) for kk in keys[1:])
    out = ops.attention(q, k, v, 0.25)
    fused = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25)
    np.testing.assert_array_equal(to_np(out), to_np(fused))  # the fused kernel is what runs
    ref = softmax_attention_f64(to_np(q), to_np(k), to_np(v), 0.25)
    assert rel_err(to_np(out), ref) < (float32_bound(bound) if dtype == "float32" else bound)


def test_gelu_and_layer_norm_kernels_against_float64():
    # MLX's kernels on Metal, aim-mlx's own on CUDA (unless AIM_MLX_CUDA_KERNELS=off).
    x = mx.random.normal((4099,), key=mx.random.key(4)) * 4  # not a whole number of vectors
    if not ops.cuda_kernels():
        np.testing.assert_array_equal(np.array(ops.gelu(x)), np.array(nn.gelu(x)))
    xs = np.array(x, np.float64)
    assert np.max(np.abs(np.array(ops.gelu(x)) - gelu64(xs)) / np.maximum(1, np.abs(xs))) < 2e-6
    rows = mx.random.normal((8, 3, 256), key=mx.random.key(5)) * 3 + 5
    w = mx.random.normal((256,), key=mx.random.key(6))
    b = mx.random.normal((256,), key=mx.random.key(7))
    out = np.array(ops.layer_norm(rows, w, b, 1e-6))
    assert np.abs(out - layer_norm64(rows, w, b, 1e-6)).max() < 1e-5


cuda_only = pytest.mark.skipif(
    not mx.cuda.is_available(), reason="aim-mlx's CUDA kernels run on MLX's CUDA backend"
)
# Largest error of one rounding to the dtype, relative: float16 2**-11, bfloat16 2**-8.
HALF_ULP = {"float16": 2.0**-11, "bfloat16": 2.0**-8}


@cuda_only
@pytest.mark.parametrize("dtype", HALF_ULP)
def test_cuda_gelu_in_half_precision_rounds_once(dtype):
    x = (mx.random.normal((3, 4099), key=mx.random.key(8)) * 4).astype(getattr(mx, dtype))
    for part in (x, x[:, 1:]):  # whole 16-byte vectors, and an input that is not aligned to them
        out = to_np(cuda.gelu(part))
        exact = gelu64(to_np(part))
        assert out.shape == exact.shape
        assert np.all(np.abs(out - exact) <= HALF_ULP[dtype] * np.abs(exact) + 1e-6)


@cuda_only
@pytest.mark.parametrize("dtype", HALF_ULP)
def test_cuda_layer_norm_in_half_precision(dtype):
    t = getattr(mx, dtype)
    x = (mx.random.normal((5, 7, 1536), key=mx.random.key(9)) * 2 + 3).astype(t)
    w = mx.random.normal((1536,), key=mx.random.key(10)).astype(t)
    b = mx.random.normal((1536,), key=mx.random.key(11)).astype(t)
    exact = layer_norm64(to_np(x), to_np(w), to_np(b), 1e-6)
    out = to_np(cuda.layer_norm(x, w, b, 1e-6))
    # float32 inside, one rounding of the output; the statistics' own error is far below it
    assert np.all(np.abs(out - exact) <= 2 * HALF_ULP[dtype] * np.abs(exact) + 1e-3)
    assert not cuda.layer_norm_fits(x[..., :1532])  # rows that are not whole vectors ...
    part = x[..., :1532]  # ... take MLX's kernel
    ref = mx.fast.layer_norm(part, w[:1532], b[:1532], 1e-6)
    np.testing.assert_array_equal(to_np(ops.layer_norm(part, w[:1532], b[:1532], 1e-6)), to_np(ref))


@cuda_only
def test_cuda_kernels_can_be_turned_off(monkeypatch):
    assert ops.cuda_kernels()
    monkeypatch.setenv(ops.CUDA_KERNELS_ENV, "off")
    assert not ops.cuda_kernels()
    x = mx.random.normal((1000,), key=mx.random.key(12))
    np.testing.assert_array_equal(np.array(ops.gelu(x)), np.array(nn.gelu(x)))


def test_residual_addition_is_done_by_the_matmul():
    layer = Linear(256, 384)
    x = mx.random.normal((2, 50, 256), key=mx.random.key(13))
    r = mx.random.normal((2, 50, 384), key=mx.random.key(14))
    assert ops.fused_residual()
    out, separate = to_np(layer(x, add=r)), to_np(r + layer(x))
    assert np.abs(out - separate).max() < float32_bound(1e-5) * separate.std()


MATMUL = """
import aim_mlx, mlx.core as mx, numpy as np
a = mx.random.normal((512, 1024), key=mx.random.key(0))
b = mx.random.normal((1024, 512), key=mx.random.key(1))
ref = np.array(a, np.float64) @ np.array(b, np.float64)
print(float(np.abs(np.array(a @ b) - ref).max() / ref.std()))
"""


def matmul_error(tf32: str) -> float:
    env = {**os.environ, runtime.TF32_ENV: tf32}
    out = subprocess.run([sys.executable, "-c", MATMUL], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return float(out.stdout)


def test_float32_matmul_is_full_precision_with_tf32_off():
    assert matmul_error("0") < 1e-5  # float32 accumulation over 1024 terms: about 1e-6


@pytest.mark.skipif(not mx.cuda.is_available(), reason="TF32 by default is CUDA's")
def test_tf32_is_on_by_default_on_cuda_and_within_its_bound():
    error = matmul_error("1")
    assert 1e-5 < error < TF32_BOUND  # TF32 keeps 10 mantissa bits: about 1e-3
