"""Probe training's optimizer and default learning rate, on two synthetic datasets.

Trains heads on the small reference trunk (tests/fixtures/reference/hf_repo) for each kind,
with MLX's AdamW as aim-mlx used it first (no bias correction, lr 1e-3), then bias-corrected
with decay on every parameter ("decay all", lr 3e-3), and as now ("AdamW": bias-corrected, no
decay of biases and the attention head's query) at several learning rates; prints validation
top-1 over the epochs. The datasets are coloured stripes, five classes: "easy" (100 images,
3 steps an epoch) and "noisy" (400 images with overlapping colours, 10 steps an epoch).

    python benchmarks/probe_lr.py [--work /tmp/probe-lr]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from PIL import Image

import aim_mlx  # noqa: F401  (first: it loads an optimized BLAS before mlx.core)

COLOURS = {
    "red": (0.8, 0.2, 0.2),
    "yellow": (0.8, 0.75, 0.2),
    "green": (0.2, 0.7, 0.3),
    "blue": (0.2, 0.3, 0.8),
    "magenta": (0.75, 0.2, 0.7),
}
TRUNK = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "reference" / "hf_repo"


def draw(root: Path, per_class: int, colour_noise: float, seed: int, size: int = 64) -> Path:
    """Stripes of random angle and frequency over a class colour, with noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            angle, f, p = rng.uniform(0, np.pi), rng.uniform(2, 8), rng.uniform(0, 1)
            t = np.sin(2 * np.pi * (f * (np.cos(angle) * xx + np.sin(angle) * yy) + p))
            c = np.array(colour) + rng.normal(0, colour_noise, 3)
            img = c * rng.uniform(0.6, 1.1) * (1 + rng.uniform(0.1, 0.5) * t[..., None])
            img = img + rng.normal(0, 0.06, (size, size, 3))
            pixels = (np.clip(img, 0, 1) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


def uncorrected(settings, steps_per_epoch):
    """MLX's AdamW default, as aim-mlx trained first: no bias correction."""
    import mlx.optimizers as optim

    from aim_mlx.probe.training import schedule

    return optim.AdamW(schedule(settings, steps_per_epoch), weight_decay=settings.weight_decay)


def decay_all(settings, steps_per_epoch):
    """Bias-corrected, with decay on every parameter, as aim-mlx trained until 2026-11-29."""
    import mlx.optimizers as optim

    from aim_mlx.probe.training import schedule

    rate = schedule(settings, steps_per_epoch)
    return optim.AdamW(rate, weight_decay=settings.weight_decay, bias_correction=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/probe-lr")
    work = Path(parser.parse_args().work)
    os.environ.setdefault("AIM_MLX_CACHE", str(work / "cache"))
    from aim_mlx.probe import training
    from aim_mlx.probe.training import Settings, train

    corrected = training.make_optimizer
    datasets = {"easy": (20, 0.08, 10), "noisy": (80, 0.2, 3)}
    made = {"no correction": uncorrected, "decay all": decay_all, "AdamW": corrected}
    arms = [("no correction", 1e-3), ("decay all", 3e-3)]
    arms += [("AdamW", 1e-3), ("AdamW", 3e-3), ("AdamW", 5e-3)]
    print("| data | head | optimizer | lr | val top-1 at epoch 1/3/5/10/20/30 | best | "
          "first 100% | val loss at 30 |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for data_name, (per_class, noise, seed) in datasets.items():
        data = work / data_name
        if not data.exists():
            draw(data, per_class, noise, seed)
        for kind in ("attention", "linear"):
            for optimizer, lr in arms:
                training.make_optimizer = made[optimizer]
                res = train(TRUNK, data, work / "heads" / f"{data_name}-{kind}-{optimizer}-{lr}",
                            settings=Settings(kind=kind, lr=lr), force=True,
                            log=lambda _: None)  # fmt: skip
                h = res.history
                curve = "/".join(f"{h[i - 1].val_top1:.0f}" for i in (1, 3, 5, 10, 20, 30))
                first = next((s.epoch for s in h if s.val_top1 >= 100), "-")
                row = [data_name, kind, optimizer, f"{lr:g}", curve, f"{res.best.val_top1:.1f}",
                       first, f"{h[-1].val_loss:.3f}"]  # fmt: skip
                print("| " + " | ".join(map(str, row)) + " |", flush=True)
    training.make_optimizer = corrected


if __name__ == "__main__":
    main()
