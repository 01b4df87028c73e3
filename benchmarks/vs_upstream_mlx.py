"""aim-mlx against upstream's MLX port (apple/ml-aim, aim-v1/aim/v1/mlx), interleaved in one run.

    git clone https://github.com/apple/ml-aim /tmp/ml-aim
    python benchmarks/vs_upstream_mlx.py --upstream /tmp/ml-aim/aim-v1

Both are aim-600M, float32, random weights, all 24 blocks (upstream's default forward runs every
block; aim-mlx with the last-layers head), in the same process: both get the same BLAS (aim-mlx
loads OpenBLAS on Linux before mlx.core is imported; upstream would get the wheel's reference
BLAS on its own, about 40x slower). Upstream's code is imported from the given path, not copied.
Each round times one forward pass of each, alternating; ratios are taken within a round.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import aim_mlx  # noqa: F401  (first: it loads an optimized BLAS before mlx.core)

# isort: split
import mlx.core as mx

from aim_mlx import bench
from aim_mlx.models import preset_args


def seconds(fn, x) -> float:
    start = time.perf_counter()
    mx.eval(fn(x))
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--upstream", required=True, help="the aim-v1 folder of apple/ml-aim")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, args.upstream)
    from aim.v1.mlx.models import aim_600M

    upstream = aim_600M()  # probe layers: the last six blocks
    upstream.eval()
    mx.eval(upstream.parameters())
    ours = bench.random_model(preset_args("aim-600M", head="last"), mx.float32)
    runs = {
        "aim-mlx": lambda x: ours(x),
        "upstream": lambda x: upstream(x)[0],
    }
    print(f"{bench.chip()} | MLX {mx.__version__} | {bench.environment()['blas']}")
    for batch in map(int, args.batch_sizes.split(",")):
        x = mx.random.normal((batch, 3, 224, 224))
        for fn in runs.values():  # warm-up
            seconds(fn, x)
        times = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, fn in runs.items():
                times[name].append(seconds(fn, x))
        ratios = [u / o for u, o in zip(times["upstream"], times["aim-mlx"], strict=True)]
        rates = {name: batch / statistics.median(t) for name, t in times.items()}
        print(
            f"batch {batch}: aim-mlx {rates['aim-mlx']:.3f} img/s, upstream "
            f"{rates['upstream']:.3f} img/s, aim-mlx / upstream {statistics.median(ratios):.2f}x "
            f"({min(ratios):.2f}x-{max(ratios):.2f}x over {args.rounds} rounds)",
            flush=True,
        )


if __name__ == "__main__":
    main()
