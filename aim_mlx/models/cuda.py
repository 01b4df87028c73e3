"""Hand-written kernels for MLX's CUDA backend (`mx.fast.cuda_kernel`, compiled on first use).

MLX's own layer norm and GELU move data well below an H100's bandwidth (the figures:
benchmarks/README.md, "The GPU lane"). These kernels read each value from memory once and write
it once (the layer norm's later passes over a row hit the cache), 16 bytes per load and store,
computing in float32. `ops` uses them on CUDA only. MLX compiles them at first use with the same
NVRTC JIT as its own compiled kernels (its GELU is one), so they run wherever MLX's CUDA backend
does.
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx

VECTOR_BYTES = 16

# y = x Phi(x) = 0.5 x (1 + erf(x / sqrt 2)), V values per thread.
_GELU = """
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

# One warp per row of D values (D a multiple of V): the mean, then the variance around it (a
# second pass over the row, from cache), then (x - mean) / sqrt(var + eps) * w + b.
_LAYER_NORM = """
    constexpr int V = 16 / sizeof(T);
    int D = x_shape[x_ndim - 1];
    size_t rows = 1;
    for (int d = 0; d < x_ndim - 1; ++d) rows *= x_shape[d];
    size_t row = (size_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const T* xr = x + row * D;
    T* yr = y + row * D;
    int vectors = D / V;
    float sum = 0.0f;
    for (int i = lane; i < vectors; i += 32) {
        auto v = load_vector<V>(xr, i);
        #pragma unroll
        for (int j = 0; j < V; ++j) sum += static_cast<float>(v[j]);
    }
    for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffff, sum, o);
    float mean = sum / D;
    float squares = 0.0f;
    for (int i = lane; i < vectors; i += 32) {
        auto v = load_vector<V>(xr, i);
        #pragma unroll
        for (int j = 0; j < V; ++j) {
            float c = static_cast<float>(v[j]) - mean;
            squares += c * c;
        }
    }
    for (int o = 16; o > 0; o /= 2) squares += __shfl_xor_sync(0xffffffff, squares, o);
    float rstd = rsqrtf(squares / D + eps[0]);
    for (int i = lane; i < vectors; i += 32) {
        auto v = load_vector<V>(xr, i);
        auto wv = load_vector<V>(w, i);
        auto bv = load_vector<V>(b, i);
        #pragma unroll
        for (int j = 0; j < V; ++j) {
            float c = (static_cast<float>(v[j]) - mean) * rstd;
            v[j] = static_cast<T>(c * static_cast<float>(wv[j]) + static_cast<float>(bv[j]));
        }
        store_vector<V>(yr, i, v);
    }
"""

THREADS = 256
SOURCES = {"gelu": (_GELU, ["x"]), "layer_norm": (_LAYER_NORM, ["x", "w", "b", "eps"])}


@cache
def _kernel(name: str):
    source, inputs = SOURCES[name]
    return mx.fast.cuda_kernel(
        name=f"aim_mlx_{name}", input_names=inputs, output_names=["y"], source=source
    )


def gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU of x, any shape, in x's dtype."""
    per_thread = VECTOR_BYTES // x.itemsize
    (y,) = _kernel("gelu")(
        inputs=[x],
        template=[("T", x.dtype)],
        grid=(-(-x.size // per_thread), 1, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[x.shape],
        output_dtypes=[x.dtype],
    )
    return y


def layer_norm_fits(x: mx.array) -> bool:
    """Whether `layer_norm` takes x: rows of whole 16-byte vectors."""
    return x.ndim >= 1 and x.shape[-1] % (VECTOR_BYTES // x.itemsize) == 0


def layer_norm(x: mx.array, weight: mx.array, bias: mx.array, eps: float) -> mx.array:
    """Layer norm over x's last axis (`layer_norm_fits(x)`); weight and bias in x's dtype."""
    rows = x.size // x.shape[-1]
    (y,) = _kernel("layer_norm")(
        inputs=[x, weight, bias, mx.array([eps], dtype=mx.float32)],
        template=[("T", x.dtype)],
        grid=(rows * 32, 1, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[x.shape],
        output_dtypes=[x.dtype],
    )
    return y
