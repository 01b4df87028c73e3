"""The `aim-mlx` command line: parse options, call the library, print."""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager
from pathlib import Path

import click

from . import __version__
from .constants import DTYPES, GB
from .export import coreml


def _exit_on_sigterm():
    """Turn SIGTERM into SystemExit so that cleanup code (temporary folders) runs."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="aim-mlx")
def main():
    """Apple's AIM v1 vision models in pure MLX."""


@main.command()
@click.option("--backbone", type=click.Path(dir_okay=False), help="Official *_backbone.pth file.")
@click.option("--head", type=click.Path(dir_okay=False), help="Official *_head_*_layers.pth file.")
@click.option("--hf-path", help="Hub-style folder or repo id (config.json + weights).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option(
    "--probe-layers",
    help="Blocks the head reads: best, last or I,J,... (default: from the head file or config).",
)
@click.option("--num-heads", type=int, help="Attention heads, for non-official sizes.")
@click.option("--img-size", type=int, help="Default input size (default 224).")
@click.option(
    "--dtype",
    type=click.Choice(DTYPES),
    default="float32",
    show_default=True,
)
@click.option("-q", "--quantize", is_flag=True, help="Quantize the trunk's linear layers.")
@click.option("--q-bits", type=click.Choice(["4", "8"]), default="8", show_default=True)
@click.option(
    "--q-group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True
)
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
def convert(
    backbone,
    head,
    hf_path,
    out,
    probe_layers,
    num_heads,
    img_size,
    dtype,
    quantize,
    q_bits,
    q_group_size,
    force,
):
    """Convert official PyTorch checkpoints into an MLX model folder (no PyTorch needed)."""
    from .convert import ConversionError
    from .convert import convert as run_convert

    _exit_on_sigterm()
    try:
        path = run_convert(
            out,
            backbone=backbone,
            head=head,
            hf_path=hf_path,
            probe_layers=probe_layers,
            num_heads=num_heads,
            img_size=img_size,
            dtype=dtype,
            quantize=quantize,
            q_bits=int(q_bits),
            q_group_size=int(q_group_size),
            force=force,
        )
    except ConversionError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {path}")


def _int_list(ctx, param, value: str) -> list[int]:
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected integers like 1,8,32, got {value!r}") from None
    if not items or min(items) < 1:
        raise click.BadParameter(f"expected positive integers like 1,8,32, got {value!r}")
    return items


def _dtype_list(ctx, param, value: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in DTYPES]
    if bad or not items:
        raise click.BadParameter(
            f"expected float32, float16 and/or bfloat16 (comma-separated), got {value!r}"
        )
    return items


@main.command()
@click.option(
    "--model",
    default="aim-600M",
    show_default=True,
    help="A size (aim-600M, aim-1B, aim-3B, aim-7B: random weights) or a converted folder.",
)
@click.option(
    "--batch-size", default="1", callback=_int_list, show_default=True, help="E.g. 1,8,32."
)
@click.option(
    "--dtype",
    default="float32",
    callback=_dtype_list,
    show_default=True,
    help="Weight dtypes, e.g. float32,float16,bfloat16.",
)
@click.option("-q", "--quantize", is_flag=True, help="Quantize the trunk's linear layers.")
@click.option("--q-bits", type=click.Choice(["4", "8"]), default="8", show_default=True)
@click.option("--compile/--no-compile", "compile_", default=False, show_default=True)
@click.option("--img-size", type=click.IntRange(min=14), help="Input size (default: the model's).")
@click.option(
    "--head",
    type=click.Choice(["best", "last"]),
    default="best",
    show_default=True,
    help="Sizes only: the best-layers head stops the trunk early, the last-layers one runs it all.",
)
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--iters", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per configuration per line.")
def bench(
    model, batch_size, dtype, quantize, q_bits, compile_, img_size, head, warmup, iters, as_json
):
    """Images/s, latency and memory of a model (offline: sizes use random weights)."""
    import json

    from . import bench as lib

    rows = []
    for config in lib.configs(
        model,
        batch_size,
        dtype,
        int(q_bits) if quantize else None,
        compile_,
        img_size,
        head,
        warmup,
        iters,
    ):
        if not as_json:
            click.echo(
                f"running {config.model} batch {config.batch_size} {config.dtype} ...", err=True
            )
        try:
            row = lib.run(config)
        except ValueError as e:
            raise click.ClickException(str(e)) from None
        rows.append(row)
        if as_json:
            click.echo(json.dumps(row), nl=True)
    if not as_json:
        click.echo(lib.format_table(rows))


@main.command()
def info():
    """Versions, device, GPU and the BLAS that MLX's CPU matmuls use."""
    from . import bench as lib

    for key, value in lib.environment().items():
        click.echo(f"{key}: {value}")


# ---- Model names, the cache, classify / embed / eval -------------------------------------------

DTYPE_CHOICE = click.Choice(DTYPES)


class HeadParam(click.ParamType):
    """best, last (the official heads) or a trained head's folder; the keywords win."""

    name = "best|last|DIR"

    def convert(self, value, param, ctx):
        if value in ("best", "last") or Path(value).is_dir():
            return value
        self.fail(f"{value!r} is neither best, last nor a folder (made by `aim-mlx probe train`)")


def model_options(f, trained_heads: bool = False):
    """--model, --head, --dtype, --quantize: what to load (fetched and converted on first use).
    `trained_heads`: --head also takes a trained head's folder."""
    head_help = "Which official head: trained on the best or on the last six layers."
    if trained_heads:
        head_help += " Or a folder made by `aim-mlx probe train` (a folder named best: ./best)."
    options = [
        click.option(
            "--model",
            "-m",
            default="aim-600M",
            show_default=True,
            help="A model name (aim-600M, aim-1B, aim-3B, aim-7B; see `aim-mlx models`), a "
            "converted folder, or a folder of PyTorch checkpoints.",
        ),
        click.option(
            "--head",
            type=HeadParam() if trained_heads else click.Choice(["best", "last"]),
            default="best",
            show_default=True,
            help=head_help,
        ),
        click.option(
            "--dtype",
            type=DTYPE_CHOICE,
            default=None,
            help="Weight dtype. Default: float16 on the GPU (Metal), float32 on the CPU.",
        ),
        click.option("-q", "--quantize", is_flag=True, help="Quantize the trunk's linear layers."),
        click.option("--q-bits", type=click.Choice(["4", "8"]), default="8", show_default=True),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def head_model_options(f):
    return model_options(f, trained_heads=True)


def load_for_cli(model, head, dtype, quantize, q_bits, progress=True):
    from . import distributed
    from .resolve import load

    _exit_on_sigterm()  # a conversion into the cache cleans up when terminated
    distributed.group()  # under mlx.launch: join the other ranks, share this machine's cores
    bits = int(q_bits) if quantize else None
    try:
        return load(model, head, dtype, quantize_bits=bits, progress=progress)
    except (ValueError, RuntimeError, OSError) as e:  # registry, hub, conversion, file errors
        raise click.ClickException(distributed.tag(str(e))) from None


@contextmanager
def _ranks_reported():
    """Under mlx.launch: a failed rank is one line on every rank (the library's message)."""
    from .distributed import DistributedError

    try:
        yield
    except DistributedError as e:
        raise click.ClickException(str(e)) from None


def _ranks_reported_iter(rows):
    with _ranks_reported():
        yield from rows


def report_error(path: str, reason: str) -> None:
    click.echo(f"error: {path}: {reason}", err=True)


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@head_model_options
@click.option("--top-k", "-k", default=5, show_default=True, type=click.IntRange(1, 1000))
@click.option("--batch-size", "-b", default=8, show_default=True, type=click.IntRange(1))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image per line.")
@click.option("--csv", "as_csv", is_flag=True, help="Rows of path,rank,index,label,prob.")
@click.option("--progress/--no-progress", default=True, help="Progress bars on stderr.")
def classify(
    inputs, model, head, dtype, quantize, q_bits, top_k, batch_size, as_json, as_csv, progress
):
    """Top-k classes of images (files, or folders searched recursively): ImageNet's, or a
    trained head's (--head DIR; --top-k is clamped to its number of classes)."""
    import csv
    import json
    import sys

    from . import distributed
    from .classifier import classify_iter

    if as_json and as_csv:
        raise click.UsageError("choose one of --json and --csv")
    net = load_for_cli(model, head, dtype, quantize, q_bits, progress)
    rows = classify_iter(net, inputs, k=top_k, batch_size=batch_size, progress=progress)
    if not distributed.is_root():  # under mlx.launch: rank 0 prints every rank's rows
        for _ in _ranks_reported_iter(rows):
            pass
        return
    writer = csv.writer(sys.stdout, lineterminator="\n") if as_csv else None
    if writer:
        writer.writerow(["path", "rank", "index", "label", "prob"])
    failed = 0
    for row in _ranks_reported_iter(rows):
        if "error" in row:
            failed += 1
            report_error(row["path"], row["error"])
        elif as_json:
            click.echo(json.dumps(row))
        elif writer:
            for rank, p in enumerate(row["top_k"], 1):
                writer.writerow([row["path"], rank, p["index"], p["label"], f"{p['prob']:.6g}"])
            sys.stdout.flush()
        else:
            click.echo(row["path"])
            for rank, p in enumerate(row["top_k"], 1):
                click.echo(f"  {rank}. {100 * p['prob']:6.2f}%  {p['label']}  ({p['index']})")
    if failed:
        sys.exit(1)


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(dir_okay=False),
    help="Output file: .safetensors or .npy.",
)
@click.option(
    "--layers",
    default="head",
    show_default=True,
    help="head (the head's averaged probe layers), last (the last block), or block "
    "numbers like 12,15,-1 (stacked along a layer axis).",
)
@click.option(
    "--pool",
    type=click.Choice(["mean", "tokens"]),
    default="mean",
    show_default=True,
    help="mean: one vector per layer; tokens: every patch token.",
)
@model_options
@click.option("--batch-size", "-b", default=8, show_default=True, type=click.IntRange(1))
@click.option("--progress/--no-progress", default=True, help="Progress bars on stderr.")
def embed(inputs, out, layers, pool, model, head, dtype, quantize, q_bits, batch_size, progress):
    """Write image features to a .safetensors or .npy file.

    safetensors: tensor `features`, the image order as JSON in the metadata key `paths`.
    npy: the array, with the image order in FILE.paths.txt (one path per line).
    """
    import sys

    from . import distributed
    from .embed import embed as embed_images
    from .embed import parse_layers, save

    if not out.endswith((".safetensors", ".npy")):
        raise click.BadParameter("must end in .safetensors or .npy", param_hint="--out")
    net = load_for_cli(model, head, dtype, quantize, q_bits, progress)
    try:
        parse_layers(layers, net.args.num_blocks)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--layers") from None
    with _ranks_reported():
        emb = embed_images(
            net, inputs, layers=layers, pool=pool, batch_size=batch_size, progress=progress
        )
    if not distributed.is_root():  # under mlx.launch: rank 0 writes every rank's rows
        return
    for path, reason in emb.errors:
        report_error(path, reason)
    if emb.paths:
        meta = dict(model=model, head=head, layers=layers, pool=pool)
        written = save(out, emb, meta)
        shape = "x".join(map(str, emb.features.shape))
        click.echo(f"wrote {shape} features to {', '.join(map(str, written))}", err=True)
    else:
        click.echo("no features written: no image could be read", err=True)
    if emb.errors or not emb.paths:
        sys.exit(1)


@main.command("eval")
@click.option(
    "--data-path",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="An ImageNet-style folder: one sub-folder of images per WordNet id.",
)
@model_options
@click.option(
    "--limit",
    type=click.IntRange(1),
    default=None,
    help="Evaluate this many images, taken round-robin over the classes.",
)
@click.option("--batch-size", "-b", default=8, show_default=True, type=click.IntRange(1))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--progress/--no-progress", default=True, help="Progress bars on stderr.")
def eval_command(
    data_path, model, head, dtype, quantize, q_bits, limit, batch_size, as_json, progress
):
    """Top-1 / top-5 accuracy on an ImageNet-style folder."""
    import json
    import sys

    from . import distributed
    from .evaluate import DatasetError, evaluate

    net = load_for_cli(model, head, dtype, quantize, q_bits, progress)
    try:
        with _ranks_reported():
            result = evaluate(net, data_path, limit=limit, batch_size=batch_size, progress=progress)
    except DatasetError as e:
        raise click.ClickException(str(e)) from None
    if not distributed.is_root():  # under mlx.launch: rank 0 reports every rank's counts
        return
    for path, reason in result.failed:
        report_error(path, reason)
    if as_json:
        info = dict(model=model, head=head, dtype=str(net.dtype).split(".")[-1])
        click.echo(json.dumps({**info, **result.to_dict()}))
    else:
        click.echo(
            f"top-1 {result.top1:.2f}%  top-5 {result.top5:.2f}%  "
            f"({result.images} images, {result.classes} classes)"
        )
    if result.failed:
        sys.exit(1)


def _gb(nbytes: int | None, exact: bool = True) -> str:
    if nbytes is None:
        return "?"
    size = f"{nbytes / GB:.2f} GB" if nbytes >= GB else f"{nbytes / 1e6:.1f} MB"
    return size if exact else "~" + size


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
def models(as_json):
    """The known models: size, published accuracy, files and what is cached."""
    import json

    from .resolve import models_overview

    rows = models_overview()
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    for r in rows:
        params = f"{r['params'] / 1e9:.2f}B params" if r["params"] else "params ?"
        acc = ", ".join(f"{h} {v}%" for h, v in r["top1"].items())
        click.echo(f"{r['name']}  ({params}; ImageNet-1k top-1: {acc or 'n/a'})  hub: {r['repo']}")
        for f in r["files"]:
            mark = "downloaded" if f["downloaded"] else "not downloaded"
            size = _gb(f["size"], f["size_exact"])
            click.echo(f"    {f['role']:<9}{f['filename']}  {size}  sha256 {f['sha256']}  [{mark}]")
        for c in r["converted"]:
            state = "" if c["current"] else "  (old format: converted again on use)"
            click.echo(f"    converted {c['key']}  {_gb(c['size'])}{state}")


@main.group(invoke_without_command=True)
@click.pass_context
def cache(ctx):
    """List, fill and empty the cache of converted models (and the raw downloads)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(cache_list)


@cache.command("list")
def cache_list():
    """Converted models and raw downloads, with their sizes."""
    from huggingface_hub import constants

    from . import hub, registry
    from .cache import cache_root, features_root, list_entries, list_feature_sets

    entries = list_entries()
    click.echo(f"cache: {cache_root()}  (AIM_MLX_CACHE)")
    if not entries:
        click.echo("  no converted models")
    for e in entries:
        state = "" if e.current else "  (old format: converted again on use)"
        click.echo(f"  {e.key:<40} {_gb(e.size):>10}{state}")
    total = sum(e.size for e in entries)
    if entries:
        click.echo(f"  total {_gb(total)}")
    downloads = [
        (spec.name, file, path)
        for spec in registry.all_models().values()
        for file, path in hub.downloaded(spec)
    ]
    if downloads:
        click.echo(f"downloads: {constants.HF_HUB_CACHE}  (HF_HOME; `cache rm-downloads`)")
    for name, file, path in downloads:
        click.echo(f"  {name:<10} {file.filename:<50} {_gb(path.stat().st_size):>10}")
    feature_sets = list_feature_sets()
    if feature_sets:
        click.echo(f"features: {features_root()}  (`aim-mlx probe train`)")
    for e in feature_sets:
        click.echo(f"  {e.key:<60} {e.images:>7} images {_gb(e.size):>10}")


@cache.command("add")
@click.argument("model")
@click.option("--head", type=click.Choice(["best", "last"]), default="best", show_default=True)
@click.option(
    "--dtype",
    type=DTYPE_CHOICE,
    default=None,
    help="Default: float16 on the GPU (Metal), float32 on the CPU.",
)
@click.option("-q", "--quantize", is_flag=True, help="Quantize the trunk's linear layers.")
@click.option("--q-bits", type=click.Choice(["4", "8"]), default="8", show_default=True)
@click.option(
    "--drop-downloads",
    is_flag=True,
    help="Delete the downloaded PyTorch checkpoints once converted.",
)
def cache_add(model, head, dtype, quantize, q_bits, drop_downloads):
    """Download and convert a model now, without running it."""
    from .resolve import resolve

    _exit_on_sigterm()
    bits = int(q_bits) if quantize else None
    try:
        path = resolve(model, head, dtype, quantize_bits=bits, keep_downloads=not drop_downloads)
    except (ValueError, RuntimeError, OSError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(str(path))


@cache.command("rm")
@click.argument("names", nargs=-1)
@click.option(
    "--all", "remove_all", is_flag=True, help="Remove every converted model and feature set."
)
def cache_rm(names, remove_all):
    """Remove converted models: entries as `aim-mlx cache list` shows them, or every entry of a
    model name (aim-1B), and feature sets (by their key). The raw downloads stay: see
    `aim-mlx cache rm-downloads`."""
    from . import cache as model_cache

    if not names and not remove_all:
        raise click.UsageError("name entries or models to remove, or pass --all")
    entries = [e.key for e in model_cache.list_entries()]
    chosen = set(entries) if remove_all else set()
    feature_sets = {e.key for e in model_cache.list_feature_sets()}
    for key in sorted(feature_sets & set(names) if not remove_all else feature_sets):
        click.echo(f"removed features {key} ({_gb(model_cache.remove_feature_set(key))})")
    names = [n for n in names if n not in feature_sets]
    for name in names:
        prefix = name.lower() + "--"
        matches = {key for key in entries if key == name or key.lower().startswith(prefix)}
        if not matches:
            raise click.ClickException(f"nothing cached under {name!r}; see `aim-mlx cache list`")
        chosen |= matches
    for key in sorted(chosen):
        click.echo(f"removed {key} ({_gb(model_cache.remove(key))})")


@cache.command("rm-downloads")
@click.argument("models", nargs=-1)
def cache_rm_downloads(models):
    """Delete the raw downloaded checkpoints of these models (all known models if none are
    named) from the Hugging Face cache; converted models stay usable."""
    from . import hub, registry

    try:
        specs = [registry.get(m) for m in models] or list(registry.all_models().values())
    except registry.RegistryError as e:
        raise click.ClickException(str(e)) from None
    for spec in specs:
        if freed := hub.remove_downloads(spec):
            click.echo(f"removed {spec.name} downloads ({_gb(freed)})")


# ---- Export ---------------------------------------------------------------------------------


@main.group()
def export():
    """Export a model to another format."""


@export.command("coreml")
@head_model_options
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output .mlpackage.")
@click.option(
    "--precision",
    type=click.Choice(coreml.PRECISIONS),
    default="float16",
    show_default=True,
    help="mixed: float32 layer norms, attention and residual stream.",
)
@click.option(
    "--compress",
    type=click.Choice(coreml.COMPRESSIONS),
    default="none",
    show_default=True,
    help="Weight compression (int8: linear; palettize: k-means look-up tables).",
)
@click.option("--img-size", type=int, default=None, help="Input size [default: the model's].")
@click.option(
    "--target",
    type=click.Choice(coreml.TARGETS),
    default="iOS17",
    show_default=True,
    help="iOS18 uses the fused scaled_dot_product_attention op.",
)
@click.option("--features", is_flag=True, help="Output the pooled features, not class labels.")
@click.option(
    "--sample",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="Image(s) for the float16 range check (repeatable) [default: synthetic images].",
)
@click.option("--force", is_flag=True, help="Replace an existing package.")
def export_coreml(
    model,
    head,
    dtype,
    quantize,
    q_bits,
    out,
    precision,
    compress,
    img_size,
    target,
    features,
    sample,
    force,
):
    """Write a Core ML .mlpackage (an Xcode-ready image classifier by default)."""
    import mlx.core as mx
    import numpy as np

    from .resolve import resolve
    from .transforms import ImageError, preprocess

    try:
        coreml.require_coremltools()
        coreml.check_output(out, force)  # before a download or conversion
    except coreml.ExportError as e:
        raise click.ClickException(str(e)) from None
    net = load_for_cli(model, head, dtype, quantize, q_bits)
    size = img_size or net.args.img_size
    images = []
    for path in sample:
        try:
            images.append(preprocess(path, size))
        except (ImageError, OSError) as e:
            raise click.ClickException(f"--sample {path}: {e}") from None
    images = mx.array(np.stack(images)) if images else None
    bits = int(q_bits) if quantize else None
    official_head = head if head in ("best", "last") else "best"  # a trained head: its trunk
    name, source = coreml.describe_model_ref(
        resolve(model, official_head, dtype, quantize_bits=bits, progress=False)  # cached by now
    )
    try:
        path = coreml.export_coreml(
            net,
            out,
            precision=precision,
            compress=compress,
            img_size=img_size,
            target=target,
            features=features,
            name=name,
            source=source,
            sample=images,
            overwrite=force,
        )
    except coreml.ExportError as e:
        raise click.ClickException(str(e)) from None
    weights = coreml.weight_file_size(path)
    click.echo(f"wrote {path} (weights {weights / 2**20:.1f} MiB)")
    if weights > coreml.ANE_WEIGHT_LIMIT:
        click.echo(
            "note: the weight file is over the Neural Engine's 2 GiB limit; Core ML will run "
            "it on the GPU/CPU. --compress palettize4 / palettize6 / int8 make it smaller."
        )


# ---- Your own classifier: a head trained on the frozen trunk ---------------------------------


def _progress_default(progress):
    """--progress/--no-progress; unset: bars only when stderr is a terminal."""
    return sys.stderr.isatty() if progress is None else progress


@main.group()
def probe():
    """Train your own classifier (a head on the frozen trunk) and evaluate it."""


@probe.command("train")
@click.argument("train_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--model", "-m", default="aim-600M", show_default=True, help="The trunk to use.")
@click.option("--out", "-o", required=True, type=click.Path(), help="Output head folder.")
@click.option(
    "--val",
    "val_dir",
    type=click.Path(exists=True, file_okay=False),
    help="Validation folder with the same classes (default: --val-split).",
)
@click.option(
    "--val-split",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="Share of each class held out for validation [default: 0.2].",
)
@click.option(
    "--kind",
    type=click.Choice(["attention", "linear"]),
    default="attention",
    show_default=True,
    help="attention: the ImageNet heads' attention pooling; "
    "linear: mean-pooled tokens and a linear layer (fast baseline).",
)
@click.option(
    "--probe-layers",
    help="Blocks whose mean the head reads: best, last or I,J,... [default: the model's].",
)
@click.option("--epochs", default=30, show_default=True, type=click.IntRange(1))
@click.option(
    "--batch-size",
    "-b",
    default=32,
    show_default=True,
    type=click.IntRange(1),
    help="Training batch (images of cached features).",
)
@click.option(
    "--lr",
    default=1e-3,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Peak learning rate (linear warmup, cosine decay).",
)
@click.option("--weight-decay", default=0.05, show_default=True, type=click.FloatRange(0))
@click.option(
    "--warmup", default=3.0, show_default=True, type=click.FloatRange(0), help="Warmup epochs."
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--dtype",
    type=DTYPE_CHOICE,
    default=None,
    help="Trunk weight dtype [default: float16 on the GPU, float32 on the CPU].",
)
@click.option("-q", "--quantize", is_flag=True, help="Quantize the trunk's linear layers.")
@click.option("--q-bits", type=click.Choice(["4", "8"]), default="8", show_default=True)
@click.option(
    "--extract-batch-size",
    default=8,
    show_default=True,
    type=click.IntRange(1),
    help="Images per trunk batch when extracting features.",
)
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bars on stderr [default: when stderr is a terminal].",
)
def probe_train(
    train_dir,
    model,
    out,
    val_dir,
    val_split,
    kind,
    probe_layers,
    epochs,
    batch_size,
    lr,
    weight_decay,
    warmup,
    seed,
    dtype,
    quantize,
    q_bits,
    extract_batch_size,
    force,
    as_json,
    progress,
):
    """Train a classifier head on TRAIN_DIR (one sub-folder of images per class).

    The trunk's features are extracted once per image and cached (see `aim-mlx cache`); the
    head (weights + config.json) is written to --out. Use it with `classify --head DIR`,
    `probe eval`, `export coreml --head DIR` or `aim_mlx.load(M, head=DIR)`.
    """
    import json

    from .probe import ProbeError, Settings, train

    _exit_on_sigterm()
    if val_dir and val_split:
        raise click.UsageError("give --val or --val-split, not both")
    settings = Settings(kind, epochs, batch_size, lr, weight_decay, warmup, seed)
    try:
        result = train(
            model,
            train_dir,
            out,
            val_dir=val_dir,
            val_split=val_split,
            probe_layers=probe_layers,
            settings=settings,
            dtype=dtype,
            quantize_bits=int(q_bits) if quantize else None,
            extract_batch_size=extract_batch_size,
            progress=_progress_default(progress),
            force=force,
            log=lambda line: click.echo(line, err=True),
        )
    except KeyboardInterrupt:
        click.echo("interrupted; extracted features stay cached, the next run resumes", err=True)
        sys.exit(130)
    except (ProbeError, ValueError, RuntimeError, OSError) as e:
        raise click.ClickException(str(e)) from None
    if result is None:  # under mlx.launch, a rank other than 0: its share went to rank 0
        return
    for path, reason in result.errors:
        report_error(path, reason)
    best = result.best
    top5 = f", top-5 {best.val_top5:.1f}%" if best.val_top5 is not None else ""
    click.echo(
        f"best epoch {best.epoch}: val top-1 {best.val_top1:.1f}%{top5} "
        f"({result.train_images} training, {result.val_images} validation images, "
        f"{len(result.classes)} classes; {result.extracted} images through the trunk)",
        err=True,
    )
    click.echo(f"wrote {result.out}", err=True)
    if as_json:
        click.echo(json.dumps(json.loads((result.out / "config.json").read_text())))


@probe.command("eval")
@click.argument("val_dir", type=click.Path(exists=True, file_okay=False))
@head_model_options
@click.option("--batch-size", "-b", default=8, show_default=True, type=click.IntRange(1))
@click.option(
    "--confusion",
    type=click.Path(dir_okay=False),
    help="Write the confusion matrix as a PNG picture.",
)
@click.option("--force", is_flag=True, help="Replace an existing --confusion file.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bars on stderr [default: when stderr is a terminal].",
)
def probe_eval(
    val_dir, model, head, dtype, quantize, q_bits, batch_size, confusion, force, as_json, progress
):
    """Top-1 (top-5 with 5+ classes) and per-class accuracy of a trained head (--head DIR) on
    VAL_DIR, one sub-folder per class."""
    import json

    from . import distributed
    from .probe.evaluate import evaluate_head, save_confusion
    from .probe.head import is_head_folder

    if not is_head_folder(head):
        raise click.UsageError("--head must be a trained head's folder (from `probe train`)")
    if confusion:
        target = Path(confusion)
        if target.suffix.lower() != ".png":
            raise click.BadParameter("must end in .png", param_hint="--confusion")
        if target.exists() and not force:
            raise click.ClickException(f"{target} already exists (overwrite it with --force)")
        if not target.absolute().parent.is_dir():
            raise click.ClickException(f"cannot write {target}: its folder does not exist")
    progress = _progress_default(progress)
    net = load_for_cli(model, head, dtype, quantize, q_bits, progress)
    try:
        with _ranks_reported():
            result = evaluate_head(net, val_dir, batch_size=batch_size, progress=progress)
    except KeyboardInterrupt:
        sys.exit(130)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    if not distributed.is_root():  # under mlx.launch: rank 0 reports every rank's counts
        return
    for path, reason in result.failed:
        report_error(path, reason)
    if confusion:
        save_confusion(
            result,
            confusion,
            f"{Path(head).name}: top-1 {result.top1:.1f}% on {result.images} images of {val_dir}",
        )
    if as_json:
        info = dict(model=model, head=str(head), dtype=str(net.dtype).split(".")[-1])
        click.echo(json.dumps({**info, **result.to_dict()}))
    else:
        top5 = f"  top-5 {result.top5:.2f}%" if result.top5 is not None else ""
        click.echo(
            f"top-1 {result.top1:.2f}%{top5}  ({result.images} images, {result.classes} classes)"
        )
        for name, row in result.per_class().items():
            acc = f"{row['top1']:6.2f}%" if row["top1"] is not None else "     -"
            click.echo(f"  {acc}  {name}  ({row['images']} images)")
    if confusion:
        click.echo(f"wrote {confusion}", err=True)
    if result.failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
