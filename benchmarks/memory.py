"""Peak memory per size, dtype and quantization, each configuration in a fresh process.

    python benchmarks/memory.py [--sizes aim-600M,aim-7B] [--out benchmarks/out/memory.jsonl]

Runs `aim-mlx bench --json` (random weights, batch 1, one timed pass) for every combination
and reports MLX's peak memory (`mx.get_peak_memory`: weights plus the largest working set),
the weights alone, and the process's peak resident set. A configuration whose weights alone
would not fit in this machine's memory is reported as such, not run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from aim_mlx.constants import ITEMSIZE, GiB

PARAMS = {
    "aim-600M": 686_794_752,
    "aim-1B": 1_219_813_376,
    "aim-3B": 2_741_981_184,
    "aim-7B": 6_483_066_880,
}  # with head (SPEC.md)
CONFIGS = {
    "f32": ("float32", None),
    "f16": ("float16", None),
    "bf16": ("bfloat16", None),
    "q8": ("float16", 8),
    "q4": ("float16", 4),
}


def total_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def run_one(size: str, dtype: str, bits: int | None, batch: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "aim_mlx.cli",
        "bench",
        "--model",
        size,
        "--dtype",
        dtype,
        "--batch-size",
        str(batch),
        "--warmup",
        "0",
        "--iters",
        "1",
        "--json",
    ]
    if bits:
        cmd += ["-q", "--q-bits", str(bits)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    row = json.loads(out.splitlines()[-1])
    row["command"] = " ".join(["aim-mlx", *cmd[3:]])
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default=",".join(PARAMS))
    p.add_argument("--configs", default=",".join(CONFIGS), help="of " + ",".join(CONFIGS))
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--out", help="append JSON rows here")
    a = p.parse_args()
    limit = total_memory()
    print("| model | weights | peak memory (MLX) | weights alone | peak RSS | img/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for size in a.sizes.split(","):
        for dtype, bits in (CONFIGS[c] for c in a.configs.split(",")):
            label = f"{dtype}" if not bits else f"{bits}-bit ({dtype} scales)"
            per_weight = ITEMSIZE[dtype]
            if not bits and PARAMS[size] * per_weight > 0.9 * limit:
                need = PARAMS[size] * per_weight / GiB
                print(
                    f"| {size} | {label} | does not fit: the weights alone are {need:.1f} GiB, "
                    f"this machine has {limit / GiB:.0f} GiB | | | |",
                    flush=True,
                )
                continue
            row = run_one(size, dtype, bits, a.batch_size)
            print(
                f"| {size} | {label} | {row['peak_memory_gb']:.2f} GiB | "
                f"{row['weight_gb']:.2f} GiB | {row['max_rss_gb']:.2f} GiB | "
                f"{row['images_per_s']:.3g} |",
                flush=True,
            )
            if a.out:
                Path(a.out).parent.mkdir(parents=True, exist_ok=True)
                with open(a.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
