"""The CPU fast paths: error bounds against float64 references, and model parity; and the GPU
branches' arithmetic, faked on the CPU.

Pinned to the CPU: these kernels are what MLX's CPU backend runs (the GPU uses MLX's own).
"""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import (
    HALF_BOUND,
    REF,
    build_reference_model,
    convert_fixture,
    gelu64,
    layer_norm64,
    rel_err,
    to_np,
)

import aim_mlx
from aim_mlx.models import ops

pytestmark = pytest.mark.usefixtures("pin_cpu")


GRID = np.linspace(-8.0, 8.0, 400_001)  # step 4e-5, covers the clamp at +-4 and beyond


def erf64(x: np.ndarray) -> np.ndarray:
    return np.array([math.erf(v) for v in x])


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
    # Far outside the fitted range: about 0 for large negative inputs, about x for large ones.
    big = np.array([-np.inf, -1e30, -1e4, -20.0, 20.0, 1e4, 1e30], dtype=np.float32)
    out = to_np(fn(mx.array(big)))
    assert np.abs(out[:4]).max() <= 3e-7
    assert np.abs(out[4:] / big[4:] - 1).max() <= 2e-7


def test_gelu_matches_mlx_exact_gelu():
    x = mx.random.normal((64, 1024), key=mx.random.key(0)) * 3
    assert np.abs(to_np(ops.gelu(x)) - to_np(nn.gelu(x))).max() <= 2e-6


def test_gelu_keeps_other_dtypes_exact():
    x = mx.random.normal((256,), key=mx.random.key(1)).astype(mx.float16)
    out = ops.gelu(x)
    assert out.dtype == mx.float16
    assert np.array_equal(to_np(out), to_np(nn.gelu(x)))


def test_exp_neg_approx_error_bound():
    x = np.concatenate([np.linspace(-40.0, 0.0, 400_001), [-1e30, -np.inf]]).astype(np.float32)
    ref = np.exp(x.astype(np.float64))
    for fn in (ops.exp_neg_approx, lambda a: ops.exp_neg_approx(a, fused=True)):
        out = np.array(fn(mx.array(x)), dtype=np.float64)
        assert np.abs(out - ref).max() <= 2.5e-7
        near = x >= -1.0
        assert (np.abs(out - ref)[near] / ref[near]).max() <= 5e-7
        assert out.min() >= 0.0 and out[-1] == 0.0 and out[x == 0.0][0] == 1.0


@pytest.mark.parametrize("width", [1536, 7])
@pytest.mark.parametrize("mean, std", [(5.0, 3.0), (100.0, 1.0)])
def test_layer_norm_against_float64(width, mean, std):
    keys = mx.random.split(mx.random.key(3), 3)
    x = mx.random.normal((2, 32, width), key=keys[0]) * std + mean
    w, b = (mx.random.normal((width,), key=k) for k in keys[1:])
    out = to_np(ops.layer_norm(x, w, b, 1e-6))
    # float32 rounding of the row means, relative to the spread they are subtracted from
    bound = 8e-6 * (1 + mean / std)
    assert np.abs(out - layer_norm64(to_np(x), to_np(w), to_np(b), 1e-6)).max() <= bound


def test_layer_norm_keeps_other_dtypes_exact():
    x = mx.random.normal((4, 64), key=mx.random.key(4)).astype(mx.float16)
    w, b = mx.ones((64,), mx.float16), mx.zeros((64,), mx.float16)
    np.testing.assert_array_equal(
        to_np(ops.layer_norm(x, w, b, 1e-6)), to_np(mx.fast.layer_norm(x, w, b, 1e-6))
    )


def attention64(q, k, v, scale):
    qn, kn, vn = (to_np(a).astype(np.float64) for a in (q, k, v))
    s = qn @ kn.transpose(0, 1, 3, 2) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ vn


@pytest.mark.parametrize("spread", [1.0, 30.0])  # near-uniform and very peaked attention
def test_attention_matches_float64(spread):
    keys = mx.random.split(mx.random.key(2), 3)
    q, k, v = (mx.random.normal((2, 3, 17, 16), key=kk) for kk in keys)
    q = q * spread
    ref = attention64(q, k, v, 0.25)
    err = np.abs(to_np(ops.attention(q, k, v, 0.25)) - ref).max()
    fused = to_np(mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25))
    # As accurate as MLX's own kernel (with peaked attention float32 scores limit both).
    assert err <= 2 * np.abs(fused - ref).max() + 1e-6


def test_attention_one_query_strided_inputs():
    """The head's shape: one broadcast query; k and v transposed views, as the model makes them."""
    x = mx.random.normal((2, 40, 3, 4, 16), key=mx.random.key(5)).transpose(2, 0, 3, 1, 4)
    q = mx.broadcast_to(mx.random.normal((1, 4, 1, 16), key=mx.random.key(6)), (2, 4, 1, 16))
    out = to_np(ops.attention(q, x[1], x[2], 0.25))
    assert out.shape == (2, 4, 1, 16)
    assert np.abs(out - attention64(q, x[1], x[2], 0.25)).max() <= 2e-6


def test_fast_paths_keep_reference_parity(variant):
    """The float32 model with the CPU fast paths stays within 1e-4 x std of PyTorch."""
    model = build_reference_model(variant)
    x = mx.array(np.load(REF / "input.npy"))
    ref = np.load(REF / f"logits_{variant}.npy")
    assert rel_err(to_np(model(x)), ref) <= 1e-4


@pytest.fixture(params=[True, False], ids=["bit-arithmetic", "mlx-astype"])
def float16_path(request, monkeypatch):
    """Both ways `ops.widen` may take, whatever this machine's architecture (and that it took
    the one asked for)."""
    calls = []
    original = ops._float16_bits
    monkeypatch.setattr(ops, "SOFTWARE_FLOAT16", request.param)
    monkeypatch.setattr(ops, "_float16_bits", lambda u: calls.append(1) or original(u))
    yield
    assert bool(calls) == request.param


@pytest.mark.usefixtures("float16_path")
def test_widen_float16_every_value():
    """Every float16 bit pattern widens to the float32 that MLX's own conversion (and numpy's)
    gives: zeros, subnormals, the largest values, infinities; NaN stays NaN."""
    every = mx.arange(1 << 16, dtype=mx.uint32).astype(mx.uint16).view(mx.float16)
    out = ops.widen(every, mx.float32)
    assert out.dtype == mx.float32 and out.shape == (1 << 16,)
    got, mlx_own = np.array(out), np.array(every.astype(mx.float32))
    nan = np.isnan(np.array(every).astype(np.float32))
    assert nan.sum() == 2 * 1023 and np.isnan(got[nan]).all()
    assert np.array_equal(got[~nan].view(np.uint32), mlx_own[~nan].view(np.uint32))
    assert np.array_equal(got[~nan], np.array(every).astype(np.float32)[~nan])


@pytest.mark.usefixtures("float16_path")
def test_widen_views_and_other_dtypes():
    w = (0.05 * mx.random.normal((64, 48), key=mx.random.key(5))).astype(mx.float16)
    for view in (w[8:40], w.T, w[:, ::3]):  # a row slice, a transpose, a strided view
        assert np.array_equal(
            np.array(ops.widen(view, mx.float32)), np.array(view.astype(mx.float32))
        )
    for dtype, target in ((mx.bfloat16, mx.float32), (mx.float16, mx.bfloat16)):
        a = w.astype(dtype)
        assert ops.widen(a, target).dtype == target
        assert np.array_equal(to_np(ops.widen(a, target)), to_np(a.astype(target)))


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


@pytest.mark.parametrize("gpu_branch", [False, True], ids=["cpu", "gpu-branch"])
@pytest.mark.parametrize("quantized", [False, True])
def test_qkv_heads_split_the_projection_into_heads(monkeypatch, gpu_branch, quantized):
    """q, k, v per head, whichever way they are computed (one matmul viewed as heads, or a
    product per head), equal x @ W.T cut into q, k, v and heads; a shard's rows of each give
    its heads of each."""
    from aim_mlx.models.layers import Linear

    B, N, D, H = 2, 7, 32, 4
    layer = Linear.of(mx.random.normal((3 * D, D), key=mx.random.key(10)))
    if quantized:
        layer = layer.to_quantized(group_size=32, bits=8)
    x = mx.random.normal((B, N, D), key=mx.random.key(11))
    w = np.asarray(layer.weight_as(mx.float32), dtype=np.float64)
    ref = (
        (np.asarray(x, dtype=np.float64) @ w.T).reshape(B, N, 3, H, D // H).transpose(2, 0, 3, 1, 4)
    )
    monkeypatch.setattr(ops, "on_gpu", lambda: gpu_branch)  # the arithmetic runs on the CPU
    if gpu_branch:
        monkeypatch.setattr(ops, "quantized_kernels", lambda: False)
    shard = layer.rows((8, 24), (40, 56), (72, 88))  # heads 1 and 2 of q, k and v
    for heads, qkv, first in ((H, layer, 0), (2, shard, 1)):
        for out, expected in zip(ops.qkv_heads(x, qkv, heads), ref, strict=True):
            assert out.shape == (B, heads, N, D // H)
            assert rel_err(to_np(out), expected[:, first : first + heads]) <= 1e-6


def test_gpu_forward_gathers_nothing(monkeypatch):
    """The GPU branch's forward is matmuls, fused kernels and views: no Gather (an integer index
    such as `qkv[0]` is one: a copy, which took 28% of aim-600M's forward on an H100)."""
    import io

    monkeypatch.setattr(ops, "on_gpu", lambda: True)  # the graph is built, never run
    monkeypatch.setattr(ops, "cuda_kernels", lambda: False)  # (custom kernels: GPU streams only)
    from aim_mlx.models import AIM, ModelArgs

    model = AIM(ModelArgs(embed_dim=64, num_blocks=4, num_heads=4, probe_layers=(2, 3)))
    graph = io.StringIO()
    mx.export_to_dot(graph, model(mx.zeros((2, 3, 56, 56))))
    labels = graph.getvalue()
    assert '"Matmul"' in labels or '"AddMM"' in labels  # the graph is there
    assert '"Gather"' not in labels


@pytest.mark.parametrize(
    "weights, input_name, bound",
    [
        ("float32", "input.npy", 1e-4),
        ("float32", "input_252x196.npy", 1e-4),
        ("float16", "input.npy", HALF_BOUND["float16"]),
        ("bfloat16", "input_252x196.npy", HALF_BOUND["bfloat16"]),
        ("q8", "input.npy", 0.05),  # float16 with an 8-bit trunk: 0.032 x std on the CPU's path
    ],
)
def test_metal_branch_on_the_cpu_matches_the_reference(
    monkeypatch, tmp_path, converted, weights, input_name, bound
):
    """The forward that Metal runs (MLX's fused attention and layer norm, q, k, v as views, the
    residual in the matmul, the blocks on one stream, half precision computed as it is stored,
    quantized layers by MLX's quantized kernel), its arithmetic done by MLX's CPU backend: the
    official logits, in CI."""
    monkeypatch.setattr(ops, "on_gpu", lambda: True)
    monkeypatch.setattr(mx.cuda, "is_available", lambda: False)  # Metal's branch, not CUDA's
    assert ops.quantized_kernels() and ops.fused_residual() and not ops.cuda_kernels()
    called = {"quantized_matmul": 0, "scaled_dot_product_attention": 0, "layer_norm": 0}
    for name, module in (("quantized_matmul", mx), ("scaled_dot_product_attention", mx.fast),
                         ("layer_norm", mx.fast)):  # fmt: skip
        original = getattr(module, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            called[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    if weights == "q8":
        folder = convert_fixture(tmp_path / "q8", dtype="float16", quantize=True, q_bits=8)
    else:
        folder = converted["best", weights]
    model = aim_mlx.load(folder)
    assert model.activation_dtype() == model.dtype  # nothing widened
    suffix = input_name.removeprefix("input").removesuffix(".npy")
    ref = np.load(REF / f"logits_best{suffix}.npy")
    x = mx.array(np.load(REF / input_name))
    assert {f.dtype for f in model.extract_features(x)} == {model.dtype}
    out = to_np(model(x))
    assert rel_err(out, ref) < bound
    assert called["scaled_dot_product_attention"] and called["layer_norm"]
    assert bool(called["quantized_matmul"]) == (weights == "q8")


def test_quantized_linear_on_cpu_uses_float32():
    from aim_mlx.models.layers import Linear

    lin = Linear(128, 64)
    lin.weight = (0.05 * mx.random.normal((64, 128), key=mx.random.key(3))).astype(mx.float16)
    q = lin.to_quantized(group_size=64, bits=4)
    x = mx.random.normal((5, 128), key=mx.random.key(4))
    w = mx.dequantize(q.weight, q.scales.astype(mx.float32), q.biases.astype(mx.float32), 64, 4)
    out = q(x)
    assert out.dtype == mx.float32
    assert np.abs(to_np(out) - to_np(x @ w.T)).max() <= 1e-5


def test_nn_quantize_by_hand_keeps_its_mode_and_defaults():
    """`nn.quantize(model, ...)` on an AIM: the mode asked for (not affine whatever it is), and
    MLX's own group size and bits when none are given (as for MLX's layers)."""
    from aim_mlx.models.layers import Linear

    lin = Linear(128, 64)
    lin.weight = 0.05 * mx.random.normal((64, 128), key=mx.random.key(3))
    x = mx.random.normal((5, 128), key=mx.random.key(4))
    for kwargs, expect in [
        (dict(group_size=32, bits=4, mode="mxfp4"), ("mxfp4", 32, 4)),
        (dict(), ("affine", 64, 4)),  # what nn.QuantizedLinear picks
    ]:
        model = nn.Sequential(lin)
        nn.quantize(model, **kwargs)
        q = model.layers[0]
        assert (q.mode, q.group_size, q.bits) == expect
        w, scales, *biases = mx.quantize(lin.weight, expect[1], expect[2], mode=expect[0])
        dense = mx.dequantize(w, scales, *(biases or [None]), expect[1], expect[2], mode=expect[0])
        assert np.abs(to_np(q(x)) - to_np(x @ dense.T)).max() <= 1e-5


def test_quantizing_the_inputs_is_refused_by_name():
    """nn.quantize(..., quantize_input=True) asks for MLX's activation-quantized layers, which
    AIM's do not offer: a ValueError saying so (was a TypeError about the keyword)."""
    from aim_mlx.models.layers import Linear

    with pytest.raises(ValueError, match="quantize their weights only, not their inputs"):
        nn.quantize(nn.Sequential(Linear(64, 32)), mode="nvfp4", quantize_input=True)


def test_quantized_linear_dequantizes_where_mlx_cuda_runs_it(monkeypatch):
    # On MLX's CUDA backend (faked here: the arithmetic runs on the CPU) a quantized layer is a
    # dense matmul in the activations' dtype on its dequantized weights, not MLX's kernel.
    from aim_mlx.models.layers import Linear

    monkeypatch.setattr(ops, "on_gpu", lambda: True)
    monkeypatch.setattr(mx.cuda, "is_available", lambda: True)
    assert not ops.widen_low_precision() and not ops.quantized_kernels()
    monkeypatch.setattr(mx, "quantized_matmul", None)  # calling it would fail
    lin = Linear(128, 64)
    lin.weight = (0.05 * mx.random.normal((64, 128), key=mx.random.key(3))).astype(mx.float16)
    q = lin.to_quantized(group_size=64, bits=8)
    x = mx.random.normal((5, 128), key=mx.random.key(4)).astype(mx.float16)
    w = mx.dequantize(q.weight, q.scales, q.biases, 64, 8)
    out = q(x)
    assert out.dtype == mx.float16
    assert np.abs(to_np(out) - to_np(x @ w.T)).max() <= 2e-3  # float16 rounding of the sums


def test_linear_adds_the_residual_in_the_matmul_only_on_a_gpu(monkeypatch):
    from aim_mlx.models.layers import Linear

    layer = Linear(64, 32)
    x = mx.random.normal((3, 64), key=mx.random.key(5))
    r = mx.random.normal((3, 32), key=mx.random.key(6))
    monkeypatch.setattr(ops, "on_gpu", lambda: False)
    assert not ops.fused_residual()  # the CPU: a separate addition, exactly as written
    np.testing.assert_array_equal(to_np(layer(x, add=r)), to_np(r + x @ layer.weight.T))
    monkeypatch.setattr(ops, "on_gpu", lambda: True)
    monkeypatch.setattr(mx, "addmm", lambda c, a, b: ("addmm", c, a, b))
    assert layer(x, add=r)[0] == "addmm"
