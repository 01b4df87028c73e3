"""aim-mlx against PyTorch (timm) and against the machine's matmul peak, interleaved in one run.

    python benchmarks/vs_pytorch.py --torch-python /tmp/venv-torch/bin/python

Each round times, one after the other: aim-mlx aim-600M float32 with all 24 blocks (the
last-layers head), the same network in PyTorch (timm's VisionTransformer, in a separate
process that sleeps while MLX runs), aim-mlx stopping at block 19 (the best-layers head), and
numpy's float32 matmul at the fc1 shape (the machine's practical BLAS peak). Ratios are
computed within each round, so load from other programs hits both sides alike; the summary
gives their median and range.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import aim_mlx  # noqa: F401  (first: it loads an optimized BLAS before mlx.core)

# isort: split
import mlx.core as mx
import numpy as np

from aim_mlx import bench
from aim_mlx.models import AIM, preset_args

HERE = Path(__file__).parent


def numpy_peak(batch: int, reps: int = 3) -> float:
    """Best float32 GFLOP/s of numpy at aim-600M's fc1 shape, (256 B, 1536) @ (1536, 6144)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((256 * max(batch, 2), 1536), dtype=np.float32)
    b = rng.standard_normal((1536, 6144), dtype=np.float32)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * a.shape[0] * 1536 * 6144 / best / 1e9


class Torch:
    def __init__(self, python: str, threads: int, device: str):
        self.proc = subprocess.Popen(
            [python, str(HERE / "_torch_worker.py"), str(threads), device],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.info = json.loads(self.proc.stdout.readline())

    def seconds(self, batch: int) -> float:
        self.proc.stdin.write(f"{batch}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["seconds"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def mlx_seconds(model, x) -> float:
    start = time.perf_counter()
    mx.eval(model(x))
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--torch-python", help="python of a venv with torch and timm (omit: no torch)")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--torch-device", default="cpu", help="cpu, or mps on Apple silicon")
    p.add_argument("--gap", type=float, default=1.0, help="seconds of rest between measurements")
    p.add_argument("--json", help="also write the per-round results here")
    a = p.parse_args()

    last = bench.random_model(preset_args("aim-600M", head="last"), mx.float32)
    best = AIM(preset_args("aim-600M", head="best"))  # the same weights, stops at block 19
    best.update(last.parameters())
    best.eval()
    flops = {
        name: bench.flops_per_image(m.args, bench.blocks_run(m.args), 224, 224)
        for name, m in (("last", last), ("best", best))
    }
    torch = Torch(a.torch_python, a.threads, a.torch_device) if a.torch_python else None
    env = bench.environment()
    print(json.dumps({**env, "torch": torch and torch.info, "threads": a.threads}))

    results = []
    for batch in [int(b) for b in a.batch_sizes.split(",")]:
        x = mx.random.normal((batch, 3, 224, 224), key=mx.random.key(0))
        mx.eval(x)
        mlx_seconds(last, x)  # warm-up
        if torch:
            torch.seconds(batch)
        for r in range(a.rounds):
            row = {"batch": batch, "round": r}
            time.sleep(a.gap)
            row["mlx_s"] = mlx_seconds(last, x)
            if torch:
                time.sleep(a.gap)
                row["torch_s"] = torch.seconds(batch)
            time.sleep(a.gap)
            row["mlx_best_s"] = mlx_seconds(best, x)
            time.sleep(a.gap)
            row["numpy_gflops"] = numpy_peak(batch)
            row["mlx_gflops"] = flops["last"] * batch / row["mlx_s"] / 1e9
            row["peak_fraction"] = row["mlx_gflops"] / row["numpy_gflops"]
            row["best_speedup"] = row["mlx_s"] / row["mlx_best_s"]
            if torch:
                row["vs_torch"] = row["torch_s"] / row["mlx_s"]
            results.append(row)
            print(json.dumps(row), flush=True)
    if torch:
        torch.close()
    if a.json:
        Path(a.json).write_text(json.dumps({"env": env, "rows": results}, indent=1))
    summarize(results)


def summarize(rows):
    def stat(values, fmt):
        v = np.array(values)
        return f"{fmt.format(np.median(v))} ({fmt.format(v.min())}-{fmt.format(v.max())})"

    print("\nmedian (min-max) over rounds; ratios are taken within each round")
    print(
        "| batch | aim-mlx img/s | PyTorch img/s | aim-mlx / PyTorch | aim-mlx GFLOP/s |"
        " numpy GFLOP/s | of peak | best-layers head speed-up |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for batch in sorted({r["batch"] for r in rows}):
        rs = [r for r in rows if r["batch"] == batch]
        torch = [batch / r["torch_s"] for r in rs if "torch_s" in r]
        cells = [
            str(batch),
            stat([batch / r["mlx_s"] for r in rs], "{:.3f}"),
            stat(torch, "{:.3f}") if torch else "-",
            stat([r["vs_torch"] for r in rs], "{:.2f}x") if torch else "-",
            stat([r["mlx_gflops"] for r in rs], "{:.0f}"),
            stat([r["numpy_gflops"] for r in rs], "{:.0f}"),
            stat([100 * r["peak_fraction"] for r in rs], "{:.0f}%"),
            stat([r["best_speedup"] for r in rs], "{:.2f}x"),
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
