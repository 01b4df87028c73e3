"""Core ML export of an official-size AIM: time, peak memory and package size.

Random weights (no download): `AIM(preset_args(NAME))` initialised by MLX, in float32 like a
default `aim-mlx convert` folder. Each configuration runs in its own process so that its peak
RSS (ru_maxrss) is its own. `check_s` is the float16 range check (an MLX forward pass on two
images) inside `export_s`. On Linux, aim-mlx loads OpenBLAS itself (--no-openblas runs the
children with AIM_MLX_BLAS=off): stock `mlx[cpu]` matmuls are ~40x slower without it.

    python benchmarks/coreml_export.py --model aim-600M --configs float16:none float16:palettize4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_one(name: str, precision: str, compress: str, target: str, out_dir: Path) -> dict:
    import mlx.core as mx

    from aim_mlx.export import coreml
    from aim_mlx.models import AIM, preset_args

    check_s = []
    check = coreml.check_fp16_range

    def timed_check(*args):
        t = time.perf_counter()
        check(*args)
        check_s.append(time.perf_counter() - t)

    coreml.check_fp16_range = timed_check

    t0 = time.perf_counter()
    model = AIM(preset_args(name))
    mx.eval(model.parameters())
    t1 = time.perf_counter()
    out = out_dir / f"{name}-{precision}-{compress}.mlpackage"
    coreml.export_coreml(
        model, out, precision=precision, compress=compress, target=target, source="random weights"
    )
    t2 = time.perf_counter()
    return {
        "model": name,
        "params": model.num_parameters(),
        "precision": precision,
        "compress": compress,
        "target": target,
        "init_s": round(t1 - t0, 1),
        "export_s": round(t2 - t1, 1),
        "check_s": round(sum(check_s), 1),
        "peak_rss_gib": round(peak_rss_gib(), 2),
        "package_mib": round(dir_size(out) / 2**20, 1),
        "weights_mib": round(coreml.weight_file_size(out) / 2**20, 1),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="aim-600M")
    p.add_argument(
        "--configs",
        nargs="+",
        default=["float16:none", "float16:palettize4"],
        help="precision:compress pairs",
    )
    p.add_argument("--target", default="iOS18")
    p.add_argument("--out-dir", type=Path, default=None, help="work folder (default: /tmp)")
    p.add_argument("--no-openblas", action="store_true", help="do not preload OpenBLAS")
    p.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # child process: precision compress
    a = p.parse_args()

    if a.one:
        from aim_mlx import blas

        print(
            json.dumps({**run_one(a.model, *a.one, a.target, a.out_dir), "blas": blas.describe()})
        )
        return

    rows = []
    with tempfile.TemporaryDirectory(dir=a.out_dir) as tmp:
        for config in a.configs:
            precision, compress = config.split(":")
            cmd = [sys.executable, __file__, "--model", a.model, "--target", a.target]
            cmd += ["--out-dir", tmp, "--one", precision, compress]
            env = {**os.environ, "AIM_MLX_BLAS": "off"} if a.no_openblas else None
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode:
                sys.exit(f"{config} failed:\n{res.stderr[-3000:]}")
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)

    keys = [
        "precision",
        "compress",
        "target",
        "init_s",
        "export_s",
        "peak_rss_gib",
        "package_mib",
        "weights_mib",
    ]
    print(f"\n{a.model} ({rows[0]['params']:,} parameters, random weights)\n")
    print("| " + " | ".join(keys) + " |")
    print("|" + " --- |" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
