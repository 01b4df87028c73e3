"""The user's first and later `aim-mlx classify` runs, at aim-600M size, against a local hub.

Serves an aim-600M-shaped checkpoint pair (random weights, official file names and layout, 2.75 GB;
written by convert_600m.py's helper and reused) from the tests' hub server on 127.0.0.1, registers
it under the name `aim-600M-random`, then times, each in a fresh process:

1. first use, `aim-mlx cache add aim-600M-random`: download, SHA-256 check, conversion into the
   cache (what the first `classify` does before it computes);
2. later use, with HF_HUB_OFFLINE=1: loading the cached model (`aim_mlx.load` + evaluating the
   weights); `aim-mlx models` (the CLI's start-up); `aim-mlx classify photo --model
   aim-600M-random` (start-up, loading and one image's forward pass, which dominates on a CPU).

    python benchmarks/first_run_600m.py [--workdir benchmarks/out] [--dtype float32]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from convert_600m import write_checkpoints  # noqa: E402
from hub_server import HubServer  # noqa: E402

REPO = "bench/AIM-600M-random"
PHOTO = ROOT / "tests/fixtures/reference/images/rocket.jpg"
# Runs the CLI and prints the process's peak RSS (VmHWM) to stderr on exit.
CLI = """
import atexit, sys
def peak():
    rss = [l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
    print("PEAK_KB", rss, file=sys.stderr)
atexit.register(peak)
from aim_mlx.cli import main
sys.argv[0] = "aim-mlx"
main()
"""
LOAD = """
import sys, mlx.core as mx, aim_mlx
model = aim_mlx.load("aim-600M-random", dtype=sys.argv[1], progress=False)
mx.eval(model.parameters())
"""


def sha256_prefix(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()[:8]


def timed(args: list[str], env: dict) -> tuple[float, float | None, str]:
    """(wall seconds, peak RSS MB or None, stderr) of a fresh process."""
    start = time.perf_counter()
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{args} failed:\n{proc.stderr}")
    peak = [line.split()[1] for line in proc.stderr.splitlines() if line.startswith("PEAK_KB")]
    return elapsed, int(peak[0]) / 1024 if peak else None, proc.stderr


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks/out")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    backbone, head = write_checkpoints(args.workdir)

    start = time.perf_counter()
    prefixes = {p.name: sha256_prefix(p) for p in (backbone, head)}
    hash_time = time.perf_counter() - start

    run_dir = args.workdir / "first-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    registry = run_dir / "registry.json"
    entry = {
        "name": "aim-600M-random",
        "repo": REPO,
        "backbone": {"filename": backbone.name, "sha256": prefixes[backbone.name]},
        "heads": {"best": {"filename": head.name, "sha256": prefixes[head.name]}},
        "probe_layers": {"best": list(range(14, 20))},
        "arch": {"embed_dim": 1536, "num_blocks": 24, "num_heads": 12},
        "params": 686_794_752,
    }
    registry.write_text(json.dumps({"models": [entry]}))
    server = HubServer({REPO: {backbone.name: backbone, head.name: head}}).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "AIM_MLX_"))}
    env.update(
        HF_ENDPOINT=server.url,
        HF_HOME=str(run_dir / "hf"),
        AIM_MLX_CACHE=str(run_dir / "cache"),
        AIM_MLX_REGISTRY=str(registry),
        HF_HUB_DISABLE_PROGRESS_BARS="1",
    )
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    cli = [sys.executable, "-c", CLI]
    model = ["--model", "aim-600M-random", "--dtype", args.dtype]
    add = [*cli, "cache", "add", "aim-600M-random", "--dtype", args.dtype]
    classify = [*cli, "classify", str(PHOTO), *model, "--json", "--no-progress"]
    try:
        rows = {"first use: download, SHA-256, convert (cache add)": timed(add, env)}
        rows["later: load the cached model (aim_mlx.load + eval)"] = timed(
            [sys.executable, "-c", LOAD, args.dtype], offline
        )
        rows["later: aim-mlx models (CLI start-up)"] = timed([*cli, "models"], offline)
        rows["later: classify 1 image (start-up, load, forward)"] = timed(classify, offline)
    finally:
        server.stop()
    downloaded = sum(len(server.downloads(n)) for n in (backbone.name, head.name))
    size_gb = (backbone.stat().st_size + head.stat().st_size) / 1e9
    shutil.rmtree(run_dir, ignore_errors=True)

    print(
        f"\naim-600M-shaped checkpoints, {size_gb:.2f} GB, dtype {args.dtype}, "
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"{downloaded} file downloads from 127.0.0.1 in all"
    )
    print(f"SHA-256 of both files in this process: {hash_time:.1f} s")
    print(f"{'case':<60}{'time s':>8}{'peak RSS MB':>13}")
    for name, (t, rss, _) in rows.items():
        print(f"{name:<60}{t:>8.1f}{(f'{rss:.0f}' if rss else '-'):>13}")


if __name__ == "__main__":
    main()
