"""aim-mlx on a GPU against PyTorch on the same GPU, side by side, interleaved, in one run.

    python benchmarks/vs_pytorch_gpu.py --out results/          # on the GPU machine (gpu_lane.sh)
    python benchmarks/vs_pytorch_gpu.py --smoke --out /tmp/s    # anywhere: a tiny model, batch 2

For each model size (batch 64; aim-7B 32; 224 px; all blocks, the last-layers head) and dtype
(bfloat16, float16), each round times aim-mlx (`aim_mlx.bench.run`: images/s and
`mx.get_peak_memory()` over the timed iterations, weights included) and then PyTorch: timm's
VisionTransformer of the same shape (embed dim, depth, heads, MLP ratio 4, patch 14, no biases
in the trunk's matmuls, average pooling + linear instead of AIM's attention-pooling head),
float32 weights under `torch.autocast` to the dtype, fused SDPA, inference mode, in a separate
process (`torch.cuda.max_memory_allocated()`). Ratios are taken within each round; the table
gives their median and range. TFLOP/s use aim-mlx's matmul FLOP count for both sides.

Each round also times variants of aim-mlx's forward (`COMPARED`, levers of
`benchmarks/_gpu_levers.py`: the forward as it was before q, k and v stopped being gathered out
of the qkv matmul's output) on the same model, so that each has its own side-by-side ratio.

Then the levers, at aim-600M bfloat16 batch 64, each in a fresh process (MLX reads its
command-buffer limits once per process): aim-mlx's default, each step of a block alone (GB/s
against the card's bandwidth, TFLOP/s), the variants, other MLX_MAX_MB_PER_BUFFER values, the
peak at other batch sizes, and MLX's own buffer limits.

Writes vs_pytorch_gpu.json (after every measurement, so a run cut short keeps what it did) and
vs_pytorch_gpu.md under --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aim_mlx  # noqa: F401  (first: it sets MLX's GPU buffer limit before mlx.core loads)

# isort: split
import mlx.core as mx
from _gpu_levers import floor, patched, steps

from aim_mlx import bench, runtime
from aim_mlx.constants import MX_DTYPES
from aim_mlx.models import ModelArgs, preset_args

HERE = Path(__file__).parent
SIZES = {"aim-600M": 64, "aim-1B": 64, "aim-3B": 64, "aim-7B": 32}
DTYPES = ("bfloat16", "float16")
# bf16 dense TFLOP/s from NVIDIA's spec sheets (half their "with sparsity" figures), by the
# words in the card's name; the first match wins.
SPEC_BF16_DENSE_TFLOPS = (
    (("H100", "PCIe"), 756.0, "H100 PCIe"),
    (("H100", "NVL"), 835.0, "H100 NVL"),
    (("H200", "NVL"), 835.0, "H200 NVL"),
    (("H100",), 989.0, "H100 SXM"),
    (("H200",), 989.0, "H200 SXM"),
)


def spec_peak(gpu_name: str) -> tuple[float | None, str]:
    """(the card's bf16 dense peak in TFLOP/s or None, where the figure comes from)."""
    for words, tflops, card in SPEC_BF16_DENSE_TFLOPS:
        if all(w in gpu_name for w in words):
            return tflops, f"{card} bf16 dense peak, spec sheet"
    return None, "no spec sheet figure known for this card; pass --peak-tflops"


SMOKE_ARGS = dict(embed_dim=64, num_blocks=8, num_heads=4)  # the test fixture's shape
# Variants of aim-mlx's forward (levers of _gpu_levers.py), timed at aim-600M; those in COMPARED
# also in every round of the comparison, beside the default.
VARIANTS = {
    "before: q, k and v by integer index (a gather each)": ("indexed_qkv",),
    "separate residual adds, MLX's GELU and layer norm": (
        "separate_residual",
        "mlx_kernels",
    ),
    "separate residual adds": ("separate_residual",),
    "MLX's GELU and layer norm": ("mlx_kernels",),
    "queries, keys and values made contiguous": ("contiguous_attention",),
    "mx.compile per block": ("compiled_blocks",),
}
COMPARED = ("before: q, k and v by integer index (a gather each)",)


BUFFER_KEYS = (runtime.BUFFER_ENV, "MLX_MAX_OPS_PER_BUFFER", runtime.OFF_ENV, "MLX_USE_CUDA_GRAPHS")


def model_args(name: str) -> ModelArgs:
    if name == "aim-tiny":
        return ModelArgs(**SMOKE_ARGS, probe_layers=range(2, 8))
    return preset_args(name, head="last")


def measure_mlx(name: str, batch: int, dtype: str, model, warmup: int, iters: int, **kw) -> dict:
    config = bench.BenchConfig(
        model=name, batch_size=batch, dtype=dtype, head="last", warmup=warmup, iters=iters, **kw
    )
    row = bench.run(config, model=model)
    keep = ("images_per_s", "peak_memory_gb", "weight_gb", "gflops_per_image", "blocks")
    return {k: row[k] for k in keep}


# ---- PyTorch, in its own process (benchmarks/_torch_gpu_worker.py) ---------------------------


class Torch:
    """The PyTorch side: a worker process, or nothing where torch (or its device) is missing."""

    def __init__(self, python: str, device: str):
        self.proc, self.info = None, {"skipped": "torch device none"}
        if device == "none":
            return
        probe = subprocess.run([python, "-c", "import torch, timm"], capture_output=True)
        if probe.returncode != 0:
            self.info = {"skipped": f"no torch/timm in {python}"}
            return
        self.proc = subprocess.Popen(
            [python, str(HERE / "_torch_gpu_worker.py"), device],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.info = json.loads(self.proc.stdout.readline())
        if self.info.get("device") == "none":
            self.close()
            self.info["skipped"] = "no CUDA or MPS device for torch"

    def measure(self, args: ModelArgs, batch: int, dtype: str, warmup: int, iters: int) -> dict:
        if self.proc is None:
            return {}
        req = dict(
            embed_dim=args.embed_dim,
            depth=args.num_blocks,
            num_heads=args.num_heads,
            img_size=args.img_size,
            batch=batch,
            dtype=dtype,
            warmup=warmup,
            iters=iters,
        )
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self):
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait()
            self.proc = None


# ---- Levers: one fresh process each ----------------------------------------------------------


def levers(smoke: bool) -> list[dict]:
    """Most telling first: a run cut short keeps those."""
    rows = [
        dict(lever=f"aim-mlx default ({runtime.BUFFER_ENV}={runtime.BUFFER_MB})", env={}),
        dict(lever="a block's steps alone", env={}, steps=True),
    ]
    rows.append(dict(lever="CUDA graphs off (MLX_USE_CUDA_GRAPHS=0)",
                     env={"MLX_USE_CUDA_GRAPHS": "0"}))  # fmt: skip
    rows.append(dict(lever="mx.compile of the whole model", env={}, compile=True))
    rows += [dict(lever=name, env={}, patches=list(patches)) for name, patches in VARIANTS.items()]
    for mb in (128,) if smoke else (32, 128):
        rows.append(dict(lever=f"{runtime.BUFFER_ENV}={mb}", env={runtime.BUFFER_ENV: str(mb)}))
    if not smoke:
        for batch in (16, 128):
            rows.append(dict(lever=f"aim-mlx default, batch {batch}", env={}, batch=batch))
    rows.append(dict(lever="MLX's own buffer limits", env={runtime.OFF_ENV: "off"}))
    return rows


def run_lever(spec: dict) -> None:
    """In a fresh process: one bench.run, printed as JSON."""
    name, dtype = spec["model"], spec["dtype"]
    model = bench.random_model(model_args(name), MX_DTYPES[dtype])
    if spec.get("steps"):
        row = {"steps": steps(model, spec["batch"])}
    elif spec.get("floor"):
        row = floor(model, spec["batch"], spec["warmup"], spec["iters"],
                    attention=spec["floor"] == "attention")  # fmt: skip
    else:
        with patched(spec.get("patches", ())):
            row = measure_mlx(name, spec["batch"], dtype, model, spec["warmup"], spec["iters"],
                              compile=spec.get("compile", False))  # fmt: skip
    row["buffer_setting"] = runtime.describe()
    print(json.dumps(row), flush=True)


def lever_in_subprocess(spec: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in BUFFER_KEYS}
    env.update(spec["env"])
    out = subprocess.run(
        [sys.executable, __file__, "--lever", json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1:] or [f"exit {out.returncode}"]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- The report ------------------------------------------------------------------------------


def summarize(rounds: list[dict], peak_tflops: float | None, variant: str | None = None) -> dict:
    """Medians over the rounds of aim-mlx's default (or `variant`) and of PyTorch."""
    mlx = [r["mlx"] if variant is None else r["variants"].get(variant, {}) for r in rounds]
    mlx = [m if "images_per_s" in m else None for m in mlx]
    torch_ips = [r["torch"]["images_per_s"] for r in rounds if "images_per_s" in r.get("torch", {})]
    ratios = [
        m["images_per_s"] / r["torch"]["images_per_s"]
        for m, r in zip(mlx, rounds, strict=True)
        if m and "images_per_s" in r.get("torch", {})
    ]
    ok = [m for m in mlx if m]
    if not ok:
        errors = [(r["variants"].get(variant, {}) if variant else r["mlx"]) for r in rounds]
        errors = [e["error"] for e in errors if "error" in e]
        return {"error": errors[0]} if errors else {}
    gflop = ok[0]["gflops_per_image"]
    s = {"mlx_images_per_s": statistics.median(m["images_per_s"] for m in ok)}
    s["mlx_tflops"] = gflop * s["mlx_images_per_s"] / 1e3
    s["mlx_fraction_of_peak"] = s["mlx_tflops"] / peak_tflops if peak_tflops else None
    s["mlx_peak_gb"] = max(m["peak_memory_gb"] for m in ok)
    if torch_ips:
        s["torch_images_per_s"] = statistics.median(torch_ips)
        s["torch_tflops"] = gflop * s["torch_images_per_s"] / 1e3
        peaks = [r["torch"].get("peak_memory_gb") for r in rounds]
        s["torch_peak_gb"] = max((p for p in peaks if p is not None), default=None)
    if ratios:
        s["ratio_median"], s["ratio_min"], s["ratio_max"] = (
            statistics.median(ratios),
            min(ratios),
            max(ratios),
        )
    return s


def fmt(v, spec="{:.3g}") -> str:
    return "-" if v is None else spec.format(v)


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        "# aim-mlx vs PyTorch on a GPU",
        "",
        f"- device: {meta['gpu']}; MLX {meta['mlx_version']}; {meta['buffer_setting']}",
        f"- PyTorch side: {meta['torch']}",
        f"- command: `{meta['command']}`; {meta['rounds']} interleaved rounds, "
        f"{meta['warmup']} warmup + {meta['iters']} timed iterations each; 224 px, all blocks",
        f"- TFLOP/s from aim-mlx's matmul FLOP count; fraction of {fmt(meta['peak_tflops'])} "
        f"TFLOP/s ({meta['peak_source']}); peak GiB: mx.get_peak_memory vs "
        "torch.cuda.max_memory_allocated (weights included; PyTorch's are float32 under autocast)",
        "",
        "| model (batch) | dtype | aim-mlx img/s | PyTorch img/s | ratio (median, range) "
        "| aim-mlx TFLOP/s | PyTorch TFLOP/s | aim-mlx of peak | peak GiB aim-mlx / PyTorch |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["comparison"]:
        variants = [("", row["summary"])]
        variants += [(f" {v}", s) for v, s in row.get("variant_summaries", {}).items()]
        if "error" in row:
            lines.append(
                f"| {row['model']} ({row['batch']}) | {row['dtype']} | "
                f"{row.get('error', 'no result')} | | | | | | |"
            )
            continue
        for label, s in variants:
            if "error" in s:
                lines.append(f"| | {row['dtype']}{label} | {s['error']} | | | | | | |")
            if not s or "error" in s:
                continue
            ratio = (
                f"{s['ratio_median']:.2f}x ({s['ratio_min']:.2f}-{s['ratio_max']:.2f})"
                if "ratio_median" in s
                else "-"
            )
            lines.append(
                f"| {row['model']} ({row['batch']}) | {row['dtype']}{label} "
                f"| {fmt(s.get('mlx_images_per_s'))} "
                f"| {fmt(s.get('torch_images_per_s'))} | {ratio} | {fmt(s.get('mlx_tflops'))} "
                f"| {fmt(s.get('torch_tflops'))} | {fmt(s.get('mlx_fraction_of_peak'), '{:.0%}')} "
                f"| {fmt(s.get('mlx_peak_gb'), '{:.2f}')} "
                f"/ {fmt(s.get('torch_peak_gb'), '{:.2f}')} |"
            )
    if results["levers"]:
        first = results["levers"][0]
        lines += [
            "",
            f"Levers: {first['model']} {first['dtype']}, each in a fresh process",
            "",
            "| lever | batch | img/s | vs default | peak GiB |",
            "| --- | --- | --- | --- | --- |",
        ]
        base = first.get("result", {}).get("images_per_s")
        for lever in results["levers"]:
            r = lever.get("result", {})
            ips = r.get("images_per_s")
            rel = f"{ips / base:.2f}x" if ips and base and lever["batch"] == first["batch"] else "-"
            peak = fmt(r.get("peak_memory_gb"), "{:.2f}")
            lines.append(
                f"| {lever['lever']} | {lever['batch']} | {fmt(ips)} | {rel} | {peak}"
                f"{r.get('error', '')} |"
            )
        for lever in results["levers"]:
            steps = lever.get("result", {}).get("steps")
            if not steps:
                continue
            lines += [
                "",
                f"{lever['lever']} ({lever['model']} {lever['dtype']}, batch {lever['batch']}: "
                "one block's shapes; best of 5, each 10 calls in one evaluation)",
                "",
                "| step | ms | GB/s moved | TFLOP/s | max abs error vs float32 |",
                "| --- | --- | --- | --- | --- |",
            ]
            for name, r in steps.items():
                if "error" in r:
                    lines.append(f"| {name} | {r['error']} | | | |")
                    continue
                lines.append(
                    f"| {name} | {r['ms']:.3f} | {fmt(r.get('GB_per_s'), '{:.0f}')} "
                    f"| {fmt(r.get('TFLOP_per_s'), '{:.0f}')} "
                    f"| {fmt(r.get('max_abs_diff_vs_float32'), '{:.2g}')} |"
                )
    lines += ["", *results["notes"]]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for the JSON and markdown")
    p.add_argument("--models", default=",".join(SIZES), help="comma-separated preset names")
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--torch-python", default=sys.executable)
    p.add_argument("--torch-device", default="auto", help="auto (cuda, mps or none), cpu, none")
    p.add_argument("--no-levers", action="store_true")
    p.add_argument(
        "--levers",
        default="",
        help="only the levers whose names contain one of "
        "these comma-separated words (and the default, which the others are against)",
    )
    p.add_argument(
        "--variants",
        default=";".join(COMPARED),
        help="variants timed in every round beside the default, separated by ';' ('' for none)",
    )
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="default: the card's spec sheet figure"
    )
    p.add_argument("--max-seconds", type=float, default=None, help="stop starting new work after")
    p.add_argument("--smoke", action="store_true", help="the fixture-sized model, batch 2, 1 round")
    a = p.parse_args()
    start = time.perf_counter()
    sizes = {"aim-tiny": 2} if a.smoke else {m: SIZES[m] for m in a.models.split(",")}
    rounds, warmup, iters = (1, 1, 1) if a.smoke else (a.rounds, a.warmup, a.iters)
    torch_device = "cpu" if a.smoke and a.torch_device == "auto" else a.torch_device
    a.out.mkdir(parents=True, exist_ok=True)
    torch_side = Torch(a.torch_python, torch_device)
    compared = [v for v in a.variants.split(";") if v]
    unknown = [v for v in compared if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    gpu = bench.gpu() or f"no GPU: {mx.default_device()}"
    spec_tflops, peak_source = spec_peak(gpu)
    if a.peak_tflops is None:
        a.peak_tflops = spec_tflops
    else:
        peak_source = "given with --peak-tflops"
    results = {
        "meta": {
            "gpu": gpu,
            "mlx_version": mx.__version__,
            "buffer_setting": runtime.describe(),
            "torch": torch_side.info,
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "rounds": rounds,
            "warmup": warmup,
            "iters": iters,
            "peak_tflops": a.peak_tflops,
            "peak_source": peak_source,
        },
        "comparison": [],
        "levers": [],
        "notes": [],
    }

    def save():
        (a.out / "vs_pytorch_gpu.json").write_text(json.dumps(results, indent=1))
        (a.out / "vs_pytorch_gpu.md").write_text(markdown(results))

    def out_of_time(what: str) -> bool:
        if a.max_seconds is not None and time.perf_counter() - start > a.max_seconds:
            results["notes"].append(f"not run (time budget of {a.max_seconds:g} s): {what}")
            return True
        return False

    for name, batch in sizes.items():
        args = model_args(name)
        for dtype in a.dtypes.split(","):
            if out_of_time(f"{name} {dtype}"):
                continue
            row = {"model": name, "batch": batch, "dtype": dtype, "rounds": [], "summary": {}}
            results["comparison"].append(row)
            try:
                model = bench.random_model(args, MX_DTYPES[dtype])
                for _ in range(rounds):
                    timed = {}
                    for variant in [None, *compared]:
                        try:  # a variant (or the default) that fails: say so, keep the rest
                            with patched(VARIANTS[variant] if variant else ()):
                                timed[variant] = measure_mlx(
                                    name, batch, dtype, model, warmup, iters
                                )
                        except Exception as e:
                            timed[variant] = {"error": f"{type(e).__name__}: {e}"[:300]}
                    mlx_row = timed.pop(None)
                    variant_rows = timed
                    torch_row = torch_side.measure(args, batch, dtype, warmup, iters)
                    row["rounds"].append(
                        {"mlx": mlx_row, "variants": variant_rows, "torch": torch_row}
                    )
                    print(name, dtype, json.dumps(row["rounds"][-1]), flush=True)
            except Exception as e:  # e.g. out of memory: record it, go on
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            model = None
            gc.collect()
            mx.clear_cache()
            row["summary"] = summarize(row["rounds"], a.peak_tflops) if row["rounds"] else {}
            row["variant_summaries"] = {
                v: summarize(row["rounds"], a.peak_tflops, v) for v in compared if row["rounds"]
            }
            save()
    torch_side.close()

    if not a.no_levers:
        lever_model = "aim-tiny" if a.smoke else "aim-600M"
        words = [w for w in a.levers.split(",") if w]
        chosen = [
            spec for i, spec in enumerate(levers(a.smoke))
            if i == 0 or not words or any(w in spec["lever"] for w in words)
        ]  # fmt: skip
        for spec in chosen:
            if out_of_time(spec["lever"]):
                continue
            spec = {
                "model": lever_model,
                "dtype": "bfloat16",
                "batch": sizes.get(lever_model, 64),
                "warmup": warmup,
                "iters": iters,
                **spec,
            }
            spec["result"] = lever_in_subprocess(spec)
            print("lever", json.dumps(spec), flush=True)
            results["levers"].append(spec)
            save()
    save()
    print((a.out / "vs_pytorch_gpu.md").read_text())


if __name__ == "__main__":
    if sys.argv[1:2] == ["--lever"]:
        run_lever(json.loads(sys.argv[2]))
    else:
        main()
