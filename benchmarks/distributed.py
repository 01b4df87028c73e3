"""`aim-mlx embed` in one process against two ranks under `mlx.launch` on this machine.

Makes an aim-600M-shaped model folder (random float32 weights, the best-layers head) and a
folder of random 256x256 JPEGs the first time, then runs, interleaved, each command in fresh
processes: `aim-mlx embed` alone, and `mlx.launch -n 2 --backend ring` of the same command (the
two ranks share this machine's cores: each gets cpu_count // 2 of them). Wall time of the whole
command (start, model load, images, write); both outputs are checked to agree.

    python benchmarks/distributed.py [--workdir benchmarks/out/distributed] [--images 16]
        [--repeats 2] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aim_mlx  # noqa: F401  (first: the BLAS)

# isort: split
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from PIL import Image

from aim_mlx.bench import random_model
from aim_mlx.models import preset_args

BIN = Path(sys.executable).parent


def make_model(folder: Path) -> Path:
    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    args = preset_args("aim-600M", "best")
    model = random_model(args, mx.float32)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    fixture = Path(__file__).resolve().parents[1] / "tests/fixtures/reference/fixtures.json"
    config = {
        **json.loads(fixture.read_text())["config"],
        "model_type": "aim-v1",
        "name": "aim-600M-random",
        "embed_dim": args.embed_dim,
        "num_blocks": args.num_blocks,
        "num_heads": args.num_heads,
        "probe_layers": list(args.probe_layers),
        "dtype": "float32",
        "quantization": None,
        "format_version": 1,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


def make_images(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        path = folder / f"{i:04d}.jpg"
        if not path.exists():
            Image.fromarray(rng.integers(0, 256, (256, 256, 3), np.uint8)).save(path)
    return folder


def timed(command: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    run = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if run.returncode != 0 or "wrote" not in run.stderr:
        sys.exit(f"failed: {' '.join(command)}\n{run.stderr[-3000:]}")
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/out/distributed"))
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    opts = parser.parse_args()
    work = opts.workdir.resolve()
    model = make_model(work / "aim-600M-random")
    images = make_images(work / f"images{opts.images}", opts.images)
    embed = [str(BIN / "aim-mlx"), "embed", str(images), "-m", str(model), "-b",
             str(opts.batch_size), "--no-progress", "-o"]  # fmt: skip
    launch = [str(BIN / "mlx.launch"), "-n", "2", "--backend", "ring", "--python", sys.executable]
    configs = {"one process": embed + ["one.npy"], "two ranks": launch + embed + ["two.npy"]}

    print(f"# {platform.machine()}, {os.cpu_count()} cores, MLX {mx.__version__}; aim-600M "
          f"float32 (random weights), {opts.images} images, batch {opts.batch_size}")  # fmt: skip
    times = {name: [] for name in configs}
    for repeat in range(opts.repeats):
        order = list(configs) if repeat % 2 == 0 else list(reversed(configs))
        for name in order:
            seconds = timed(configs[name], work)
            times[name].append(seconds)
            row = dict(config=name, repeat=repeat, seconds=round(seconds, 2))
            row["images_per_s"] = round(opts.images / seconds, 3)
            print(json.dumps(row), flush=True)
    one, two = np.load(work / "one.npy"), np.load(work / "two.npy")
    assert one.shape == two.shape, (one.shape, two.shape)
    print(f"# outputs agree: max |one - two| = {np.abs(one - two).max():.2g}")
    ratios = [a / b for a, b in zip(times["one process"], times["two ranks"], strict=True)]
    for name, values in times.items():
        print(f"# {name}: median {statistics.median(values):.1f} s "
              f"({min(values):.1f}-{max(values):.1f})")  # fmt: skip
    print(f"# speed of two ranks / one process: median {statistics.median(ratios):.2f}x "
          f"({min(ratios):.2f}x-{max(ratios):.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
