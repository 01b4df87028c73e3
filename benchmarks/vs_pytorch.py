"""aim-mlx against PyTorch (timm), the machine's matmul peak, and optionally an older aim-mlx,
interleaved in one run.

    python benchmarks/vs_pytorch.py --torch-python /tmp/venv-torch/bin/python
    git worktree add /tmp/aim-old HEAD~1
    python benchmarks/vs_pytorch.py --baseline /tmp/aim-old --dtypes float32,float16,4bit

Each round times, one after the other: aim-mlx aim-600M with all 24 blocks (the last-layers
head, random weights) in each dtype, the older aim-mlx the same way (`--baseline`), the same
network in PyTorch (timm's VisionTransformer, float32), and numpy's float32 matmul at the fc1
shape (the machine's practical BLAS peak: the best of three products, and the rate of products
back to back for as long as that round's forward pass took). Every model runs in its own
process that sleeps while the others run. Ratios are computed within each round, so load from
other programs hits both sides alike; the summary gives their median and range, and then
compares each side's fastest round (the rule of Python's `timeit`: slower repeats were slowed
by other programs, not by the code), which is what a quiet machine would show.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
ROOT = HERE.parent
PEAK_DTYPE = "float32"  # the dtype whose GFLOP/s is compared with numpy's float32 matmul


def _fc1_operands(batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Random float32 operands of aim-600M's fc1 shape, (256 B, 1536) @ (1536, 6144), at
    least 512 rows."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((256 * max(batch, 2), 1536), dtype=np.float32)
    return a, rng.standard_normal((1536, 6144), dtype=np.float32)


def numpy_peak(batch: int, reps: int = 3) -> float:
    """Best float32 GFLOP/s of numpy at fc1's shape (`_fc1_operands`), of `reps` products."""
    a, b = _fc1_operands(batch)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * a.shape[0] * 1536 * 6144 / best / 1e9


def numpy_sustained(batch: int, seconds: float) -> float:
    """numpy's float32 GFLOP/s at fc1's shape over products back to back for about `seconds`
    (a forward pass's time: the same exposure to other programs' bursts as the pass had)."""
    a, b = _fc1_operands(batch)
    count, start = 0, time.perf_counter()
    while count == 0 or time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return count * 2 * a.shape[0] * 1536 * 6144 / (time.perf_counter() - start) / 1e9


class Worker:
    """A benchmark process: one request per line on stdin, one JSON answer per line."""

    def __init__(self, argv: list[str]):
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = json.loads(self.proc.stdout.readline())

    def seconds(self, request: str) -> float:
        self.proc.stdin.write(request + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["seconds"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def mlx_worker(source: Path) -> Worker:
    return Worker([sys.executable, str(HERE / "_mlx_worker.py"), str(source)])


def parse_dtype(name: str) -> tuple[str, int]:
    """float32 / float16 / bfloat16, or 4bit / 8bit (float16 weights, quantized trunk)."""
    if name.endswith("bit"):
        return "float16", int(name[:-3])
    return name, 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--torch-python", help="python of a venv with torch and timm (omit: no torch)")
    p.add_argument("--baseline", type=Path, help="an older aim-mlx source tree to compare with")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--dtypes", default="float32", help="e.g. float32,float16,4bit")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--torch-device", default="cpu", help="cpu, or mps on Apple silicon")
    p.add_argument("--gap", type=float, default=1.0, help="seconds of rest between measurements")
    p.add_argument("--json", help="also write the per-round results here")
    a = p.parse_args()

    sys.path.insert(0, str(ROOT))
    import aim_mlx  # noqa: F401  (first: it loads an optimized BLAS before mlx.core)
    from aim_mlx import bench
    from aim_mlx.models import preset_args

    flops = bench.flops_per_image(preset_args("aim-600M", head="last"), 24, 224, 224)
    new = mlx_worker(ROOT)
    old = mlx_worker(a.baseline) if a.baseline else None
    torch = None
    if a.torch_python:
        argv = [a.torch_python, str(HERE / "_torch_worker.py"), str(a.threads), a.torch_device]
        torch = Worker(argv)
    env = bench.environment()
    print(json.dumps({**env, "torch": torch and torch.info, "baseline": old and old.info}))

    dtypes = a.dtypes.split(",")
    results = []
    for batch in [int(b) for b in a.batch_sizes.split(",")]:
        requests = {d: "{} {} {}".format(*parse_dtype(d), batch) for d in dtypes}
        for request in requests.values():  # warm-up (and model building)
            new.seconds(request)
            if old:
                old.seconds(request)
        if torch:
            torch.seconds(str(batch))
        for r in range(a.rounds):
            row = {"batch": batch, "round": r}
            for d, request in requests.items():
                time.sleep(a.gap)
                row[f"mlx_s_{d}"] = new.seconds(request)
                if old:
                    time.sleep(a.gap)
                    row[f"old_s_{d}"] = old.seconds(request)
                    row[f"vs_old_{d}"] = row[f"old_s_{d}"] / row[f"mlx_s_{d}"]
            if torch:
                time.sleep(a.gap)
                row["torch_s"] = torch.seconds(str(batch))
            if PEAK_DTYPE in requests:
                time.sleep(a.gap)
                row["numpy_gflops"] = numpy_peak(batch)
                row["mlx_gflops"] = flops * batch / row[f"mlx_s_{PEAK_DTYPE}"] / 1e9
                row["peak_fraction"] = row["mlx_gflops"] / row["numpy_gflops"]
                time.sleep(a.gap)
                row["numpy_sustained_gflops"] = numpy_sustained(batch, row[f"mlx_s_{PEAK_DTYPE}"])
                row["sustained_fraction"] = row["mlx_gflops"] / row["numpy_sustained_gflops"]
                if torch:
                    row["vs_torch"] = row["torch_s"] / row[f"mlx_s_{PEAK_DTYPE}"]
            results.append(row)
            print(json.dumps(row), flush=True)
    for w in (new, old, torch):
        if w:
            w.close()
    if a.json:
        Path(a.json).write_text(json.dumps({"env": env, "rows": results}, indent=1))
    summarize(results, dtypes)


def summarize(rows, dtypes):
    def stat(values, fmt):
        v = np.array(values)
        return f"{fmt.format(np.median(v))} ({fmt.format(v.min())}-{fmt.format(v.max())})"

    print("\nmedian (min-max) over rounds; ratios are taken within each round")
    for batch in sorted({r["batch"] for r in rows}):
        rs = [r for r in rows if r["batch"] == batch]
        print(f"\nbatch {batch}")
        print("| dtype | aim-mlx img/s | baseline img/s | new / baseline | fastest / fastest |")
        print("| --- | --- | --- | --- | --- |")
        for d in dtypes:
            old = [batch / r[f"old_s_{d}"] for r in rs if f"old_s_{d}" in r]
            new = [batch / r[f"mlx_s_{d}"] for r in rs]
            cells = [
                d,
                stat(new, "{:.3f}"),
                stat(old, "{:.3f}") if old else "-",
                stat([r[f"vs_old_{d}"] for r in rs], "{:.3f}x") if old else "-",
                f"{max(new) / max(old):.3f}x" if old else "-",
            ]
            print("| " + " | ".join(cells) + " |")
        if "numpy_gflops" in rs[0]:
            _peak_tables(batch, rs, stat)


def _peak_tables(batch, rs, stat):
    """aim-mlx (float32) against PyTorch and numpy's peaks: medians of the rounds' ratios, then
    each side's fastest round."""
    torch = [batch / r["torch_s"] for r in rs if "torch_s" in r]
    header = (
        "| | PyTorch img/s | aim-mlx / PyTorch | aim-mlx GFLOP/s | numpy GFLOP/s | of peak"
        " | numpy sustained GFLOP/s | of sustained peak |"
    )
    print(f"\n{header}\n" + "| --- " * 8 + "|")
    median = [
        "median of rounds",
        stat(torch, "{:.3f}") if torch else "-",
        stat([r["vs_torch"] for r in rs], "{:.2f}x") if torch else "-",
        stat([r["mlx_gflops"] for r in rs], "{:.0f}"),
        stat([r["numpy_gflops"] for r in rs], "{:.0f}"),
        stat([100 * r["peak_fraction"] for r in rs], "{:.1f}%"),
        stat([r["numpy_sustained_gflops"] for r in rs], "{:.0f}"),
        stat([100 * r["sustained_fraction"] for r in rs], "{:.1f}%"),
    ]
    best = {
        k: max(r[k] for r in rs) for k in ("mlx_gflops", "numpy_gflops", "numpy_sustained_gflops")
    }
    best_mlx = max(batch / r[f"mlx_s_{PEAK_DTYPE}"] for r in rs)
    fastest = [
        "fastest round of each",
        f"{max(torch):.3f}" if torch else "-",
        f"{best_mlx / max(torch):.2f}x" if torch else "-",
        f"{best['mlx_gflops']:.0f}",
        f"{best['numpy_gflops']:.0f}",
        f"{100 * best['mlx_gflops'] / best['numpy_gflops']:.1f}%",
        f"{best['numpy_sustained_gflops']:.0f}",
        f"{100 * best['mlx_gflops'] / best['numpy_sustained_gflops']:.1f}%",
    ]
    for cells in (median, fastest):
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
