"""Training a head on cached features: AdamW, linear warmup + cosine decay, seeded, the best
epoch (validation top-1, then validation loss) kept."""

from __future__ import annotations

import dataclasses
import math
import numbers
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from .. import __version__, distributed
from ..checks import is_whole
from ..models import AIM, PRESETS, last_probe_layers
from ..models.aim import check_probe_layers
from ..resolve import known_num_blocks
from . import data, features, head
from .data import ProbeError, Sample

MAX_SEED = 2**64 - 1


@dataclass
class Settings:
    kind: str = "attention"
    epochs: int = 30
    batch_size: int = 32
    lr: float = 3e-3  # peak learning rate (why 3e-3: benchmarks/probe_lr.py and its write-up)
    weight_decay: float = 0.05
    warmup_epochs: float = 3.0
    seed: int = 0


@dataclass
class EpochStats:
    epoch: int
    loss: float
    train_top1: float  # percent, on the training batches as they were seen
    val_loss: float
    val_top1: float
    val_top5: float | None  # with more than 5 classes
    seconds: float


@dataclass
class TrainResult:
    out: Path
    history: list[EpochStats]
    best: EpochStats
    classes: list[str]
    train_images: int
    val_images: int
    extracted: int  # images run through the trunk (the others came from the feature cache)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (path, why): files left out


def parse_probe_layers(value, args) -> tuple[int, ...]:
    """best | last | "I,J,..." (or ints) -> block indices of a trunk with ModelArgs `args`.

    best: the official best-layers head's blocks for an official size, else the model's own.
    """
    if value is None:
        return tuple(args.probe_layers)
    if value == "last":
        return last_probe_layers(args.num_blocks)
    if value == "best":
        for p in PRESETS.values():
            if (p["embed_dim"], p["num_blocks"]) == (args.embed_dim, args.num_blocks):
                return tuple(p["best"])
        return tuple(args.probe_layers)
    layers = value  # a list: integers only (check_probe_layers), 1.5 is not rounded
    if isinstance(value, str):
        try:
            layers = tuple(int(i) for i in value.split(","))
        except ValueError:
            raise ProbeError(
                "probe_layers (--probe-layers) must be best, last or block indices like "
                f"3,4,5; got {value!r}"
            ) from None
    try:
        return check_probe_layers(layers, args.num_blocks)  # distinct blocks of the trunk
    except ValueError as e:
        raise ProbeError(f"probe_layers (--probe-layers): {e}") from None


def feature_stats(store: features.FeatureSet, keys: list[str], batch: int = 64):
    """Per-channel mean and (biased) variance over every token of the given images."""
    total = total_sq = None
    count = 0
    for i in range(0, len(keys), batch):
        x = store.load(keys[i : i + batch]).astype(np.float64)
        x = x.reshape(-1, x.shape[-1])
        s, sq = x.sum(axis=0), np.square(x).sum(axis=0)
        total, total_sq = (s, sq) if total is None else (total + s, total_sq + sq)
        count += len(x)
    mean = total / count
    var = np.maximum(total_sq / count - mean**2, 0.0)
    return mx.array(mean.astype(np.float32)), mx.array(var.astype(np.float32))


def batches(
    store: features.FeatureSet, keys: list[str], labels: np.ndarray, size: int, order=None
) -> Iterator[tuple[mx.array, mx.array]]:
    """(features float32 (B, N, D), labels (B,)) batches; the next one is read from disk while
    the current one is used, so memory holds two batches whatever the dataset size."""
    order = np.arange(len(keys)) if order is None else order
    chunks = [order[i : i + size] for i in range(0, len(order), size)]

    def read(idx):
        return store.load([keys[i] for i in idx]), labels[idx]

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(read, chunks[0]) if chunks else None
        for i in range(len(chunks)):
            x, y = pending.result()
            pending = pool.submit(read, chunks[i + 1]) if i + 1 < len(chunks) else None
            yield mx.array(x).astype(mx.float32), mx.array(y)


def schedule(settings: Settings, steps_per_epoch: int):
    total = max(1, settings.epochs * steps_per_epoch)
    warmup = min(int(settings.warmup_epochs * steps_per_epoch), total // 2)
    cosine = optim.cosine_decay(settings.lr, total - warmup, settings.lr * 0.01)
    if warmup == 0:
        return cosine
    return optim.join_schedules(
        [optim.linear_schedule(settings.lr / warmup, settings.lr, warmup), cosine], [warmup]
    )


def decays(path: str, weight: mx.array) -> bool:
    """Whether weight decay applies: to the weight matrices, not to biases or the attention
    head's query (`cls_token`), as timm's and MAE's probes leave out biases, norms and tokens."""
    return weight.ndim >= 2 and path.rsplit(".", 1)[-1] != "cls_token"


def make_optimizer(settings: Settings, steps_per_epoch: int) -> optim.Optimizer:
    """AdamW as PyTorch and the paper define it: with Adam's bias correction (MLX's default
    leaves it out, making the first few hundred steps up to 6.5x `lr`), decoupled decay of the
    weight matrices (`decays`)."""

    def adamw(weight_decay: float) -> optim.AdamW:
        rate = schedule(settings, steps_per_epoch)
        return optim.AdamW(rate, weight_decay=weight_decay, bias_correction=True)

    return optim.MultiOptimizer([adamw(settings.weight_decay), adamw(0.0)], [decays])


def evaluate_features(model: nn.Module, store, keys, labels, batch_size: int):
    """(mean loss, top-1 %, top-5 % or None) of a head on cached features."""
    loss = hits1 = hits5 = 0.0
    classes = model_classes(model)
    for x, y in batches(store, keys, labels, batch_size):
        logits = model(x).astype(mx.float32)
        loss += nn.losses.cross_entropy(logits, y, reduction="sum").item()
        top = mx.argsort(-logits, axis=-1)[:, :5]
        hits1 += (top[:, 0] == y).sum().item()
        hits5 += (top == y[:, None]).any(axis=-1).sum().item()
    n = len(keys)
    return loss / n, 100 * hits1 / n, (100 * hits5 / n if classes > 5 else None)


def _without_training_copies(train: list[Sample], val: list[Sample], content: dict):
    """The validation samples that are not copies of a training image (the same content, by
    `content`: path -> SHA-256), and a (path, reason) for each copy, left out: validating on
    training images picks the best epoch on them. ProbeError when every one is a copy."""
    in_training = {content[s.path]: s.path for s in train if s.path in content}
    twin = {s.path: in_training.get(content.get(s.path)) for s in val}
    kept = [s for s in val if twin[s.path] is None]
    copies = [(p, f"left out of validation: a copy of {t}") for p, t in twin.items() if t]
    if copies and not kept:
        raise ProbeError(
            f"every validation image is a copy of a training image ({copies[0][0]}: "
            f"{copies[0][1]}); validate on other images"
        )
    return kept, copies


def draw_initial_weights(module: nn.Module, seed: int) -> None:
    """Draw a new head's weights from `seed` alone, leaving MLX's global generator to the
    caller: linear layers uniform in +-1/sqrt(fan_in) (as MLX draws them), the attention
    head's query (`cls_token`) from N(0, 0.02^2)."""
    key = mx.random.key(seed)
    for _, layer in module.named_modules():
        if isinstance(layer, nn.Linear):
            bound = layer.weight.shape[1] ** -0.5
            for name in ("weight", "bias"):
                if name in layer:
                    key, sub = mx.random.split(key)
                    layer[name] = mx.random.uniform(-bound, bound, layer[name].shape, key=sub)
    if "cls_token" in module:
        module.cls_token = 0.02 * mx.random.normal(module.cls_token.shape, key=key)


def model_classes(module: nn.Module) -> int:
    return module.linear.weight.shape[0]


def _step_function(module: nn.Module, optimizer: optim.Optimizer):
    """step(x, y): one optimizer update of `module` on a batch, returning (summed loss,
    correct predictions)."""

    def loss_fn(m, x, y):
        logits = m(x)
        return nn.losses.cross_entropy(logits, y, reduction="mean"), logits

    loss_and_grad = nn.value_and_grad(module, loss_fn)

    def step(x, y):
        (loss, logits), grads = loss_and_grad(module, x, y)
        optimizer.update(module, grads)
        hits = (mx.argmax(logits, axis=-1) == y).sum()
        mx.eval(module.parameters(), optimizer.state, loss, hits)
        return loss.item() * len(y), hits.item()

    return step


def _train_epoch(module: nn.Module, step, store, train, batch: int, order) -> tuple[float, float]:
    """(mean loss, top-1 %) of one pass of `step` over the training features, in `order`."""
    train_keys, train_labels = train
    module.train()
    total = hits = 0.0
    for x, y in batches(store, train_keys, train_labels, batch, order):
        loss, h = step(x, y)
        total, hits = total + loss, hits + h
    return total / len(train_keys), 100 * hits / len(train_keys)


EPOCH_HEADER = f"epoch {'loss':>8} {'train top-1':>11} {'val loss':>9} {'val top-1':>9} {'time':>7}"


def _epoch_row(stats: EpochStats, improved: bool) -> str:
    """An epoch's line under `EPOCH_HEADER`, starred when it is the best so far."""
    return (
        f"{stats.epoch:>5} {stats.loss:>8.4f} {stats.train_top1:>10.1f}% "
        f"{stats.val_loss:>9.4f} {stats.val_top1:>8.1f}% {stats.seconds:>6.2f}s"
        f"{'  *' if improved else ''}"
    )


def fit(
    module: nn.Module,
    store: features.FeatureSet,
    train: tuple[list[str], np.ndarray],
    val: tuple[list[str], np.ndarray],
    settings: Settings,
    log: Callable[[str], None],
) -> tuple[list[EpochStats], EpochStats]:
    """Train `module` in place on cached features; it ends holding the best epoch's weights
    (the best validation top-1, then loss, of the epochs whose loss is finite)."""
    n = len(train[0])  # training images
    rng = np.random.default_rng(settings.seed)
    batch = min(settings.batch_size, n)
    steps = -(-n // batch)
    step = _step_function(module, make_optimizer(settings, steps))
    log(EPOCH_HEADER)
    history, best, best_weights = [], None, None
    for epoch in range(1, settings.epochs + 1):
        start = time.perf_counter()
        order = rng.permutation(n)
        loss, top1 = _train_epoch(module, step, store, train, batch, order)
        module.eval()
        val_loss, val_top1, val_top5 = evaluate_features(module, store, *val, batch)
        seconds = time.perf_counter() - start
        stats = EpochStats(epoch, loss, top1, val_loss, val_top1, val_top5, seconds)
        history.append(stats)
        score = (stats.val_top1, -stats.val_loss)
        finite = math.isfinite(stats.val_loss)  # NaN logits: a head that classifies nothing
        improved = finite and (best is None or score > (best.val_top1, -best.val_loss))
        if improved:
            best, best_weights = stats, tree_flatten(module.parameters())
        log(_epoch_row(stats, improved))
    if best is None:
        raise ProbeError(
            f"training diverged: the validation loss of every epoch is nan or inf (the last: "
            f"{history[-1].val_loss}); train again with a lower learning rate (now {settings.lr:g})"
        )
    module.load_weights(best_weights)
    return history, best


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _finite(v: numbers.Real) -> bool:
    """Whether v is a finite float, or an int that converts to one (10**400 does not)."""
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _checked(settings: Settings) -> Settings:
    """`settings` checked as the CLI's option ranges are, in Python's own numbers (numpy's
    cannot go into the head's config.json: the run failed once trained)."""
    if not isinstance(settings, Settings):
        raise TypeError(f"settings: give aim_mlx.probe.Settings(...), got {settings!r:.60}")
    s = settings
    if s.kind not in head.KINDS:
        raise ProbeError(f"head kind must be one of {', '.join(head.KINDS)}, got {s.kind!r}")
    if not all(is_whole(v) and v >= 1 for v in (s.epochs, s.batch_size)):
        raise ProbeError(
            f"epochs and batch size must be whole numbers of at least 1, got {s.epochs!r}, "
            f"{s.batch_size!r}"
        )
    rates = (s.lr, s.weight_decay, s.warmup_epochs)
    real = all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in rates)
    finite = real and all(map(_finite, rates))  # NaN, and inf: a NaN head
    if not finite or not s.lr > 0 or not s.weight_decay >= 0 or not s.warmup_epochs >= 0:
        raise ProbeError(
            "lr must be above 0, weight decay and warmup epochs 0 or more, all finite; got "
            f"{s.lr!r}, {s.weight_decay!r}, {s.warmup_epochs!r}"
        )
    if not is_whole(s.seed) or not 0 <= s.seed <= MAX_SEED:  # numpy's and MLX's generators
        raise ProbeError(f"the seed must be a whole number from 0 to 2^64 - 1, got {s.seed!r}")
    return dataclasses.replace(
        s,
        epochs=int(s.epochs),
        batch_size=int(s.batch_size),
        lr=float(s.lr),
        weight_decay=float(s.weight_decay),
        warmup_epochs=float(s.warmup_epochs),
        seed=int(s.seed),
    )


def _split(dataset: data.Dataset, val_dir, val_split: float | None, seed: int):
    """(training samples, validation samples, skipped files): those of `dataset` and the
    folder `val_dir` (the same classes, no shared image), or a stratified `val_split` of
    `dataset` (0.2 by default)."""
    if val_dir is not None:
        val_set = data.read_dataset(val_dir, "validation folder")
        data.check_same_classes(dataset, val_set)
        data.check_apart(dataset, val_set)
        return dataset.samples, val_set.samples, dataset.skipped + val_set.skipped
    split = 0.2 if val_split is None else val_split
    train_samples, val_samples = data.stratified_split(dataset, split, seed)
    if not val_samples:  # a class of one image stays for training
        raise ProbeError(
            f"the validation split of {dataset.root} leaves no image: every class has a single "
            "image; add images or pass a validation folder, val_dir (--val DIR)"
        )
    return train_samples, val_samples, dataset.skipped


def _keyed(samples: list[Sample], what: str, classes: list[str], usable: dict, failed: dict):
    """(feature keys, labels) of the `samples` whose features were extracted (`usable`: path ->
    key; `failed`: path -> why not). ProbeError when none is left, or for the training set
    when a class is left without one."""
    ok = [s for s in samples if s.path in usable]
    have = {s.label for s in ok}
    missing = [c for i, c in enumerate(classes) if i not in have]
    # the errors are listed after training: name one of a class left empty here
    lost = [s.path for s in samples if s.label not in have and s.path in failed]
    why = f"; {lost[0]}: {failed[lost[0]]}" if lost else ""
    if what == "training" and missing:
        names = ", ".join(map(repr, missing))
        raise ProbeError(f"no readable {what} image left in class(es) {names}{why}")
    if not ok:
        raise ProbeError(f"no readable {what} image{why}")
    return [usable[s.path] for s in ok], np.array([s.label for s in ok], dtype=np.int32)


def train(
    model,
    train_dir: str | Path,
    out: str | Path,
    *,
    val_dir: str | Path | None = None,
    val_split: float | None = None,
    probe_layers=None,
    settings: Settings | None = None,
    dtype: str | None = None,
    quantize_bits: int | None = None,
    extract_batch_size: int = 8,
    progress: bool = False,
    force: bool = False,
    log: Callable[[str], None] = _stderr,
) -> TrainResult:
    """Train a head on a folder of labelled images (one sub-folder per class) and write it to
    the folder `out`.

    `model`: what `aim_mlx.load` accepts (its trunk is used, frozen). Validation: `val_dir` with
    the same classes, or a stratified, seeded `val_split` of `train_dir` (0.2 by default).
    `settings.seed` decides the split, the head's initial weights and the batches' order;
    MLX's global generator is neither reseeded nor drawn from.
    Everything the user can get wrong (output, folders, classes, options) is checked before any
    download, conversion or extraction. Under `mlx.launch` every rank extracts its share of the
    features; rank 0 trains, writes and returns the result, the other ranks return None.
    """
    if isinstance(model, AIM):  # its features are cached by the trunk's source files
        raise TypeError(
            "model: give what aim_mlx.load takes (a model name or folder), not a loaded model"
        )
    settings = _checked(settings or Settings())
    if val_dir is not None and val_split is not None:
        raise ProbeError("give a validation folder or a validation split, not both")
    inputs = [model, train_dir, val_dir]
    target = distributed.on_root(lambda: head.check_output(out, force, inputs=inputs))
    if probe_layers not in (None, "best", "last"):  # before a download or conversion
        parse_probe_layers(probe_layers, SimpleNamespace(num_blocks=known_num_blocks(model)))
    dataset = data.read_dataset(train_dir)
    train_samples, val_samples, skipped = _split(dataset, val_dir, val_split, settings.seed)

    net, trunk = head.load_trunk(model, dtype, quantize_bits=quantize_bits, progress=progress)
    layers = parse_probe_layers(probe_layers, net.args)
    net.args = dataclasses.replace(net.args, probe_layers=layers)

    store, ext = features.extract(
        net, trunk, train_samples + val_samples, batch_size=extract_batch_size, progress=progress
    )
    if not distributed.is_root():  # under mlx.launch: this rank's share went to rank 0
        return None
    usable = dict(zip((s.path for s in ext.samples), ext.keys, strict=True))
    failed = dict(ext.errors)
    val_samples, copies = _without_training_copies(train_samples, val_samples, usable)
    skipped = skipped + copies
    train_data = _keyed(train_samples, "training", dataset.classes, usable, failed)
    val_data = _keyed(val_samples, "validation", dataset.classes, usable, failed)

    module = head.make_head(settings.kind, net.args, len(dataset.classes))
    draw_initial_weights(module, settings.seed)
    module.bn.running_mean, module.bn.running_var = feature_stats(store, train_data[0])
    log(
        f"training {'an' if settings.kind[0] in 'aeiou' else 'a'} {settings.kind} head on "
        f"{len(train_data[0])} images ({len(dataset.classes)} classes), "
        f"validating on {len(val_data[0])}"
    )
    history, best = fit(module, store, train_data, val_data, settings, log)

    config = dict(
        format=head.HEAD_FORMAT,
        format_version=head.HEAD_FORMAT_VERSION,
        kind=settings.kind,
        classes=dataset.classes,
        probe_layers=list(layers),
        img_size=net.args.img_size,
        embed_dim=net.args.embed_dim,
        trunk=dataclasses.asdict(trunk),
        training=dict(
            **dataclasses.asdict(settings),
            optimizer="AdamW, bias-corrected, no decay of biases and the query",
            schedule="linear warmup, cosine decay to 1% of lr",
            train_dir=str(train_dir),
            val=str(val_dir) if val_dir is not None else f"split {val_split or 0.2}",
            train_images=len(train_data[0]),
            val_images=len(val_data[0]),
            feature_dtype=store.info["feature_dtype"],
            trunk_dtype=store.info["dtype"],
        ),
        metrics=dict(
            best_epoch=best.epoch,
            val_top1=best.val_top1,
            val_top5=best.val_top5,
            val_loss=best.val_loss,
            train_top1=best.train_top1,
            train_loss=best.loss,
        ),
        created_by=f"aim-mlx {__version__}",
    )
    path = head.save_head(target, module, config, force, checked=True)
    return TrainResult(
        path,
        history,
        best,
        dataset.classes,
        len(train_data[0]),
        len(val_data[0]),
        ext.computed,
        skipped + ext.errors,
    )
