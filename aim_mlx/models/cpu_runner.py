"""How the trunk runs on MLX's CPU backend: the work over CPU streams, the cores over the BLAS.

MLX runs each CPU stream's kernels on its own thread, and its element-wise kernels (GELU, softmax,
layer norms) are single-threaded: with one stream, all cores but one idle through them. So the
blocks run on `streams()` CPU streams at once, with the BLAS on cores // streams threads each:

- several images: each stream takes its share of the batch through every block;
- one image: each stream takes its share of the tokens through the per-token steps of a block
  (`Block.queries_keys_values`, `Block.update`), and every share's queries attend over the keys
  and values of all shares: the one point per block where the streams wait for each other.

Half-precision and quantized weights are widened once per block (`Block.widened`) for all streams.

MLX's CPU allocator keeps only 32 MB of freed buffers for reuse; every larger buffer (a layer's
widened weights, a batch's activations) then comes fresh from the operating system, and its pages
are faulted in again on every use. The first forward pass raises that cache limit to
`AIM_MLX_CPU_CACHE_MB` (default 1024; `off` keeps MLX's; a higher limit already set is kept).
It bounds what the cache may hold, not what is allocated: MLX's peak memory does not change,
while the process may keep up to that much more resident between passes.

Settings, read each time a forward pass is built: `AIM_MLX_CPU_STREAMS` (default 2 where there
are several cores; 1 turns the split off) and `AIM_MLX_CPU_CORES` (the cores this process may use;
default all of them; a launcher that runs several processes on one machine divides them).
"""

from __future__ import annotations

import os
from functools import lru_cache

import mlx.core as mx

from .. import blas
from ..errors import OptionError
from ..runtime import switched_off

STREAMS_ENV = "AIM_MLX_CPU_STREAMS"
CORES_ENV = "AIM_MLX_CPU_CORES"
CACHE_ENV = "AIM_MLX_CPU_CACHE_MB"
CACHE_MB = 1024


def cores() -> int:
    """The cores this process may use (`AIM_MLX_CPU_CORES`, default all)."""
    return max(1, int(os.environ.get(CORES_ENV) or os.cpu_count() or 1))


def streams() -> int:
    """How many CPU streams the blocks run on (`AIM_MLX_CPU_STREAMS`; default 2, 1 on one core)."""
    default = "2" if cores() > 1 else "1"
    return max(1, int(os.environ.get(STREAMS_ENV) or default))


def cache_mb() -> int | None:
    """The buffer cache `AIM_MLX_CPU_CACHE_MB` asks for, in MB (None: "off", leave MLX's)."""
    if switched_off(CACHE_ENV):
        return None
    value = os.environ.get(CACHE_ENV, "").strip() or str(CACHE_MB)
    if not value.isdigit():
        raise OptionError(f"{CACHE_ENV}={value!r}: expected a whole number of MB, or 'off'")
    return int(value)


def describe_cache() -> str:
    """One line for `aim-mlx info` and `bench`: the buffer cache limit the CPU path asks for."""
    mb = cache_mb()
    if mb is None:
        return f"MLX's own ({CACHE_ENV}=off)"
    return f"at least {mb} MB, from the first forward pass"


@lru_cache(maxsize=1)
def _raise_cache_limit() -> None:
    """Once per process: MLX's buffer cache to at least `cache_mb()` MB."""
    mb = cache_mb()
    if mb is not None:
        previous = mx.set_cache_limit(mb << 20)
        if previous > mb << 20:
            mx.set_cache_limit(previous)


@lru_cache(maxsize=4)
def _new_streams(n: int) -> tuple:
    return tuple(mx.new_stream(mx.cpu) for _ in range(n))


def _bounds(size: int, parts: int) -> list[int]:
    return [size * i // parts for i in range(1, parts)]


def run_blocks(blocks, x: mx.array) -> list[mx.array]:
    """Outputs of `blocks` applied in turn to x (B, N, D), each (B, N, D).

    The BLAS thread count is process-wide: it is set here to cores // streams, the same for
    every forward pass under the same settings, so the graphs built before an evaluation agree.
    """
    _raise_cache_limit()
    n = min(streams(), x.shape[1])
    default = n == 1 and not os.environ.get(CORES_ENV)  # OPENBLAS_NUM_THREADS or all cores
    blas.set_threads(None if default else max(1, cores() // n))
    if n < 2:
        return _one_stream(blocks, x)
    if x.shape[0] >= n:  # each stream takes its share of the images through whole blocks
        return _split(blocks, x, _new_streams(n), axis=0, step=_images_step)
    return _split(blocks, x, _new_streams(n), axis=1, step=_tokens_step)


def _one_stream(blocks, x: mx.array) -> list[mx.array]:
    outputs = []
    for block in blocks:
        x = block(x)
        outputs.append(x)
    return outputs


def _split(blocks, x: mx.array, streams: tuple, axis: int, step) -> list[mx.array]:
    parts = mx.split(x, _bounds(x.shape[axis], len(streams)), axis=axis)
    outputs = []
    for block in blocks:
        with mx.stream(streams[0]):
            block = block.widened(x.dtype)  # narrow weights: widened once, for every stream
        parts = step(block, parts, streams)
        outputs.append(mx.concatenate(parts, axis=axis))  # lazy: only the probe layers are used
    return outputs


def _images_step(block, parts: list, streams: tuple) -> list[mx.array]:
    out = []
    for stream, part in zip(streams, parts, strict=True):
        with mx.stream(stream):
            out.append(block(part))
    return out


def _tokens_step(block, parts: list, streams: tuple) -> list[mx.array]:
    qkv = []
    for stream, part in zip(streams, parts, strict=True):
        with mx.stream(stream):
            qkv.append(block.queries_keys_values(part))  # each (B, H, n, head_dim)
    out = []
    for stream, part, (q, _, _) in zip(streams, parts, qkv, strict=True):
        with mx.stream(stream):
            k = mx.concatenate([t[1] for t in qkv], axis=2)  # every token's keys
            v = mx.concatenate([t[2] for t in qkv], axis=2)
            out.append(block.update(part, q, k, v))
    return out
