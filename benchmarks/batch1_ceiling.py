"""How close batch 1 can come to the matmul peak on the CPU: MLX's matmuls at one image's shapes,
and what the rest of a block costs.

    python benchmarks/batch1_ceiling.py [--rounds 9]

At batch 1 every matmul of aim-600M has 256 rows (one image's tokens); `vs_pytorch.py` divides
the forward pass's GFLOP/s by numpy's float32 product at 512 rows (the machine's practical
peak). Each round here times, one after the other (float32, random weights, all 24 blocks):

- the peak: numpy's (512, 1536) @ (1536, 6144), best of three (as `vs_pytorch.py`);
- "matmuls only": the products of the 24 blocks exactly as the CPU runner runs batch 1 (each of
  the streams its share of every layer's output features, `cpu_runner.shard_block`, one BLAS
  thread each), with nothing between them; once with 256 rows (one image), once with 512 (two
  images);
- the trunk: the 24 blocks at batch 1 through `ops.run_blocks`, all of the work;
- on one stream, one shard's work between its matmuls: attention's softmax and products, GELU,
  the two layer norms and the four joins (the copies that give every stream whole rows).

Prints the medians over the rounds, and each rate against the matmuls-only rate at 256 rows of
the same round (which other programs' load affects alike).
"""

from __future__ import annotations

import argparse
import statistics
import time

import aim_mlx  # noqa: F401  (first: it loads an optimized BLAS before mlx.core)

# isort: split
import mlx.core as mx
from vs_pytorch import numpy_peak  # the peak vs_pytorch.py divides by (this script's folder)

from aim_mlx import bench, blas
from aim_mlx.models import cpu_runner, ops
from aim_mlx.models.aim import preset_args

TOKENS = 256


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def block_matmul_flops(args, rows: int) -> int:
    D, hidden = args.embed_dim, args.mlp_ratio * args.embed_dim
    return 2 * rows * D * (3 * D + D + hidden) + 2 * rows * hidden * D


def matmuls_only(blocks, streams, rows: int) -> list[mx.array]:
    """The CPU runner's products of every block for `rows` tokens, each stream its shard, with
    inputs of the right shapes in place of the activations."""
    D, hidden = blocks[0].embed_dim, blocks[0].hidden_dim
    x = mx.random.normal((1, rows, D), key=mx.random.key(1))
    h = mx.random.normal((1, rows, hidden), key=mx.random.key(2))
    mx.eval(x, h)
    blas.set_threads(1)
    n, outs = len(streams), []
    for block in blocks:
        for i, stream in enumerate(streams):
            shard = cpu_runner.shard_block(block, i, n)
            with mx.stream(stream):
                outs += ops.qkv_heads(x, shard.attn.qkv, shard.attn.num_heads)
                outs += [shard.attn.proj(x), shard.mlp.fc1(x), shard.mlp.fc2(h)]
    return outs


def between_matmuls(block, stream, n: int) -> dict[str, float]:
    """Seconds (best of 10) of one shard's work besides its matmuls, on one stream."""
    shard = cpu_runner.shard_block(block, 0, n)
    D, hidden, H = block.embed_dim, block.hidden_dim, shard.attn.num_heads
    x = mx.random.normal((1, TOKENS, D))
    q, k, v = (mx.random.normal((1, H, TOKENS, D // block.attn.num_heads)) for _ in range(3))
    scale = shard.attn.scale
    f = mx.random.normal((1, TOKENS, hidden // n))
    part = mx.random.normal((1, TOKENS, D // n))
    mx.eval(x, q, k, v, f, part)
    work = {
        "attention (softmax and its two products)": lambda: ops.attention(q, k, v, scale),
        "GELU": lambda: ops.gelu(f),
        "two layer norms": lambda: [shard.norm_1(x), shard.norm_2(x)],
        "four joins": lambda: [mx.concatenate([p] * n, axis=-1) for p in (part, part, f, part)],
    }
    blas.set_threads(1)
    out = {}
    for name, fn in work.items():
        with mx.stream(stream):
            out[name] = min(_seconds(lambda fn=fn: mx.eval(fn())) for _ in range(10))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    rounds = parser.parse_args().rounds
    mx.set_default_device(mx.cpu)  # the CPU runner's question, on a Mac too

    args = preset_args("aim-600M", head="last")
    model = bench.random_model(args, mx.float32, None)
    blocks = model.trunk.blocks
    streams = cpu_runner._new_streams(cpu_runner.streams())
    n = len(streams)
    x = mx.random.normal((1, TOKENS, args.embed_dim))
    mx.eval(x)
    per_image, depth = bench.flops_per_image, len(blocks)
    trunk_flops = per_image(args, depth, 224, 224) - per_image(args, 0, 224, 224)  # the blocks
    timed = {
        "matmuls only, 256 rows": (
            lambda: mx.eval(matmuls_only(blocks, streams, TOKENS)),
            depth * block_matmul_flops(args, TOKENS),
        ),
        "matmuls only, 512 rows": (
            lambda: mx.eval(matmuls_only(blocks, streams, 2 * TOKENS)),
            depth * block_matmul_flops(args, 2 * TOKENS),
        ),
        "the trunk at batch 1": (lambda: mx.eval(ops.run_blocks(blocks, x)[-1]), trunk_flops),
    }
    for fn, _ in timed.values():  # warm up: compiled kernels, buffer cache
        fn()
    fractions = {name: [] for name in timed}
    gflops = {name: [] for name in timed}
    peaks, pieces = [], {}
    for r in range(rounds):
        peak = numpy_peak(1)  # 512 rows, best of three
        peaks.append(peak)
        for name, (fn, flops) in timed.items():
            rate = flops / _seconds(fn) / 1e9
            gflops[name].append(rate)
            fractions[name].append(rate / peak)
        for name, s in between_matmuls(blocks[0], streams[0], n).items():
            pieces.setdefault(name, []).append(s)
        print(f"round {r + 1}/{rounds}: peak {peak:.0f} GFLOP/s", flush=True)

    med = statistics.median
    print(f"\n{n} CPU streams, {blas.describe()}")
    print(f"numpy's peak (512 rows, best of 3): {med(peaks):.0f} GFLOP/s (median of {rounds})\n")
    ceiling = gflops["matmuls only, 256 rows"]
    print("| | GFLOP/s | of peak | of the matmuls only at 256 rows |\n| --- | --- | --- | --- |")
    for name in timed:
        lo, hi = min(fractions[name]), max(fractions[name])
        within = [a / b for a, b in zip(gflops[name], ceiling, strict=True)]  # same round
        print(
            f"| {name} | {med(gflops[name]):.0f} | {100 * med(fractions[name]):.1f}% "
            f"({100 * lo:.1f}%-{100 * hi:.1f}%) | {100 * med(within):.1f}% |"
        )
    # each stream does 1/n of the work at 1/n of the rate: a block's time
    block_ms = block_matmul_flops(args, TOKENS) / med(ceiling) / 1e6
    print(f"\nOne stream's share of a block at batch 1: its matmuls {block_ms:.1f} ms at that rate")
    print("| besides the matmuls | ms | of the matmuls' time |\n| --- | --- | --- |")
    total = 0.0
    for name, s in pieces.items():
        ms = 1e3 * med(s)
        total += ms
        print(f"| {name} | {ms:.2f} | {100 * ms / block_ms:.1f}% |")
    print(f"| all of it | {total:.2f} | {100 * total / block_ms:.1f}% |")


if __name__ == "__main__":
    main()
