"""Converting a full-size aim-600M float32 checkpoint: time and peak RSS, against reading it.

Writes an aim-600M-shaped backbone + head pair (random weights, official key names and shapes,
PyTorch zip format, about 2.75 GB) the first time, then runs, each in a fresh process and
interleaved: reading both files once; copying them (the floor for any tool that must write its
output); `aim_mlx.convert.convert` to float32, float16 and 4-bit. Peak RSS is each child's VmHWM,
CPU time its user + system time.
Loading every tensor, and the float32 conversion, also run with the zip records' CRC-32 checks off
(`verified=True`, as for a hub download whose SHA-256 was checked), and each round's ratio of the
two is printed; `--crc` runs only these pairs. The float32 and float16 conversions also run without
the converter's NaN / Inf check (patched out in the child), ratios printed the same way; `--finite`
runs only those pairs.

    python benchmarks/convert_600m.py [--workdir benchmarks/out] [--repeats 2] [--crc | --finite]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from torch_zip import random_maker, save_torch_zip  # noqa: E402

CRC_PAIRS = (("load tensors", "load, no CRC"), ("convert float32", "float32, no CRC"))
FINITE_PAIRS = (
    ("convert float32", "float32, no NaN check"),
    ("convert float16", "float16, no NaN check"),
)
SHAPES = ROOT / "tests/fixtures/reference/official_parameter_shapes.json"

# Each child prints its own peak RSS (VmHWM) last: ru_maxrss would include the parent's, from fork.
PEAK = """
print([line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")][0])
"""
READ = (
    """
import sys
for path in sys.argv[1:]:
    with open(path, "rb") as f:
        while f.read(1 << 22):
            pass
"""
    + PEAK
)

COPY = (
    """
import shutil, sys
shutil.copyfile(sys.argv[1], sys.argv[3] + ".backbone")
shutil.copyfile(sys.argv[2], sys.argv[3] + ".head")
"""
    + PEAK
)

CONVERT = (
    """
import sys
from aim_mlx.convert import convert
backbone, head, out, dtype, bits, crc, finite = sys.argv[1:]
if finite == "off":  # the converter's NaN / Inf check skipped, to measure its cost
    import aim_mlx.convert.converter as converter
    converter._all_finite = lambda w: True
convert(out, backbone=backbone, head=head, dtype=dtype, quantize=bits != "0",
        q_bits=int(bits) or 8, progress=False, force=True, verified=crc == "off")
"""
    + PEAK
)


LOAD = (
    """
import sys
import aim_mlx
import mlx.core as mx
from aim_mlx.convert.checkpoint import open_checkpoint
for path in sys.argv[1:3]:
    ckpt = open_checkpoint(path, verified=sys.argv[3] == "off")
    for key in ckpt.keys():
        mx.eval(ckpt.load(key))
"""
    + PEAK
)


def write_checkpoints(workdir: Path) -> tuple[Path, Path]:
    backbone = workdir / "aim_600m_2bimgs_attnprobe_backbone.pth"
    head = workdir / "aim_600m_2bimgs_attnprobe_head_best_layers.pth"
    if backbone.exists() and head.exists():
        return backbone, head
    import numpy as np

    shapes = json.loads(SHAPES.read_text())["aim-600M"]
    parts = {"backbone": {}, "head": {}}
    for i, (key, (shape, dtype)) in enumerate(shapes.items()):
        part = parts["head" if key.startswith("head.") else "backbone"]
        if dtype == "int64":
            part[key] = np.array(1000, dtype=np.int64)
        elif key.endswith("running_var"):
            part[key] = np.ones(shape, np.float32)
        else:
            part[key] = (tuple(shape), np.float32, random_maker(tuple(shape), seed=i))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"writing {backbone.name} and {head.name} ...", flush=True)
    save_torch_zip(backbone, parts["backbone"])
    save_torch_zip(head, parts["head"])
    return backbone, head


def run_child(code: str, *args) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak RSS in MB) of a fresh Python process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], check=True, capture_output=True, text=True
    )
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return elapsed, cpu, int(proc.stdout.split()[-1]) / 1024


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks/out")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--crc", action="store_true", help="only the CRC-32 on / off pairs")
    parser.add_argument("--finite", action="store_true", help="only the NaN check on / off pairs")
    args = parser.parse_args()
    backbone, head = write_checkpoints(args.workdir)
    size_gb = (backbone.stat().st_size + head.stat().st_size) / 1e9
    out = args.workdir / "converted"
    cases = {
        "read both files": (READ, backbone, head),
        "copy both files": (COPY, backbone, head, args.workdir / "copy"),
        "load tensors": (LOAD, backbone, head, "on"),
        "load, no CRC": (LOAD, backbone, head, "off"),
        "convert float32": (CONVERT, backbone, head, out, "float32", 0, "on", "on"),
        "float32, no CRC": (CONVERT, backbone, head, out, "float32", 0, "off", "on"),
        "float32, no NaN check": (CONVERT, backbone, head, out, "float32", 0, "on", "off"),
        "convert float16": (CONVERT, backbone, head, out, "float16", 0, "on", "on"),
        "float16, no NaN check": (CONVERT, backbone, head, out, "float16", 0, "on", "off"),
        "convert 4-bit": (CONVERT, backbone, head, out, "float32", 4, "on", "on"),
    }
    pairs = (CRC_PAIRS if args.crc or not args.finite else ()) + (
        FINITE_PAIRS if args.finite or not args.crc else ()
    )
    if args.crc or args.finite:
        keep = {"read both files", *(name for pair in pairs for name in pair)}
        cases = {k: v for k, v in cases.items() if k in keep}
    results = {name: [] for name in cases}
    for i in range(args.repeats):
        order = list(cases) if i % 2 == 0 else list(cases)[::-1]  # no case always goes first
        for name in order:
            code, *child_args = cases[name]
            results[name].append(run_child(code, *child_args))
            # Untimed: remove the output and flush dirty pages, so that no case pays for the
            # write-back or deletion of the one before it.
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
    shutil.rmtree(out, ignore_errors=True)
    for leftover in args.workdir.glob("copy.*"):
        leftover.unlink()

    print(
        f"\naim-600M checkpoint, {size_gb:.2f} GB, {platform.machine()}, {os.cpu_count()} cores,"
        f" Python {platform.python_version()}, best of {args.repeats}"
    )
    read_time = min(t for t, _, _ in results["read both files"])
    print(f"{'case':<22}{'time s':>9}{'x read':>9}{'CPU s':>8}{'peak RSS MB':>14}")
    for name, runs in results.items():
        t = min(r[0] for r in runs)
        cpu = min(r[1] for r in runs)
        rss = max(r[2] for r in runs)
        print(f"{name:<22}{t:>9.1f}{t / read_time:>9.1f}{cpu:>8.1f}{rss:>14.0f}")
    for on, off in pairs:
        check = "CRC-32" if "CRC" in off else "NaN check"
        for what, i in (("time", 0), ("CPU time", 1)):
            rounds = zip(results[on], results[off], strict=True)
            ratios = sorted(a[i] / b[i] for a, b in rounds)
            print(
                f"{on}: {check} on / off, {what}, per round (sorted): "
                f"{', '.join(f'{r:.3f}' for r in ratios)} (median {statistics.median(ratios):.3f})"
            )


if __name__ == "__main__":
    main()
