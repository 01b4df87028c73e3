"""Throughput, latency and memory of AIM models: the library behind `aim-mlx bench`.

Preset names get random weights created layer by layer in the requested dtype (and quantized as
they are made), so aim-7B at 4 bits never exists in float32 and every size runs offline.
"""

from __future__ import annotations

import os
import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from . import __version__, blas, images, memory, runtime
from .checks import is_path, is_whole
from .constants import MX_DTYPES, GiB, as_dtype_name
from .convert.converter import (
    Q_GROUP_SIZE_DEFAULT,
    QUANTIZED_LAYER,
    ConversionError,
    check_quantize_options,
)
from .errors import AimMlxError, OptionError
from .models import AIM, PRESETS, ModelArgs, cpu_runner, ops, preset_args
from .models.layers import QuantizedLinear
from .resolve import is_converted, resolve


@dataclass
class BenchConfig:
    model: str  # a preset name, a converted folder or a folder of checkpoints
    batch_size: int = 1
    dtype: str | None = None  # None: float32, or a converted folder's own
    q_bits: int | None = None  # None: not quantized
    q_group_size: int = Q_GROUP_SIZE_DEFAULT
    compile: bool = False
    img_size: int | None = None  # None: the model's own
    head: str | None = None  # presets only: "best" (the default) or "last" layers
    warmup: int = 1
    iters: int = 5

    def __post_init__(self):
        self.model = preset_name(self.model)
        if self.dtype is not None:
            self.dtype = as_dtype_name(self.dtype)  # mx.float16 too, as aim_mlx.load takes it
        elif not _converted_folder(self.model):
            self.dtype = "float32"
        for name in ("batch_size", "q_bits", "q_group_size", "img_size", "warmup", "iters"):
            if is_whole(value := getattr(self, name)):  # numpy's: as Python's, in the JSON rows
                setattr(self, name, int(value))


def _converted_folder(model) -> bool:
    """Whether `model` is a converted folder; a size's name is the size, even beside a folder of
    that name (as `check` takes it)."""
    return is_path(model) and model not in PRESETS and is_converted(Path(model))


def flops_per_image(args: ModelArgs, num_blocks: int, img_h: int, img_w: int) -> int:
    """Matmul FLOPs (2 per multiply-add) for one image through `num_blocks` blocks and the head.

    Counted: patch embedding, qkv, attention q k^T and a v, proj, fc1, fc2, and the head as
    `AttentionPoolingHead` computes it (`attention_head_flops`). Element-wise work (norms,
    GELU, softmax) is not.
    """
    p, D, H = args.patch_size, args.embed_dim, args.num_heads
    N = (img_h // p) * (img_w // p)
    hidden = args.mlp_ratio * D
    patch = 2 * N * (3 * p * p) * D
    qkv, proj = 2 * N * D * 3 * D, 2 * N * D * D
    scores_and_mix = 2 * (2 * N * N * D)  # q k^T and a v, all heads together
    mlp = 2 * (2 * N * D * hidden)
    head = attention_head_flops(N, D, H, args.num_classes)
    return patch + num_blocks * (qkv + scores_and_mix + proj + mlp) + head


def attention_head_flops(tokens: int, dim: int, heads: int, classes: int) -> int:
    """Matmul FLOPs of `AttentionPoolingHead` for one image: its queries through W_k and W_v on
    the pooled tokens (D x D each), each head's scores and weighted mean token, the classifier."""
    return 2 * (2 * dim * dim) + 2 * (2 * tokens * dim * heads) + 2 * dim * classes


def batch_floor(args: ModelArgs, batch_size: int, img_size: int, dtype: mx.Dtype) -> int:
    """Bytes a forward pass of `batch_size` images cannot do without, beside the weights: the
    float32 input and the first MLP layer's output, (B, N, mlp_ratio * D) in `dtype`."""
    tokens = (img_size // args.patch_size) ** 2
    hidden = tokens * args.mlp_ratio * args.embed_dim * dtype.size
    return batch_size * (3 * img_size**2 * 4 + hidden)


def blocks_run(args: ModelArgs) -> int:
    """The forward pass stops after the last probe layer."""
    return max(args.probe_layers) + 1


WEIGHT_STD = 0.02  # a ViT's initial weights


def _uniform(shape, key) -> mx.array:
    # uniform with std WEIGHT_STD: cheaper to draw than normal, as good for timing
    bound = WEIGHT_STD * 3**0.5
    return mx.random.uniform(-bound, bound, shape, key=key)


def _random_quantized(module: QuantizedLinear, dtype: mx.Dtype, key) -> None:
    """Random packed weights, scales and biases drawn directly: no float weights at all."""
    k1, k2 = mx.random.split(key)
    levels = 2**module.bits - 1
    # two 16-bit halves: randint draws through float32, exact only up to 24 bits
    halves = mx.random.randint(0, 2**16, (2, *module.weight.shape), key=k1).astype(mx.uint32)
    scale = WEIGHT_STD * 12**0.5 / levels  # uniform over the levels: std WEIGHT_STD
    scales = scale * mx.random.uniform(0.9, 1.1, module.scales.shape, key=k2)
    module.weight = (halves[0] << 16) | halves[1]
    module.scales = scales.astype(dtype)
    module.biases = (-0.5 * levels * scales).astype(dtype)  # centred on 0


def random_model(args: ModelArgs, dtype: mx.Dtype, q_bits=None, group_size=64, seed=0) -> AIM:
    """An AIM with random weights, made one layer at a time in its final dtype.

    The trunk's matmul layers are quantized (as `aim-mlx convert -q` does) and their packed
    weights drawn directly; everything else is drawn in float32 one tensor at a time and
    stored in `dtype`. Peak memory stays at the final model plus one layer in float32.
    """
    with ops.random_key_kept():
        model = AIM(args)  # its own random init is lazy and never computed
    if q_bits:
        nn.quantize(
            model,
            group_size=group_size,
            bits=q_bits,
            class_predicate=lambda path, m: (
                isinstance(m, nn.Linear) and QUANTIZED_LAYER.match(path) is not None
            ),
        )
    key = mx.random.key(seed)
    for _, module in model.named_modules():
        key, sub = mx.random.split(key)
        if isinstance(module, QuantizedLinear):
            _random_quantized(module, dtype, sub)
            mx.eval(module.parameters())
            continue
        own = {k: v for k, v in module.items() if isinstance(v, mx.array)}  # not children's
        for name, v in own.items():
            if name in ("weight", "cls_token") and v.ndim >= 2:
                v = _uniform(v.shape, sub)
            # else: norm scales/offsets, biases, BatchNorm statistics keep their defaults
            own[name] = v.astype(dtype)
            setattr(module, name, own[name])
        mx.eval(list(own.values()))
    model.eval()
    return model


def _preset_args(config: BenchConfig) -> ModelArgs:
    overrides = {"img_size": config.img_size} if config.img_size else {}
    return preset_args(config.model, head=config.head or "best", **overrides)


def make_model(config: BenchConfig) -> AIM:
    check(config)
    if config.model in PRESETS:
        args = _preset_args(config)
        dtype = MX_DTYPES[config.dtype]
        return random_model(args, dtype, config.q_bits, config.q_group_size)
    from .loader import load_model

    q = dict(quantize_bits=config.q_bits, q_group_size=config.q_group_size)
    folder = resolve(config.model, config.head, config.dtype, **q)  # checkpoints: converted
    model = load_model(folder)
    mx.eval(model.parameters())
    return model


def check(config: BenchConfig) -> None:
    """OptionError for a model that is neither a preset nor a folder, and for options that do
    not apply to a converted folder (benchmarked as it was converted, with its own head; a
    folder of checkpoints is converted with them);
    NotEnoughMemoryError for a size whose weights, or a batch of whose inputs and activations
    (`batch_floor`), cannot fit."""
    if not is_path(config.model):  # as load
        names = ", ".join(PRESETS)
        raise OptionError(f"model must be a size ({names}) or a folder, got {config.model!r}")
    if config.dtype not in (None, *MX_DTYPES):
        raise OptionError(f"dtype must be one of {', '.join(MX_DTYPES)}, got {config.dtype!r}")
    if config.head not in (None, "best", "last"):  # any other was the last layers, silently
        raise OptionError(f"head must be best, last or None, got {config.head!r}")
    if config.q_bits is not None:  # MLX quantizes to 3 or 5 bits too: not what aim-mlx makes
        try:
            check_quantize_options(config.q_bits, config.q_group_size)
        except ConversionError as e:
            raise OptionError(str(e)) from None
    elif config.q_group_size != Q_GROUP_SIZE_DEFAULT:  # as convert() refuses it
        raise OptionError(f"q_group_size={config.q_group_size!r} applies with q_bits only")
    if config.model in PRESETS:
        if config.img_size is not None:  # as classify and embed check it; a folder's: in run
            images.input_size(SimpleNamespace(args=preset_args(config.model)), config.img_size)
        args = _preset_args(config)
        with ops.random_key_kept():  # lazy: no memory
            params = sum(v.size for _, v in tree_flatten(AIM(args).parameters()))
        memory.check_model(config.model, params, config.dtype, config.q_bits, "q_bits")
        check_counts(config)
        floor = batch_floor(args, config.batch_size, args.img_size, MX_DTYPES[config.dtype])
        weights = memory.weights_lower_bound(params, config.dtype, config.q_bits)
        memory.check_batch_fits(weights + floor, config.batch_size)  # before making the model
        return
    path = Path(config.model)
    if not path.is_dir():
        names = ", ".join(PRESETS)
        raise OptionError(
            f"model (--model) {config.model!r}: not a preset ({names}) nor a model folder"
        )
    if not is_converted(path):
        return
    own = _converted_dtype(path)
    other_dtype = own is not None and config.dtype not in (None, own)  # else loading says why
    if config.q_bits or config.head or other_dtype:
        as_converted = f"as it was converted ({own})" if own else "as it was converted"
        raise OptionError(
            f"model (--model) {path}: a converted folder is benchmarked {as_converted}, with "
            "its own head; dtype, q_bits and head (--dtype, --quantize, --head) apply to sizes "
            "and checkpoint folders"
        )


def _converted_dtype(path: Path) -> str | None:
    """The dtype a converted folder's config.json records (None if it cannot be read or is not
    a dtype: loading says why)."""
    from .loader import ModelLoadError, read_config

    try:
        dtype = read_config(path).get("dtype")
    except ModelLoadError:
        return None
    return dtype if isinstance(dtype, str) and dtype in MX_DTYPES else None


def check_counts(config: BenchConfig) -> None:
    """OptionError for a batch size or a number of iterations that cannot be timed."""
    for name, low in (("batch_size", 1), ("iters", 1), ("warmup", 0)):
        value = getattr(config, name)
        if not is_whole(value) or value < low:
            raise OptionError(f"{name} must be a whole number of {low} or more, got {value!r}")


def model_dtype_and_bits(model: AIM) -> tuple[str, int | None]:
    names = {v: k for k, v in MX_DTYPES.items()}
    bits = None
    for _, m in model.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            bits = m.bits
            break
    return names.get(model.dtype, str(model.dtype)), bits


def weight_bytes(model: AIM) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def chip() -> str:
    if sys.platform == "darwin":
        try:
            info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
            return str(info.get("device_name", platform.machine()))
        except Exception:
            return platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.machine()} ({os.cpu_count()} cores)"


def max_rss_bytes() -> int:
    """This process's peak resident set so far."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def gpu() -> str | None:
    """The GPU MLX can use: name, backend and memory; None without one."""
    backend = "Metal" if mx.metal.is_available() else "CUDA" if mx.cuda.is_available() else None
    if backend is None:
        return None
    info = memory.gpu_info()
    if not info:
        return f"{backend} GPU"
    total = memory.gpu_memory(info)
    size = f", {total / GiB:.1f} GiB" if total else ""
    return f"{info.get('device_name', 'GPU')} ({backend}{size})"


def environment() -> dict:
    gpu_name = gpu()
    return {
        "device": str(mx.default_device()),
        "chip": chip(),
        "gpu": gpu_name,
        "gpu_runtime": runtime.describe() if gpu_name else None,
        "memory": memory.describe(),
        "mlx_version": mx.__version__,
        "aim_mlx_version": __version__,
        "blas": blas.describe(),
        "cpu_streams": None if ops.on_gpu() else _setting(cpu_runner.streams),
        "cpu_buffer_cache": None if ops.on_gpu() else _setting(cpu_runner.describe_cache),
    }


def _setting(read):
    """A value read from AIM_MLX_* settings, or what is wrong with them (`aim-mlx info` shows
    it rather than failing)."""
    try:
        return read()
    except AimMlxError as e:
        return f"invalid: {e}"


def _timed_passes(forward, x: mx.array, warmup: int, iters: int) -> list[float]:
    """The seconds of each of `iters` passes of forward(x), after `warmup` untimed ones."""
    times = []
    for i in range(warmup + iters):
        if i == warmup:  # the peak of the timed passes (weights included: still held)
            mx.reset_peak_memory()
        start = time.perf_counter()
        mx.eval(forward(x))
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def run(config: BenchConfig, model: AIM | None = None) -> dict:
    """Time `config`; returns one result row (see `aim-mlx bench --json`)."""
    check_counts(config)
    if model is not None:  # a name or folder goes in config.model
        images.check_model(model)
    mx.reset_peak_memory()
    model = model if model is not None else make_model(config)
    build_peak = mx.get_peak_memory()
    args = model.args
    size = images.input_size(model, config.img_size)
    need = weight_bytes(model) + batch_floor(args, config.batch_size, size, model.dtype)
    memory.check_batch_fits(need, config.batch_size)
    x = mx.random.normal((config.batch_size, 3, size, size), key=mx.random.key(1))
    mx.eval(x)
    forward = mx.compile(model) if config.compile else model
    times = _timed_passes(forward, x, config.warmup, config.iters)
    blocks = blocks_run(args)
    flops = flops_per_image(args, blocks, size, size)
    images_per_s = config.batch_size * len(times) / sum(times)
    dtype, bits = model_dtype_and_bits(model)
    preset = config.model in PRESETS  # even beside a folder of that name, as `check` takes it
    converted = not preset and is_converted(Path(config.model))
    return {
        "model": config.model if preset else Path(config.model).name,
        "head": "converted" if converted else config.head or "best",
        "blocks": blocks,
        "batch_size": config.batch_size,
        "dtype": dtype,
        "quantization": bits,
        "compile": config.compile,
        "img_size": size,
        "images_per_s": images_per_s,
        "latency_ms_p50": 1e3 * float(np.percentile(times, 50)),
        "latency_ms_p90": 1e3 * float(np.percentile(times, 90)),
        "peak_memory_gb": mx.get_peak_memory() / GiB,
        "build_peak_memory_gb": build_peak / GiB,
        "weight_gb": weight_bytes(model) / GiB,
        "max_rss_gb": max_rss_bytes() / GiB,
        "gflops_per_image": flops / 1e9,
        "gflops_per_s": flops * images_per_s / 1e9,
        "iters": len(times),
        "warmup": config.warmup,
        **environment(),
    }


COLUMNS = [
    ("model", "model", "{}"),
    ("blocks", "blocks", "{}"),
    ("batch_size", "batch", "{}"),
    ("dtype", "dtype", "{}"),
    ("quantization", "bits", "{}"),
    ("compile", "compile", "{}"),
    ("images_per_s", "img/s", "{:.3g}"),
    ("latency_ms_p50", "p50 ms", "{:.1f}"),
    ("latency_ms_p90", "p90 ms", "{:.1f}"),
    ("peak_memory_gb", "peak GiB", "{:.2f}"),
    ("weight_gb", "weights GiB", "{:.2f}"),
    ("gflops_per_image", "GFLOP/img", "{:.1f}"),
    ("gflops_per_s", "GFLOP/s", "{:.1f}"),
]


def format_table(rows: list[dict]) -> str:
    """A plain-text table of result rows, with the environment on top."""
    if not rows:
        return ""
    env = rows[0]
    head = [
        f"device {env['device']} | {env['chip']} | MLX {env['mlx_version']} | "
        f"aim-mlx {env['aim_mlx_version']}",
        f"BLAS: {env['blas']}",
    ]
    cells = [[label for _, label, _ in COLUMNS]]
    for r in rows:
        cells.append(["-" if r[k] is None else fmt.format(r[k]) for k, _, fmt in COLUMNS])
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(head + [""] + lines)


def preset_name(model):
    """A size named in any case (aim-600m) as PRESETS spells it, as the other commands take
    model names; a folder with `~` expanded (as `aim_mlx.load` takes it); anything else as it
    is."""
    if isinstance(model, str) and not Path(model).is_dir():
        model = next((name for name in PRESETS if name.lower() == model.lower()), model)
    if isinstance(model, os.PathLike):
        return Path(model).expanduser()
    return os.path.expanduser(model) if isinstance(model, str) else model


def configs(model, batch_sizes, dtypes, q_bits, compile_, img_size, head, warmup, iters):
    """Every combination of the listed batch sizes and dtypes, each checked before any runs."""
    rows = [
        BenchConfig(
            model, b, dtype, q_bits, Q_GROUP_SIZE_DEFAULT, compile_, img_size, head, warmup, iters
        )
        for dtype in dtypes
        for b in batch_sizes
    ]
    for config in rows:
        check(config)
    return rows
