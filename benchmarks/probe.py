"""Your own classifier: feature extraction, head training speed and memory.

    python benchmarks/probe.py [--images 10000] [--work DIR]

Each figure comes from a fresh child process (peak RSS from getrusage, MLX's peak memory):

- extraction images/s (`aim_mlx.probe.features.extract`: decode, hash, trunk, float16 write),
  for the fixture-shaped trunk (embed 64, 8 blocks) and an aim-600M-shaped one, random weights;
- head training over synthetic aim-600M-shaped cached features (256 x 1536 float16 per image,
  the cache's own format, 100 classes): seconds per epoch per 1,000 images and GFLOP/s of the
  training step at batch 32 (counted as 3x the forward pass's matmul FLOPs), and the peak
  memory of one epoch over 1,000 and over `--images` cached images (the attention head's
  epoch over all `--images` only with --attention-epoch: it takes long on a CPU).

The synthetic features take `--images` x 786 KB of disk under `--work` (default
benchmarks/out/probe); the script checks the free space first.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aim_mlx  # noqa: F401  (first: it loads an optimized BLAS before mlx.core)

SHAPE_600M = (256, 1536)
CLASSES = 100


def child_extract(trunk: str, n: int) -> dict:
    import mlx.core as mx
    import numpy as np
    from PIL import Image

    from aim_mlx.models import AIM, ModelArgs, preset_args
    from aim_mlx.probe.data import Sample
    from aim_mlx.probe.features import TrunkInfo, extract

    if trunk == "fixture":
        args = ModelArgs(embed_dim=64, num_blocks=8, num_heads=4, probe_layers=range(1, 7))
    else:
        args = preset_args("aim-600M")
    model = AIM(args)
    mx.eval(model.parameters())
    info = TrunkInfo(
        trunk,
        f"{time.time_ns():064x}",
        "float32",
        "none",
        args.embed_dim,
        args.num_blocks,
        args.img_size,
    )
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["AIM_MLX_CACHE"] = str(Path(tmp) / "cache")
        rng = np.random.default_rng(0)
        samples = []
        for i in range(n + 8):
            path = Path(tmp) / f"{i}.png"
            Image.fromarray(rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)).save(path)
            samples.append(Sample(str(path), 0))
        extract(model, info, samples[:8], batch_size=8)  # warm-up
        start = time.perf_counter()
        _, ext = extract(model, info, samples[8:], batch_size=8)
        seconds = time.perf_counter() - start
    assert ext.computed == n
    return dict(trunk=trunk, images=n, seconds=seconds, images_per_s=n / seconds)


def synthetic_features(work: Path, n: int):
    """A feature set of n random aim-600M-shaped images (float16), created once."""
    import numpy as np

    from aim_mlx.probe.features import FeatureSet

    os.environ["AIM_MLX_CACHE"] = str(work / "cache")
    store = FeatureSet.open("synthetic-aim-600M-shaped", {"synthetic": True})
    rng = np.random.default_rng(0)
    for i in range(n):
        key = f"{i:06d}"
        if not store.has(key):
            x = rng.standard_normal(SHAPE_600M, dtype=np.float32)
            store.write(key, (x + (i % CLASSES) * 0.01).astype(np.float16))
    return store, [f"{i:06d}" for i in range(n)]


def child_train(work: str, n: int, kind: str, batch: int, steps: int | None) -> dict:
    import mlx.core as mx
    import numpy as np

    from aim_mlx.bench import attention_head_flops
    from aim_mlx.models import preset_args
    from aim_mlx.probe.head import make_head
    from aim_mlx.probe.training import Settings, fit

    store, keys = synthetic_features(Path(work), n)
    if steps:  # time a few steps only
        keys = keys[: steps * batch]
    labels = np.arange(len(keys), dtype=np.int32) % CLASSES
    val = (keys[:batch], labels[:batch])
    args = preset_args("aim-600M")
    mx.random.seed(0)
    module = make_head(kind, args, CLASSES)
    module.bn.running_mean = mx.zeros(SHAPE_600M[1])
    module.bn.running_var = mx.ones(SHAPE_600M[1])
    settings = Settings(kind=kind, epochs=1, batch_size=batch)
    mx.reset_peak_memory()
    start = time.perf_counter()
    history, _ = fit(module, store, (keys, labels), val, settings, log=lambda _: None)
    seconds = time.perf_counter() - start
    train_seconds = history[0].seconds  # the epoch incl. its validation batch
    N, D = SHAPE_600M
    forward = N * D + 2 * D * CLASSES  # linear: the mean, the linear layer
    if kind == "attention":
        forward = attention_head_flops(N, D, args.num_heads, CLASSES)
    flops = 3 * forward * len(keys)
    return dict(
        kind=kind,
        images=len(keys),
        batch=batch,
        seconds=seconds,
        s_per_epoch_per_1k=1000 * train_seconds / len(keys),
        gflops_per_s=flops / train_seconds / 1e9,
        mlx_peak_gib=mx.get_peak_memory() / 2**30,
        peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    )


def run_child(*argv) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", *map(str, argv)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=10_000, help="cached images for the memory run")
    p.add_argument("--work", type=Path, default=Path(__file__).parent / "out" / "probe")
    p.add_argument("--extract-600m", type=int, default=8, help="images for aim-600M extraction")
    p.add_argument(
        "--attention-epoch", action="store_true", help="also a whole attention epoch on --images"
    )
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        what, *rest = a.child
        if what == "extract":
            row = child_extract(rest[0], int(rest[1]))
        else:
            work, n, kind, batch, steps = rest
            row = child_train(work, int(n), kind, int(batch), int(steps) or None)
        print(json.dumps(row))
        return

    a.work.mkdir(parents=True, exist_ok=True)
    need = a.images * SHAPE_600M[0] * SHAPE_600M[1] * 2 * 1.01
    free = shutil.disk_usage(a.work).free
    print(f"disk: {free / 1e9:.1f} GB free under {a.work}, the features need {need / 1e9:.1f} GB")
    if free < need * 1.1:
        sys.exit(f"not enough disk for {a.images} images; pass a smaller --images")

    for trunk, n in (("fixture", 64), ("aim-600M", a.extract_600m)):
        r = run_child("extract", trunk, n)
        print(f"extract {trunk:<9} {r['images']:>4} images  {r['images_per_s']:7.2f} img/s")
    print("writing synthetic features ...", flush=True)
    start = time.perf_counter()
    run_child("train", a.work, a.images, "linear", 32, 1)  # creates the feature set
    print(f"  {a.images} images in {time.perf_counter() - start:.0f} s")
    rows = [
        run_child("train", a.work, a.images, "attention", 32, 20),
        run_child("train", a.work, a.images, "linear", 32, 0),
        run_child("train", a.work, 1000, "linear", 32, 0),
        run_child("train", a.work, 1000, "attention", 32, 0),
    ]
    if a.attention_epoch:  # aim-600M-shaped: about 75 s per 1,000 images on 2 CPU cores
        rows.append(run_child("train", a.work, a.images, "attention", 32, 0))
    print(
        f"{'head':<10} {'images':>7} {'batch':>5} {'s/epoch/1k img':>14} {'GFLOP/s':>8} "
        f"{'MLX peak GiB':>12} {'peak RSS GiB':>12}"
    )
    for r in rows:
        print(
            f"{r['kind']:<10} {r['images']:>7} {r['batch']:>5} {r['s_per_epoch_per_1k']:>14.2f} "
            f"{r['gflops_per_s']:>8.1f} {r['mlx_peak_gib']:>12.2f} {r['peak_rss_gib']:>12.2f}"
        )


if __name__ == "__main__":
    main()
