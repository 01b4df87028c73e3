"""MLX's CPU buffer cache: aim-mlx's raised limit against MLX's own 32 MB, side by side.

    python benchmarks/cpu_cache.py [--rounds 3] [--batch 1] [--dtypes float32,float16,4bit]
        [--model aim-600M]

Each measurement is a fresh process (the limit is set once per process, and a process's
allocations shape its later ones), alternating `AIM_MLX_CPU_CACHE_MB=off` (MLX's default) and
aim-mlx's default, each timing one forward pass (all blocks, random weights) after
one warm-up pass. Besides the time: MLX's peak memory (`mx.get_peak_memory`, what `aim-mlx bench`
reports) and the process's peak resident set, to show what the cache costs in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import aim_mlx
import mlx.core as mx
from aim_mlx import bench
from aim_mlx.models import preset_args

name, dtype, bits, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
args = preset_args(name, head="last")
model = bench.random_model(args, getattr(mx, dtype), bits or None)
x = mx.random.normal((batch, 3, 224, 224), key=mx.random.key(0))
mx.eval(model(x))
start = time.perf_counter()
mx.eval(model(x))
print(json.dumps({
    "seconds": time.perf_counter() - start,
    "peak_gib": mx.get_peak_memory() / 2**30,
    "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    "cache_mb": mx.get_cache_memory() / 2**20,
}))
"""

DTYPES = {"float32": ("float32", 0), "float16": ("float16", 0), "4bit": ("float16", 4)}


def measure(setting: str | None, model: str, dtype: str, batch: int) -> dict:
    env = dict(os.environ)
    env.pop("AIM_MLX_CPU_CACHE_MB", None)
    if setting:
        env["AIM_MLX_CPU_CACHE_MB"] = setting
    name, bits = DTYPES[dtype]
    cmd = [sys.executable, "-c", CHILD, model, name, str(bits), str(batch)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtypes", default="float32,float16,4bit")
    p.add_argument("--model", default="aim-600M")
    a = p.parse_args()
    print(f"{a.model}, batch {a.batch}, {a.rounds} rounds; medians, ranges over rounds")
    print("| dtype | MLX's 32 MB s | aim-mlx's s | speed-up | peak GiB | max RSS GiB | cache MB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for dtype in a.dtypes.split(","):
        rounds = [
            (measure("off", a.model, dtype, a.batch), measure(None, a.model, dtype, a.batch))
            for _ in range(a.rounds)
        ]
        ratios = [off["seconds"] / on["seconds"] for off, on in rounds]
        keys = rounds[0][0]
        off, on = ({k: statistics.median(r[i][k] for r in rounds) for k in keys} for i in (0, 1))
        print(
            f"| {dtype} | {off['seconds']:.3f} | {on['seconds']:.3f} | "
            f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}x-{max(ratios):.2f}x) | "
            f"{off['peak_gib']:.2f} / {on['peak_gib']:.2f} | "
            f"{off['max_rss_gib']:.2f} / {on['max_rss_gib']:.2f} | "
            f"{off['cache_mb']:.0f} / {on['cache_mb']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
