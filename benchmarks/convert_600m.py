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
runs only those pairs. The float32 conversion also runs with the SHA-256 of its output (which the
writer takes on a thread of its own) taken inline instead, and not taken at all; `--hash` runs
only these three.

    python benchmarks/convert_600m.py [--workdir benchmarks/out] [--repeats 2]
                                      [--crc | --finite | --hash]
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
HASH_PAIRS = (
    ("convert float32", "float32, no out hash"),
    ("float32, hash inline", "float32, no out hash"),
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
backbone, head, out, dtype, bits, crc, finite, out_hash = sys.argv[1:]
if finite == "off":  # the converter's NaN / Inf check skipped, to measure its cost
    import aim_mlx.convert.converter as converter
    converter._all_finite = lambda w: True
if out_hash != "thread":  # the output's SHA-256 taken inline, or not at all
    import hashlib
    import aim_mlx.convert.safetensors_writer as writer
    class Hash:
        def __init__(self):
            self.digest = hashlib.sha256()
        def update(self, data):
            if out_hash == "inline":
                self.digest.update(data)
        def hexdigest(self):
            return self.digest.hexdigest()
    writer._BackgroundHash = Hash
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
    parser.add_argument("--hash", action="store_true", help="only the output SHA-256 cases")
    args = parser.parse_args()
    backbone, head = write_checkpoints(args.workdir)
    size_gb = (backbone.stat().st_size + head.stat().st_size) / 1e9
    out = args.workdir / "converted"

    def converting(dtype, bits=0, crc="on", finite="on", out_hash="thread"):
        return (CONVERT, backbone, head, out, dtype, bits, crc, finite, out_hash)

    cases = {
        "read both files": (READ, backbone, head),
        "copy both files": (COPY, backbone, head, args.workdir / "copy"),
        "load tensors": (LOAD, backbone, head, "on"),
        "load, no CRC": (LOAD, backbone, head, "off"),
        "convert float32": converting("float32"),
        "float32, no CRC": converting("float32", crc="off"),
        "float32, no NaN check": converting("float32", finite="off"),
        "float32, hash inline": converting("float32", out_hash="inline"),
        "float32, no out hash": converting("float32", out_hash="off"),
        "convert float16": converting("float16"),
        "float16, no NaN check": converting("float16", finite="off"),
        "convert 4-bit": converting("float32", bits=4),
    }
    only = [name for name in ("crc", "finite", "hash") if getattr(args, name)]
    groups = {"crc": CRC_PAIRS, "finite": FINITE_PAIRS, "hash": HASH_PAIRS}
    pairs = tuple(p for name, group in groups.items() if not only or name in only for p in group)
    if only:
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
        check = "CRC-32" if "CRC" in off else "NaN check" if "NaN" in off else "output SHA-256"
        for what, i in (("time", 0), ("CPU time", 1)):
            rounds = zip(results[on], results[off], strict=True)
            ratios = sorted(a[i] / b[i] for a, b in rounds)
            print(
                f"{on}: {check} on / off, {what}, per round (sorted): "
                f"{', '.join(f'{r:.3f}' for r in ratios)} (median {statistics.median(ratios):.3f})"
            )


if __name__ == "__main__":
    main()
