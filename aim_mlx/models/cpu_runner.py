"""How the trunk runs on MLX's CPU backend: the work over CPU streams, the cores over the BLAS.

MLX runs each CPU stream's kernels on its own thread, and its element-wise kernels (GELU, softmax,
layer norms) are single-threaded: with one stream, all cores but one idle through them. So the
blocks run on `streams()` CPU streams at once, with the BLAS on cores // streams threads each:

- a batch that divides evenly over the streams (or a large one): each stream takes its share of
  the images through whole blocks; half-precision and quantized weights are widened once per
  block (`widened_block`) for all streams;
- one image, or a few that do not divide evenly: each stream takes its share of every block's
  work for all the images (`shard_block`: its heads, its share of each layer's output
  features), and widens only that share. The streams join their shares four times a block (a
  copy each time), so that every matmul has all the tokens' rows: the BLAS runs faster per
  thread on them than on a share of the tokens.

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

import copy
import os
import threading
from functools import lru_cache

import mlx.core as mx

from .. import blas
from ..errors import SettingError
from ..runtime import switched_off
from .layers import share

STREAMS_ENV = "AIM_MLX_CPU_STREAMS"
CORES_ENV = "AIM_MLX_CPU_CORES"
CACHE_ENV = "AIM_MLX_CPU_CACHE_MB"
CACHE_MB = 1024
MAX_BYTES = 2**64 - 1  # the largest cache limit MLX takes (a size_t)
SHARDS_BELOW = 4  # images a stream: smaller uneven batches are sharded (benchmarks/README.md)


def _positive(name: str) -> int | None:
    """The positive whole number environment variable `name` holds, or None when it is unset."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    if not value.isdecimal() or int(value) < 1:  # isdigit() passes "²"
        raise SettingError(f"{name}={value!r}: expected a whole number of 1 or more (or unset)")
    return int(value)


def cores() -> int:
    """The cores this process may use (`AIM_MLX_CPU_CORES`, default all it may run on)."""
    return _positive(CORES_ENV) or machine_cores()


def machine_cores() -> int:
    """The cores this process may run on: its CPU affinity (`taskset`, a container's cpuset),
    which OpenBLAS counts too, where the system has one; else the machine's."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # macOS
        return os.cpu_count() or 1


def streams() -> int:
    """How many CPU streams the blocks run on (`AIM_MLX_CPU_STREAMS`; default 2, 1 on one core)."""
    return _positive(STREAMS_ENV) or (2 if cores() > 1 else 1)


def cache_mb() -> int | None:
    """The buffer cache `AIM_MLX_CPU_CACHE_MB` asks for, in MB (None: "off", leave MLX's)."""
    if switched_off(CACHE_ENV):
        return None
    value = os.environ.get(CACHE_ENV, "").strip() or str(CACHE_MB)
    if not value.isdecimal():
        raise SettingError(f"{CACHE_ENV}={value!r}: expected a whole number of MB, or 'off'")
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
        limit = min(mb << 20, MAX_BYTES)  # more than MLX's size_t holds: no limit, as MLX says
        previous = mx.set_cache_limit(limit)
        if previous > limit:
            mx.set_cache_limit(previous)


_local = threading.local()  # MLX's streams belong to the thread that made them


def _new_streams(n: int) -> tuple:
    """n CPU streams of this thread, made once per thread."""
    made = _local.__dict__.setdefault("streams", {})
    if n not in made:
        made[n] = tuple(mx.new_stream(mx.cpu) for _ in range(n))
    return made[n]


def run_blocks(blocks, x: mx.array) -> list[mx.array]:
    """Outputs of `blocks` applied in turn to x (B, N, D), each (B, N, D).

    The BLAS thread count is process-wide: it is set here to cores // streams, the same for
    every forward pass under the same settings, so the graphs built before an evaluation agree.
    """
    _raise_cache_limit()
    n = min(streams(), blocks[0].attn.num_heads) if blocks else 1  # a shard has a head at least
    default = n == 1 and not _positive(CORES_ENV)  # OpenBLAS's own count (blank: unset)
    blas.set_threads(None if default else max(1, cores() // n))
    batch = x.shape[0]
    if n < 2:
        return _one_stream(blocks, x)
    # An uneven split of a small batch would leave a stream idle for up to a third of the time.
    if batch % n == 0 or batch >= SHARDS_BELOW * n:
        return _by_images(blocks, x, _new_streams(n))
    return _by_shards(blocks, x, _new_streams(n))


def _one_stream(blocks, x: mx.array) -> list[mx.array]:
    outputs = []
    for block in blocks:
        x = block(x)
        outputs.append(x)
    return outputs


def _by_images(blocks, x: mx.array, streams: tuple) -> list[mx.array]:
    n = len(streams)
    parts = [x[slice(*share(x.shape[0], i, n))] for i in range(n)]  # each stream's images
    outputs = []
    for block in blocks:
        with mx.stream(streams[0]):
            block = widened_block(block, x.dtype)  # narrow weights: once, for every stream
        for i, (stream, part) in enumerate(zip(streams, parts, strict=True)):
            with mx.stream(stream):
                parts[i] = block(part)
        outputs.append(mx.concatenate(parts))  # lazy: only the probe layers are used
    return outputs


def _by_shards(blocks, x: mx.array, streams: tuple) -> list[mx.array]:
    xs = [x] * len(streams)  # every stream holds the whole activations
    outputs = []
    for block in blocks:
        xs = _sharded_block(block, xs, streams)
        outputs.append(xs[0])
    return outputs


def _sharded_block(block, xs: list, streams: tuple) -> list[mx.array]:
    """The steps of `Block.__call__`, each stream on its shard of the block (`shard_block`);
    `join` gives every stream the whole of a result from the streams' shares of its features."""
    n, D = len(streams), xs[0].shape[-1]

    def join(parts: list) -> list[mx.array]:
        out = []
        for stream in streams:
            with mx.stream(stream):
                out.append(mx.concatenate(parts, axis=-1))
        return out

    shards, heads = [], []
    for i, stream in enumerate(streams):
        with mx.stream(stream):
            shard = widened_block(shard_block(block, i, n), xs[i].dtype)  # narrow: this share
            shards.append(shard)
            heads.append(shard.attention(xs[i]))
    heads, ys = join(heads), []
    for i, stream in enumerate(streams):
        with mx.stream(stream):
            start, stop = share(D, i, n)
            ys.append(shards[i].attn.proj(heads[i], add=xs[i][..., start:stop]))  # x + attention
    y, hidden = join(ys), []
    for i, stream in enumerate(streams):
        with mx.stream(stream):
            hidden.append(shards[i].mlp.hidden(shards[i].norm_2(y[i])))
    hidden, zs = join(hidden), []
    for i, stream in enumerate(streams):
        with mx.stream(stream):
            zs.append(shards[i].mlp.fc2(hidden[i], add=ys[i]))  # y + MLP
    return join(zs)


def shard_block(block, i: int, n: int):
    """The i-th of n shares of `block`'s work (`share` of each size): heads i of n for
    attention, and output features i of n of the projection, of fc1 (the hidden units) and of
    fc2. Views of the weights' rows."""
    D, hidden, H = block.embed_dim, block.hidden_dim, block.attn.num_heads
    first, last = share(H, i, n)
    head_dim = D // H
    q_k_v = [(j * D + first * head_dim, j * D + last * head_dim) for j in range(3)]
    shard = _copy_block(block)
    shard.attn.num_heads = last - first
    shard.attn.qkv = block.attn.qkv.rows(*q_k_v)
    shard.attn.proj = block.attn.proj.rows(share(D, i, n))
    shard.mlp.fc1 = block.mlp.fc1.rows(share(hidden, i, n))
    shard.mlp.fc2 = block.mlp.fc2.rows(share(D, i, n))
    return shard


def widened_block(block, dtype: mx.Dtype):
    """`block` with its matmul weights as `dtype` arrays, widened (or dequantized) once here,
    for applying it to several parts of the input; `block` itself if nothing needs widening."""
    layers = {"attn": ("qkv", "proj"), "mlp": ("fc1", "fc2")}
    wide = {(m, n): block[m][n].widened(dtype) for m, names in layers.items() for n in names}
    if all(wide[m, n] is block[m][n] for m, n in wide):
        return block
    out = _copy_block(block)
    for (m, n), layer in wide.items():
        out[m][n] = layer
    return out


def _copy_block(block):
    """A shallow copy whose attention and MLP are copies too, for replacing their layers."""
    out = copy.copy(block)
    out.attn, out.mlp = copy.copy(block.attn), copy.copy(block.mlp)
    return out
