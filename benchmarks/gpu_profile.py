"""Where a GPU forward pass's time goes (MLX's CUDA backend), for the GPU lane.

    python benchmarks/gpu_profile.py --out results/           # on the GPU machine (gpu_lane.sh)
    python benchmarks/gpu_profile.py --smoke --out /tmp/s     # anywhere: tiny shapes

Summed, a block's kernels timed alone account for two thirds of aim-600M's forward on an H100
(benchmarks/README.md, "The GPU lane"); PyTorch's forward takes as long. Three measurements
tell the suspects apart:

1. `sustained`: fc1's matmul (aim-600M, batch 64, bfloat16) back to back for a few seconds, in
   chunks: TFLOP/s per chunk over time, with random inputs and with all-zero inputs, while
   nvidia-smi logs the card's SM clock, power and throttle reasons every 100 ms. A rate that
   falls after the first chunks, and more with random data than with zeros, is the card's
   power cap, which a kernel timed alone for a few milliseconds never meets.
2. `data`: the whole forward pass (as `aim_mlx.bench.run` times it) with random weights and
   input, then with all of them zero.
3. `kernels`: a CUPTI trace (`torch.profiler`, in this same process) of aim-mlx's forward passes
   and of the PyTorch forward of `vs_pytorch_gpu.py` (timm, autocast): per pass, the wall time,
   the time some kernel runs, the sum of kernel times, and the kernels by name; whether the
   third is idle time between kernels or kernels that run slower in sequence than alone.

Writes gpu_profile.json (after each part) and gpu_profile.md, gpu_profile_clocks.csv and, where
the trace ran, gpu_trace.json.gz under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gzip
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

CLOCK_FIELDS = "timestamp,clocks.sm,clocks.mem,power.draw,power.limit,temperature.gpu"
REASONS = ("clocks_event_reasons.active", "clocks_throttle_reasons.active")


# ---- nvidia-smi in the background -------------------------------------------------------------


@contextlib.contextmanager
def clock_log(path: Path, interval_ms: int):
    """nvidia-smi's clocks, power and throttle reasons every `interval_ms` into `path` (CSV)
    while the block runs; nothing where nvidia-smi is missing."""
    smi = shutil.which("nvidia-smi")
    proc = None
    if smi:
        for reason in REASONS:  # the field's newer name first
            query = f"--query-gpu={CLOCK_FIELDS},{reason}"
            try:
                probe = subprocess.run([smi, query, "--format=csv", "-c", "1"],
                                       capture_output=True, timeout=20)  # fmt: skip
            except subprocess.TimeoutExpired:
                continue
            if probe.returncode == 0:
                cmd = [smi, query, "--format=csv,nounits", "-lms", str(interval_ms)]
                if shutil.which("stdbuf"):  # a line at a time: none lost when it is stopped
                    cmd = ["stdbuf", "-oL", *cmd]
                proc = subprocess.Popen(cmd, stdout=path.open("w"), stderr=subprocess.STDOUT)
                break
    try:
        yield
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()


def read_clocks(path: Path) -> list[dict]:
    """The CSV of `clock_log` as rows {t (epoch seconds, from nvidia-smi's local time), sm,
    power, limit, reasons}; lines that do not parse are skipped."""
    if not path.exists():
        return []

    def number(cell: str) -> float:
        return float(cell.split()[0])  # "1980" or "1980 MHz"

    rows = []
    for line in path.read_text().splitlines()[1:]:
        cells = [c.strip() for c in line.split(",")]
        try:
            stamp = datetime.datetime.strptime(cells[0], "%Y/%m/%d %H:%M:%S.%f")
            rows.append(dict(t=stamp.timestamp(), sm=number(cells[1]), power=number(cells[3]),
                             limit=number(cells[4]), reasons=cells[6]))  # fmt: skip
        except (ValueError, IndexError):
            continue
    return rows


def clocks_during(clocks: list[dict], start: float, stop: float) -> dict:
    """Median SM clock and power, and the throttle reasons seen, between two epoch times."""
    inside = [r for r in clocks if start <= r["t"] <= stop]
    if not inside:
        return {}
    return {
        "samples": len(inside),
        "sm_mhz": statistics.median(r["sm"] for r in inside),
        "sm_mhz_min": min(r["sm"] for r in inside),
        "power_w": statistics.median(r["power"] for r in inside),
        "power_limit_w": inside[0]["limit"],
        "reasons": sorted({r["reasons"] for r in inside}),
    }


# ---- 1. one matmul, sustained -----------------------------------------------------------------


def sustained(rows: int, dim: int, hidden: int, seconds: float, chunk: int) -> dict:
    import mlx.core as mx

    flops = 2 * rows * dim * hidden * chunk
    out = {}
    for data in ("random", "zeros"):
        key = mx.random.key(0)
        x = mx.random.normal((rows, dim), key=key).astype(mx.bfloat16)
        w = mx.random.normal((hidden, dim), key=mx.random.split(key)[0]).astype(mx.bfloat16)
        if data == "zeros":
            x, w = mx.zeros_like(x), mx.zeros_like(w)
        mx.eval(x, w)
        mx.eval(x @ w.T)  # the kernel chosen and loaded
        time.sleep(1.0)  # the card idle before each series
        series, start = [], time.time()
        while time.time() - start < seconds:
            t = time.perf_counter()
            mx.eval([x @ w.T for _ in range(chunk)])
            series.append((time.time() - start, flops / (time.perf_counter() - t) / 1e12))
        out[data] = {"start": start, "stop": time.time(), "chunk_calls": chunk,
                     "tflops": [float(f"{v:.4g}") for _, v in series],
                     "at_s": [round(s, 3) for s, _ in series]}  # fmt: skip
    return out


# ---- 2. the forward pass, random vs zero data ---------------------------------------------------


def forward_data(name: str, batch: int, warmup: int, iters: int) -> dict:
    import mlx.core as mx
    from mlx.utils import tree_map
    from vs_pytorch_gpu import model_args

    from aim_mlx import bench

    model = bench.random_model(model_args(name), mx.bfloat16)
    x = mx.random.normal((batch, 3, model.args.img_size, model.args.img_size))
    out = {}
    for data in ("random", "zeros"):
        if data == "zeros":
            model.update(tree_map(mx.zeros_like, model.parameters()))
            x = mx.zeros_like(x)
        mx.eval(model.parameters(), x)
        time.sleep(1.0)
        start, times = time.time(), []
        for i in range(warmup + iters):
            t = time.perf_counter()
            mx.eval(model(x))
            if i >= warmup:
                times.append(time.perf_counter() - t)
        out[data] = {"start": start, "stop": time.time(),
                     "images_per_s": batch * len(times) / sum(times)}  # fmt: skip
    return out


# ---- 3. a kernel trace of both forwards ---------------------------------------------------------


def kernel_trace(name: str, batch: int, passes: int, out_dir: Path) -> dict:
    """torch.profiler (CUPTI) over `passes` aim-mlx forwards, then `passes` PyTorch ones."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    import aim_mlx  # noqa: F401  (before mlx.core: the buffer limit)

    # isort: split
    import mlx.core as mx
    from _timm_aim import build
    from vs_pytorch_gpu import model_args

    from aim_mlx import bench

    if not torch.cuda.is_available():
        return {"skipped": "torch has no CUDA device here"}
    args = model_args(name)
    model = bench.random_model(args, mx.bfloat16)
    x = mx.random.normal((batch, 3, 224, 224), key=mx.random.key(1))
    tmodel = build(args.embed_dim, args.num_blocks, args.num_heads, 224, "cuda")
    tx = torch.randn(batch, 3, 224, 224, device="cuda")

    def torch_forward():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            tmodel(tx)
        torch.cuda.synchronize()

    for _ in range(3):
        mx.eval(model(x))
        torch_forward()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(passes):
            with record_function(f"mlx_forward_{i}"):
                mx.eval(model(x))
        for i in range(passes):
            with record_function(f"torch_forward_{i}"):
                torch_forward()
    trace = out_dir / "gpu_trace.json"
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    with gzip.open(out_dir / "gpu_trace.json.gz", "wt") as f:
        json.dump(events, f)
    trace.unlink()
    return summarize_trace(events)


def kernel_kind(name: str) -> str:
    low = name.lower()
    if any(s in low for s in ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul")):
        return "matmul"
    if any(s in low for s in ("cudnn", "fmha", "flash", "attention", "sdpa")):
        return "attention"
    return "other"


def summarize_trace(events: list[dict]) -> dict:
    """Per annotated pass: wall ms, busy ms (some kernel running), kernel ms summed, kernels by
    kind and the 12 longest by name (ms per pass)."""
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    marks = [e for e in events if e.get("cat") == "user_annotation"
             and e.get("name", "").split("_forward_")[0] in ("mlx", "torch")]  # fmt: skip
    out = {"kernels_in_trace": len(gpu)}
    for side in ("mlx", "torch"):
        passes = [m for m in marks if m["name"].startswith(side)]
        rows = []
        by_name: dict[str, float] = {}
        for m in passes:
            start, stop = m["ts"], m["ts"] + m["dur"]
            inside = sorted((e for e in gpu if start <= e["ts"] < stop), key=lambda e: e["ts"])
            busy, end = 0.0, start
            for e in inside:
                s, t = max(e["ts"], end), e["ts"] + e["dur"]
                if t > s:
                    busy += t - s
                end = max(end, t)
            kinds: dict[str, float] = {}
            for e in inside:
                kind = kernel_kind(e["name"])
                kinds[kind] = kinds.get(kind, 0) + e["dur"]
                by_name[e["name"]] = by_name.get(e["name"], 0) + e["dur"]
            first = inside[0]["ts"] - start if inside else None
            rows.append({
                "wall_ms": m["dur"] / 1e3,
                "busy_ms": busy / 1e3,
                "kernel_sum_ms": sum(e["dur"] for e in inside) / 1e3,
                "kernels": len(inside),
                "first_kernel_after_ms": None if first is None else first / 1e3,
                "by_kind_ms": {k: v / 1e3 for k, v in sorted(kinds.items())},
            })  # fmt: skip
        n = max(len(passes), 1)
        top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
        top = [[k[:110], v / 1e3 / n] for k, v in top]
        out[side] = {"passes": rows, "top_kernels_ms_per_pass": top}
    return out


# ---- the report ---------------------------------------------------------------------------------


def clock_cells(c: dict, limit: bool) -> str:
    """A row's clock columns: SM MHz (median, min), power W (with the limit) and reasons."""
    power = f"{c.get('power_w', '-')}" + (f" ({c.get('power_limit_w', '-')})" if limit else "")
    reasons = " ".join(c.get("reasons", [])) or "-"
    return f"{c.get('sm_mhz', '-')}, {c.get('sm_mhz_min', '-')} | {power} | {reasons}"


def markdown(r: dict) -> str:
    lines = ["# Where a GPU forward's time goes", "", f"- {r['meta']}", ""]
    s = r.get("sustained")
    if s and "error" not in s:
        lines += ["## fc1's matmul back to back (bfloat16; TFLOP/s per chunk)", "",
                  "| data | first 3 chunks | median | last quarter | SM MHz (median, min) "
                  "| power W (limit) | throttle reasons |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for data, d in s.items():
            v, c = d["tflops"], d.get("clocks", {})
            last = v[len(v) * 3 // 4 :] or v
            first = ", ".join(f"{t:.3g}" for t in v[:3])
            lines.append(
                f"| {data} | {first} | {statistics.median(v):.3g} | {statistics.median(last):.3g} "
                f"| {clock_cells(c, limit=True)} |"
            )
    elif s:
        lines.append(f"sustained: {s['error']}")
    d = r.get("data")
    if d and "error" not in d:
        lines += ["", "## The forward pass, random vs zero weights and input (bfloat16)", "",
                  "| data | img/s | SM MHz (median, min) | power W | throttle reasons |",
                  "| --- | --- | --- | --- | --- |"]  # fmt: skip
        for data, row in d.items():
            clocks = clock_cells(row.get("clocks", {}), limit=False)
            lines.append(f"| {data} | {row['images_per_s']:.4g} | {clocks} |")
    elif d:
        lines.append(f"data: {d['error']}")
    k = r.get("kernels")
    if k and "mlx" in k:
        lines += ["", "## Kernel trace (CUPTI via torch.profiler), ms per pass", "",
                  "| side | wall | busy | kernels summed | kernels | first kernel after "
                  "| matmul | attention | other |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for side in ("mlx", "torch"):
            for p in k[side]["passes"]:
                kinds = p["by_kind_ms"]
                first = p["first_kernel_after_ms"]
                lines.append(
                    f"| {side} | {p['wall_ms']:.2f} | {p['busy_ms']:.2f} "
                    f"| {p['kernel_sum_ms']:.2f} | {p['kernels']} "
                    f"| {'-' if first is None else f'{first:.2f}'} | "
                    + " | ".join(f"{kinds.get(x, 0):.2f}" for x in ("matmul", "attention", "other"))
                    + " |"
                )
        for side in ("mlx", "torch"):
            lines += ["", f"{side}: the longest kernels, ms per pass", ""]
            lines += [f"- {ms:.2f} `{name}`" for name, ms in k[side]["top_kernels_ms_per_pass"]]
    elif k:
        lines.append(f"kernels: {k}")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="aim-600M")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seconds", type=float, default=3.0, help="per sustained series")
    p.add_argument("--parts", default="sustained,data,kernels")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, short series")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    import aim_mlx  # noqa: F401  (before mlx.core: the buffer limit)

    # isort: split
    import mlx.core as mx

    parts = a.parts.split(",")
    name, batch = ("aim-tiny", 2) if a.smoke else (a.model, a.batch)
    rows, dim = (64, 64) if a.smoke else (batch * 256, 1536)
    seconds = 0.3 if a.smoke else a.seconds
    r = {"meta": f"MLX {mx.__version__} on {mx.default_device()}; {name}, batch {batch}; "
                 f"command: {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}"}  # fmt: skip
    clocks_csv = a.out / "gpu_profile_clocks.csv"

    def save():
        (a.out / "gpu_profile.json").write_text(json.dumps(r, indent=1))
        (a.out / "gpu_profile.md").write_text(markdown(r))

    def attempt(part: str, run, limit: int = 300):
        """r[part] = run(), or the error it raised (the other parts still run); then save."""
        try:
            r[part] = run()
        except Exception as e:
            r[part] = {"error": f"{type(e).__name__}: {e}"[:limit]}
        save()

    with clock_log(clocks_csv, 100):
        if "sustained" in parts:
            chunk = 3 if a.smoke else 25
            attempt("sustained", lambda: sustained(rows, dim, 4 * dim, seconds, chunk))
        if "data" in parts:
            warmup, iters = (1, 2) if a.smoke else (3, 20)
            attempt("data", lambda: forward_data(name, batch, warmup, iters))
    clocks = read_clocks(clocks_csv)
    r["clock_log"] = {"rows": len(clocks)}
    if clocks:  # the log's span, to set beside the parts' (epoch seconds)
        r["clock_log"].update(first=clocks[0]["t"], last=clocks[-1]["t"])
    for part in ("sustained", "data"):
        for row in r.get(part, {}).values():
            if isinstance(row, dict) and "start" in row:
                row["clocks"] = clocks_during(clocks, row["start"], row["stop"])
    save()
    if "kernels" in parts:
        if a.smoke or not mx.cuda.is_available():
            r["kernels"] = {"skipped": "needs MLX's CUDA backend and torch with CUDA"}
            save()
        else:
            attempt("kernels", lambda: kernel_trace(name, batch, 3, a.out), limit=500)
    print(markdown(r))


if __name__ == "__main__":
    main()
