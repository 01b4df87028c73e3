"""The `aim-mlx` command line: parse options, call the library, print."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import click
from click.core import ParameterSource

from . import __version__, runtime
from .constants import DTYPE_NAMES, GB, MB, MiB
from .errors import AimMlxError, OptionError, OutputError
from .export import COMPRESSIONS, PRECISIONS, TARGETS
from .process_wide import ProcessWide

INTERRUPTED = 130  # 128 + SIGINT, the shell's convention
TERMINATED = 128 + signal.SIGTERM


def _exit_on_sigterm():
    """Turn SIGTERM into SystemExit so that cleanup code (temporary folders) runs."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(TERMINATED))


@contextmanager
def _reported(ctx: click.Context):
    """The project's errors as one line: an option the library refuses is a usage error (exit
    2), any other AimMlxError exits 1; Ctrl-C exits 130. Anything else is a bug: traceback."""
    try:
        yield
    except OptionError as e:
        raise click.UsageError(str(e), ctx) from None
    except AimMlxError as e:
        from . import distributed

        message = str(e)
        if not message.startswith("rank "):  # under mlx.launch: name the rank that failed
            message = distributed.tag(message)
        raise click.ClickException(message) from None
    except KeyboardInterrupt:
        click.echo("\ninterrupted", err=True)
        raise click.exceptions.Exit(INTERRUPTED) from None


class _Stdout:
    """sys.stdout whose failures are one error line: a full disk, a closed stream (results
    would be lost). A broken pipe (`| head`) stays an OSError, which click ends quietly."""

    def __init__(self, stream):
        self._stream = stream

    def __getattr__(self, name):
        if self._stream is None:
            raise AttributeError(name)
        return getattr(self._stream, name)

    def write(self, text):
        try:
            return self._do("write", text)
        except UnicodeEncodeError:
            buffer = getattr(self._stream, "buffer", None)
            if buffer is None:
                raise
            # A file name whose bytes are not UTF-8 (Linux) under a locale that encodes strictly:
            # its own bytes, as under the C locale (what this cannot encode raises again).
            data = text.encode(self._stream.encoding, "surrogateescape")
            self._do("flush")
            self._do_on(buffer, "write", data)
            return len(text)

    def flush(self):
        if self._stream is not None:  # closed: nothing was written, nothing to flush
            return self._do("flush")

    def _do(self, method, *args):
        return self._do_on(self._stream, method, *args)

    def _do_on(self, stream, method, *args):
        if stream is None:
            raise OutputError("standard output is closed: the results cannot be written")
        try:
            return getattr(stream, method)(*args)
        except OSError as e:
            if e.errno == errno.EPIPE:
                raise
            raise OutputError(f"cannot write to standard output: {e.strerror or e}") from None


def _check_stdout():
    saved, sys.stdout = sys.stdout, _Stdout(sys.stdout)
    return saved


def _give_back_stdout(saved):
    sys.stdout = saved


_STDOUT_CHECKED = ProcessWide(_check_stdout, _give_back_stdout)


# Commands that read no AIM_MLX_* setting: they work (and `info` shows) whatever the values.
NO_SETTINGS = ("models", "info", "cache")


def _top_command(ctx: click.Context) -> str:
    """The command named after `aim-mlx`: `cache` for `aim-mlx cache rm`."""
    while ctx.parent is not None and ctx.parent.parent is not None:
        ctx = ctx.parent
    return ctx.info_name


class _Echo:
    """A file for csv.writer: stdout as it is, or click.echo where it cannot encode the text
    (an ASCII-configured stdout: click writes UTF-8)."""

    def write(self, text):
        try:
            sys.stdout.write(text)
        except UnicodeEncodeError:
            click.echo(text, nl=False)


class Command(click.Command):
    def invoke(self, ctx):
        with _reported(ctx):
            if _top_command(ctx) not in NO_SETTINGS:
                runtime.check_settings()  # the AIM_MLX_* settings, before any work
            _check_quantize_options(ctx)
            return super().invoke(ctx)


def _check_quantize_options(ctx: click.Context) -> None:
    """--q-bits or --q-group-size given without -q: a usage error, before any work (they would
    be ignored). Where -q is hidden (export coreml), any of them is refused."""
    quantize = next((p for p in ctx.command.params if p.name == "quantize"), None)
    if quantize is not None and quantize.hidden:
        given = ("quantize", "q_bits", "q_group_size")
        if any(ctx.get_parameter_source(n) is ParameterSource.COMMANDLINE for n in given):
            raise click.UsageError(
                "a package holds float weights: quantized MLX weights would be dequantized "
                "(their rounding error, not their size); make it smaller with --compress int8, "
                "palettize6 or palettize4",
                ctx,
            )
    if ctx.params.get("quantize", True):
        return
    for name in ("q_bits", "q_group_size"):
        if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE:
            option = "--" + name.replace("_", "-")
            raise click.UsageError(f"{option} is for quantized weights: add -q (--quantize)", ctx)


class Group(click.Group):
    command_class = Command
    group_class = type  # sub-groups are of this class too

    def main(self, *args, **kwargs):
        """click's main, writing through `_Stdout` for the whole run (--help and --version
        too); sys.stdout is given back afterwards (a notebook goes on using it), when the last
        of the runs in several threads ends."""
        if sys.stderr is None:  # started with stderr closed (2>&-): messages go nowhere
            sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (for the process's lifetime)
        try:
            with _STDOUT_CHECKED.held():
                return super().main(*args, **kwargs)
        except OutputError as e:  # printing --help or --version; commands report their own
            click.echo(f"Error: {e}", err=True)
            sys.exit(1)

    def make_context(self, *args, **kwargs):
        """Ctrl-C while click reads the command line: as in a command (not click's Aborted!)."""
        try:
            return super().make_context(*args, **kwargs)
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            raise click.exceptions.Exit(INTERRUPTED) from None

    def invoke(self, ctx):
        previous = signal.getsignal(signal.SIGTERM)
        _exit_on_sigterm()
        try:
            with _reported(ctx):
                return super().invoke(ctx)
        finally:  # a notebook calling main() keeps its own SIGTERM handling
            if previous is not None and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, previous)


# ---- Option sets shared by the commands ---------------------------------------------------


def _options(*options):
    def apply(f):
        for option in reversed(options):
            f = option(f)
        return f

    return apply


def _model(ctx, param, value: str) -> str:
    """A model name or folder; "" (`-m "$MODEL"`, MODEL unset) is refused, not taken as the
    working folder."""
    if value == "":
        raise click.BadParameter("give a model name (see `aim-mlx models`) or a folder, got ''")
    return value


def model_option(help: str):
    """-m/--model, aim-600M unless given."""
    return click.option(
        "--model", "-m", default="aim-600M", show_default=True, callback=_model, help=help
    )


def _img_size(ctx, param, value: int | None) -> int | None:
    if value is not None and (value <= 0 or value % 14):
        raise click.BadParameter(f"must be a positive multiple of 14 (the patch size), got {value}")
    return value


HEAD_HELP = (
    "best or last: which official head (the best or the last six layers), or a folder made "
    "by `aim-mlx probe train` (a folder named best: ./best). Default: a converted folder's own "
    "head, else best."
)
OFFICIAL_HEAD_HELP = (
    "best or last: which official head (the best or the last six layers). Default: a converted "
    "folder's own head, else best."
)
DTYPE_HELP = "Weight dtype. Default: float16 on the GPU (Metal, CUDA), float32 on the CPU."


def quantize_options(hidden: bool = False) -> tuple:
    """-q/--quantize and --q-bits; `hidden` leaves them out of --help where they are refused
    (export coreml), yet parsed so that the refusal says why."""
    return (
        click.option(
            "-q",
            "--quantize",
            is_flag=True,
            hidden=hidden,
            help="Quantize the trunk's linear layers.",
        ),
        click.option(
            "--q-bits",
            type=click.Choice(["4", "8"]),
            default="8",
            show_default=True,
            hidden=hidden,
            help="Bits per quantized weight (with -q).",
        ),
    )


quantize_option, q_bits_option = quantize_options()


def weight_options_for(head_help: str = HEAD_HELP, quantize: bool = True):
    """--head, --dtype, -q/--quantize, --q-bits: which weights to load or convert."""
    return _options(
        click.option("--head", default=None, help=head_help),
        click.option("--dtype", type=click.Choice(DTYPE_NAMES), default=None, help=DTYPE_HELP),
        *quantize_options(hidden=not quantize),
    )


def model_options_for(head_help: str = HEAD_HELP, quantize: bool = True):
    """-m/--model and the weight options: what to load (fetched and converted on first use)."""
    return _options(
        model_option(
            "A model name (aim-600M, aim-1B, aim-3B, aim-7B; see `aim-mlx models`), a "
            "converted folder, or a folder of PyTorch checkpoints."
        ),
        weight_options_for(head_help, quantize),
    )


model_options = model_options_for()


def output_options(help: str, **path_kwargs):
    """-o/--out (required) and --force (replace an existing output)."""
    return _options(
        click.option("--out", "-o", required=True, type=click.Path(**path_kwargs), help=help),
        click.option("--force", is_flag=True, help="Replace an existing output."),
    )


progress_option = click.option(
    "--progress/--no-progress",
    default=True,
    show_default=True,
    help="Progress messages on stderr, and bars when stderr is a terminal.",
)
img_size_option = click.option(
    "--img-size",
    type=int,
    default=None,
    callback=_img_size,
    help="Input size, a multiple of 14 [default: the model's, 224].",
)


def batch_size_option(default: int = 8):
    return click.option(
        "--batch-size",
        "-b",
        default=default,
        show_default=True,
        type=click.IntRange(1),
        help="Images per batch.",
    )


def json_option(help: str):
    return click.option("--json", "as_json", is_flag=True, help=help)


def _bits(quantize: bool, q_bits: str) -> int | None:
    return int(q_bits) if quantize else None


def _weights(head, dtype, quantize: bool, q_bits: str) -> dict:
    """The library's keywords for which weights to load: head, dtype, quantize_bits."""
    return dict(head=head, dtype=dtype, quantize_bits=_bits(quantize, q_bits))


def _count(n: int, word: str) -> str:
    """A count and its noun: 1 image, 2 images, 1 class, 3 classes."""
    return f"{n} {word}" if n == 1 else f"{n} {word}{'es' if word.endswith('s') else 's'}"


def report_error(path: str, reason: str) -> None:
    click.echo(one_line(f"error: {path}: {reason}"), err=True)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(text: str) -> str:
    """`text` with control characters escaped (a newline as \\n), so that a file or class name
    cannot break a line of plain-text output into two."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


# ---- Commands -----------------------------------------------------------------------------


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="aim-mlx")
def main():
    """Apple's AIM v1 vision models in pure MLX."""


@main.command()
@click.option("--backbone", type=click.Path(dir_okay=False), help="Official *_backbone.pth file.")
@click.option("--head", type=click.Path(dir_okay=False), help="Official *_head_*_layers.pth file.")
@click.option("--hf-path", help="Hub-style folder or repo id (config.json + weights).")
@output_options("Output folder (missing parent folders are created).", file_okay=False)
@click.option(
    "--probe-layers",
    help="Blocks the head reads: best, last or I,J,... (default: from the head file or config).",
)
@click.option("--num-heads", type=click.IntRange(1), help="Attention heads, for other sizes.")
@img_size_option
@click.option(
    "--dtype",
    type=click.Choice(DTYPE_NAMES),
    default="float32",
    show_default=True,
    help="Weight dtype of the output folder.",
)
@quantize_option
@q_bits_option
@click.option(
    "--q-group-size",
    type=click.Choice(["32", "64", "128"]),
    default="64",
    show_default=True,
    help="Weights per quantization scale (with -q).",
)
@progress_option
def convert(
    backbone,
    head,
    hf_path,
    out,
    force,
    probe_layers,
    num_heads,
    img_size,
    dtype,
    quantize,
    q_bits,
    q_group_size,
    progress,
):
    """Convert official PyTorch checkpoints into an MLX model folder (no PyTorch needed)."""
    from .convert import ConversionError, parse_probe_layers
    from .convert import convert as run_convert

    if hf_path and (backbone or head):
        raise click.UsageError("give either --hf-path or --backbone and --head, not both")
    if not hf_path and not (backbone and head):
        raise click.UsageError(
            "give --backbone FILE and --head FILE (official *_backbone.pth and *_head_*.pth), "
            "or --hf-path FOLDER_OR_REPO"
        )
    try:
        parse_probe_layers(probe_layers)
    except ConversionError as e:
        raise click.UsageError(str(e)) from None  # it names --probe-layers
    run_convert(
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
        progress=progress,
    )
    click.echo(f"wrote {out}")  # as the user named it


def _int_list(ctx, param, value: str) -> list[int]:
    try:
        items = [int(v) for v in value.split(",")]  # an empty item (1,,2) is refused too
    except ValueError:
        raise click.BadParameter(f"expected integers like 1,8,32, got {value!r}") from None
    if min(items) < 1:
        raise click.BadParameter(f"expected positive integers like 1,8,32, got {value!r}")
    return items


def _dtype_list(ctx, param, value: str | None) -> list[str | None]:
    if value is None:  # float32, or a converted folder's own
        return [None]
    items = [v.strip() for v in value.split(",")]
    if any(v not in DTYPE_NAMES for v in items):
        raise click.BadParameter(
            f"expected float32, float16 and/or bfloat16 (comma-separated), got {value!r}"
        )
    return items


@main.command()
@model_option(
    "A size (aim-600M, aim-1B, aim-3B, aim-7B: random weights), a converted folder, or a folder "
    "of PyTorch checkpoints (converted into the cache first)."
)
@click.option(
    "--batch-size", "-b", default="1", callback=_int_list, show_default=True, help="E.g. 1,8,32."
)
@click.option(
    "--dtype",
    callback=_dtype_list,
    help="Weight dtypes, e.g. float32,float16,bfloat16.  [default: float32; a converted "
    "folder's own]",
)
@quantize_option
@q_bits_option
@click.option(
    "--compile/--no-compile",
    "compile_",
    default=False,
    show_default=True,
    help="Run the model through mx.compile.",
)
@img_size_option
@click.option(
    "--head",
    type=click.Choice(["best", "last"]),
    default=None,
    help="Sizes and checkpoint folders: the best-layers head (the default) stops the trunk "
    "early, the last-layers one runs it all.",
)
@click.option(
    "--warmup",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="Untimed passes before the timed ones.",
)
@click.option(
    "--iters", type=click.IntRange(min=1), default=5, show_default=True, help="Timed passes."
)
@json_option("One JSON object per configuration per line.")
def bench(
    model, batch_size, dtype, quantize, q_bits, compile_, img_size, head, warmup, iters, as_json
):
    """Images/s, latency and memory of a model (offline: sizes use random weights)."""
    from . import bench as lib
    from . import distributed

    distributed.one_process("bench")
    rows = []
    for config in lib.configs(
        model,
        batch_size,
        dtype,
        _bits(quantize, q_bits),
        compile_,
        img_size,
        head,
        warmup,
        iters,
    ):
        if not as_json:
            dtype = f" {config.dtype}" if config.dtype else ""  # None: a converted folder's own
            click.echo(f"running {config.model} batch {config.batch_size}{dtype} ...", err=True)
        row = lib.run(config)
        rows.append(row)
        if as_json:
            click.echo(json.dumps(row))
    if not as_json:
        click.echo(lib.format_table(rows))


@main.command()
@json_option("Print the information as one JSON object.")
def info(as_json):
    """Versions, device, GPU and the BLAS that MLX's CPU matmuls use."""
    from . import bench as lib

    environment = {**lib.environment(), "settings": _settings_state()}
    if as_json:
        try:
            listing = cache_listing()
        except AimMlxError as e:  # AIM_MLX_CACHE or AIM_MLX_REGISTRY unusable: show why
            listing = {"error": str(e)}
        click.echo(json.dumps({**environment, "cache": listing}))
        return
    for key, value in environment.items():
        click.echo(f"{key}: {value}")


def _settings_state() -> str:
    """ "ok", or what is wrong with the AIM_MLX_* settings (`info` shows it, never fails on it)."""
    from . import cache, hub, registry

    try:
        runtime.check_settings()
        registry.all_models()  # AIM_MLX_REGISTRY
        cache.cache_root()  # AIM_MLX_CACHE
        hub.check_endpoint()  # HF_ENDPOINT
    except AimMlxError as e:
        return f"invalid: {e}"
    return "ok"


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@model_options
@click.option(
    "--top-k",
    "-k",
    default=5,
    show_default=True,
    type=click.IntRange(1, 1000),
    help="Classes per image.",
)
@batch_size_option()
@img_size_option
@json_option("One JSON object per image per line ({path, error} for a failed one).")
@click.option("--csv", "as_csv", is_flag=True, help="Rows of path,rank,index,label,prob,error.")
@progress_option
def classify(
    inputs,
    model,
    head,
    dtype,
    quantize,
    q_bits,
    top_k,
    batch_size,
    img_size,
    as_json,
    as_csv,
    progress,
):
    """Top-k classes of images (files, or folders searched recursively): ImageNet's, or a
    trained head's (--head DIR; --top-k is clamped to its number of classes)."""
    import csv

    from .classifier import load_and_classify

    if as_json and as_csv:
        raise click.UsageError("choose one of --json and --csv")
    rows = load_and_classify(
        model,
        inputs,
        **_weights(head, dtype, quantize, q_bits),
        k=top_k,
        batch_size=batch_size,
        img_size=img_size,
        progress=progress,
    )
    if rows is None:  # under mlx.launch, a rank other than 0: rank 0 prints every rank's rows
        return
    writer = csv.writer(_Echo(), lineterminator="\n") if as_csv else None
    if writer:
        writer.writerow(["path", "rank", "index", "label", "prob", "error"])
    failed = 0
    for row in rows:
        if "error" in row:
            failed += 1
            report_error(row["path"], row["error"])
        if as_json:
            click.echo(json.dumps(row))
        elif writer:
            if "error" in row:
                writer.writerow([row["path"], "", "", "", "", row["error"]])
            for rank, p in enumerate(row.get("top_k", []), 1):
                prob = f"{p['prob']:.6g}"
                writer.writerow([row["path"], rank, p["index"], p["label"], prob, ""])
            sys.stdout.flush()
        elif "top_k" in row:
            click.echo(one_line(row["path"]))
            for rank, p in enumerate(row["top_k"], 1):
                label = one_line(p["label"])
                click.echo(f"  {rank}. {100 * p['prob']:6.2f}%  {label}  ({p['index']})")
    if failed:
        raise click.exceptions.Exit(1)  # a notebook's main(..., standalone_mode=False) gets 1


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@output_options("Output file: .safetensors or .npy.", dir_okay=False)
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
@batch_size_option()
@img_size_option
@progress_option
def embed(
    inputs,
    out,
    force,
    layers,
    pool,
    model,
    head,
    dtype,
    quantize,
    q_bits,
    batch_size,
    img_size,
    progress,
):
    """Write image features to a .safetensors or .npy file.

    safetensors: tensor `features`, the image order as JSON in the metadata key `paths`.
    npy: the array, with the image order in FILE.paths.txt (one JSON string per line).
    """

    from .embed import SUFFIXES, embed_to_file, parse_layers
    from .resolve import known_num_blocks

    # the library checks these too: here, before anything, they name their option
    if Path(out).suffix not in SUFFIXES:  # ".npy" alone has no suffix
        raise click.BadParameter("must end in .safetensors or .npy", param_hint="--out")
    try:
        parse_layers(layers, known_num_blocks(model) or 10**9)  # unknown blocks: the syntax
    except OptionError as e:
        raise click.BadParameter(str(e), param_hint="--layers") from None

    def waiting(folder):
        click.echo(f"waiting for another process writing to {folder}", err=True)

    result = embed_to_file(
        model,
        inputs,
        out,
        **_weights(head, dtype, quantize, q_bits),
        layers=layers,
        pool=pool,
        batch_size=batch_size,
        img_size=img_size,
        force=force,
        progress=progress,
        on_wait=waiting,
    )
    if result is None:  # under mlx.launch, a rank other than 0: rank 0 writes every rank's rows
        return
    for path, first in result.repeats:
        again = "listed twice by the inputs" if path == first else f"the same file as {first}"
        click.echo(one_line(f"note: {path}: {again}; embedded once"), err=True)
    for path, reason in result.errors:
        report_error(path, reason)
    if result.files:
        shape = "x".join(map(str, result.shape))
        named = [out, *map(str, result.files[1:])]  # the output as the user gave it
        click.echo(f"wrote {shape} features to {', '.join(named)}", err=True)
    else:
        click.echo("no features written: no image could be read", err=True)
    if result.errors or not result.files:
        raise click.exceptions.Exit(1)


DATA_FOLDER = click.Path(exists=True, file_okay=False)


@main.command("eval")
@click.argument("data", required=False, type=DATA_FOLDER)
@click.option("--data-path", type=DATA_FOLDER, help="The same as DATA.")
@model_options_for(OFFICIAL_HEAD_HELP)  # a trained head: `probe eval`
@click.option(
    "--limit",
    type=click.IntRange(1),
    default=None,
    help="Evaluate this many images, taken round-robin over the classes.",
)
@batch_size_option()
@img_size_option
@json_option("Print the result as JSON.")
@progress_option
def eval_command(
    data,
    data_path,
    model,
    head,
    dtype,
    quantize,
    q_bits,
    limit,
    batch_size,
    img_size,
    as_json,
    progress,
):
    """Top-1 / top-5 accuracy on DATA, an ImageNet-style folder (one sub-folder of images per
    WordNet id, like n01440764)."""
    from .evaluate import evaluate_model

    if data and data_path and Path(data).resolve() != Path(data_path).resolve():
        raise click.UsageError("give the data folder once: DATA or --data-path")
    data = data or data_path
    if not data:
        raise click.UsageError("missing the data folder: aim-mlx eval DATA")
    evaluation = evaluate_model(
        model,
        data,
        **_weights(head, dtype, quantize, q_bits),
        limit=limit,
        batch_size=batch_size,
        img_size=img_size,
        progress=progress,
    )
    _report_evaluation(evaluation, as_json)


def _report_evaluation(evaluation, as_json: bool, per_class=False, wrote=None) -> None:
    """What eval and probe eval print: the images that failed (stderr), then the --json object
    or the accuracy lines (with `per_class`, one per class too); exit status 1 if an image
    failed. Nothing where `evaluation` is None (under mlx.launch, a rank other than 0: rank 0
    reports every rank's counts)."""
    if evaluation is None:
        return
    result = evaluation.result
    for path, reason in result.failed:
        report_error(path, reason)
    if as_json:
        click.echo(json.dumps(evaluation.to_dict()))
    elif result.top1 is None:
        click.echo("no accuracy: no image could be read (see the errors above)")
    else:
        top5 = f"  top-5 {result.top5:.2f}%" if result.top5 is not None else ""  # <= 5 classes
        click.echo(
            f"top-1 {result.top1:.2f}%{top5}  "
            f"({_count(result.images, 'image')}, {_count(result.classes, 'class')})"
        )
        for name, row in result.per_class().items() if per_class else ():
            acc = f"{row['top1']:6.2f}%" if row["top1"] is not None else "     -"
            click.echo(f"  {acc}  {one_line(name)}  ({_count(row['images'], 'image')})")
    if wrote:  # the confusion matrix
        click.echo(f"wrote {wrote}", err=True)
    if result.failed:
        raise click.exceptions.Exit(1)


def _stale(entry: dict) -> str:
    """What `cache list` and `models` add to an entry that is not served as it is."""
    if entry["current"]:
        return ""
    if entry.get("newer"):
        return "  (made by a newer aim-mlx: not used by this one)"
    return "  (old format or model changed: converted again on use)"


def _gb(nbytes: int | None, exact: bool = True) -> str:
    if nbytes is None:
        return "?"
    size = f"{nbytes / GB:.2f} GB" if nbytes >= GB else f"{nbytes / MB:.1f} MB"
    return size if exact else "~" + size


@main.command()
@json_option("Print the list as JSON.")
def models(as_json):
    """The known models: size, published accuracy, files and what is cached."""
    from .resolve import models_overview

    rows = models_overview()
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    for r in rows:
        n = r["params"]
        params = f"{n / 1e9:.2f}B params" if n >= 1e8 else f"{n / 1e6:.2f}M params"
        acc = ", ".join(f"{h} {v}%" for h, v in r["top1"].items())
        click.echo(f"{r['name']}  ({params}; ImageNet-1k top-1: {acc or 'n/a'})  hub: {r['repo']}")
        for f in r["files"]:
            mark = "downloaded" if f["downloaded"] else "not downloaded"
            size = _gb(f["size"], f["size_exact"])
            click.echo(f"    {f['role']:<9}{f['filename']}  {size}  sha256 {f['sha256']}  [{mark}]")
        for c in r["converted"]:
            state = _stale(c)
            click.echo(f"    converted {c['key']}  {_gb(c['size'])}{state}")


@main.group(invoke_without_command=True)
@click.pass_context
def cache(ctx):
    """List, fill, check and empty the cache of converted models (and the raw downloads)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(cache_list)


def cache_listing() -> dict:
    """What `aim-mlx cache` lists, as `cache list --json` (and `info --json`'s "cache") print it."""
    from huggingface_hub import constants

    from . import hub, registry
    from .cache import cache_root, features_root, file_size, list_entries, list_feature_sets

    return dict(
        cache=str(cache_root()),
        models=[e.row() for e in list_entries()],
        downloads_dir=str(constants.HF_HUB_CACHE),
        downloads=[
            dict(model=spec.name, file=file.filename, path=str(path), size=size)
            for spec in registry.all_models().values()
            for file, path in hub.downloaded(spec)
            if (size := file_size(path)) is not None  # not removed meanwhile (rm-downloads)
        ],
        features_dir=str(features_root()),
        features=[
            dict(key=e.key, path=str(e.path), images=e.images, size=e.size)
            for e in list_feature_sets()
        ],
    )


@cache.command("list")
@json_option("Print the cache as one JSON object.")
def cache_list(as_json=False):
    """Converted models, raw downloads and feature sets, with their sizes."""
    listing = cache_listing()
    if as_json:
        click.echo(json.dumps(listing, indent=1))
        return
    models, downloads, features = listing["models"], listing["downloads"], listing["features"]
    click.echo(f"cache: {listing['cache']}  (AIM_MLX_CACHE)")
    if not models:
        click.echo("  no converted models")
    for m in models:
        state = _stale(m)
        click.echo(f"  {m['key']:<40} {_gb(m['size']):>10}{state}")
    if models:
        click.echo(f"  total {_gb(sum(m['size'] for m in models))}")
    if downloads:
        click.echo(f"downloads: {listing['downloads_dir']}  (HF_HOME; `cache rm-downloads`)")
    for d in downloads:
        click.echo(f"  {d['model']:<10} {d['file']:<50} {_gb(d['size']):>10}")
    if features:
        click.echo(f"features: {listing['features_dir']}  (`aim-mlx probe train`)")
    for f in features:
        click.echo(f"  {f['key']:<60} {f['images']:>7} images {_gb(f['size']):>10}")


@cache.command("add")
@click.argument("model", callback=_model)
@weight_options_for(OFFICIAL_HEAD_HELP)  # the cache holds official heads only
@click.option(
    "--drop-downloads",
    is_flag=True,
    help="Delete the downloaded PyTorch checkpoints once converted.",
)
@progress_option
def cache_add(model, head, dtype, quantize, q_bits, drop_downloads, progress):
    """Download and convert a model now, without running it."""
    from .resolve import resolve

    path = resolve(
        model,
        head,
        dtype,
        quantize_bits=_bits(quantize, q_bits),
        keep_downloads=not drop_downloads,
        progress=progress,
    )
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
    chosen, features = model_cache.to_remove(names, remove_all)
    leftovers = model_cache.remove_leftovers() if remove_all else 0  # of killed processes
    if leftovers:
        click.echo(f"removed what interrupted conversions left ({_gb(leftovers)})")
    if not chosen and not features and not leftovers:
        click.echo("nothing to remove: the cache holds no converted models or feature sets")
    for key in features:
        click.echo(f"removed features {key} ({_gb(model_cache.remove_feature_set(key))})")
    for key in chosen:
        wait = f"waiting for another process using {key} (converting or verifying it)"
        freed = model_cache.remove(key, on_wait=lambda: click.echo(wait, err=True))  # noqa: B023
        click.echo(f"removed {key} ({_gb(freed)})")


@cache.command("verify")
@click.argument("names", nargs=-1)
@json_option("Print one JSON object per entry, one a line.")
@progress_option
def cache_verify(names, as_json, progress):
    """Check converted models against the SHA-256 recorded when they were converted (their
    SHA256SUMS, config.json included): the entries named (keys as `aim-mlx cache list` shows
    them, or model names) and converted folders (`aim-mlx convert -o`), else every entry. Exit
    status 1 if a file is damaged or missing."""
    from . import cache as model_cache

    verdicts = model_cache.verify_named(names, progress)  # the names checked first
    failed = checked = False
    for verdict in verdicts:
        checked = True
        click.echo(json.dumps(verdict.row()) if as_json else _verdict_line(verdict))
        failed |= verdict.failed
    if not checked and not as_json:
        click.echo("nothing to verify: the cache holds no converted models")
    if failed:
        raise click.exceptions.Exit(1)


def _verdict_line(verdict) -> str:
    """`cache verify`'s line for one entry or folder: its status, and what to do about it."""
    key = verdict.key
    problems = "; ".join(f"{name}: {what}" for name, what in verdict.problems.items())
    if verdict.in_cache:
        remedy = f"remove it (`aim-mlx cache rm {key}`): the next use converts it again"
        again = f"`aim-mlx cache rm {key}` and use the model again"
    else:
        remedy = again = "convert it again (`aim-mlx convert ... --out FOLDER --force`)"
    detail = {
        "ok": "",
        "damaged": f": {problems}; {remedy}",
        "missing": f": {problems}; {remedy}",
        "no-checksums": (
            f": made by an older aim-mlx, which recorded no checksums; to have them, {again}"
        ),
        "newer": ": made by a newer aim-mlx; not checked",
        "busy": ": another process is converting or removing it; verify it when that is done",
        "removed": ": removed by another process meanwhile",
    }[verdict.status]
    return f"{verdict.status:<13}{key}{detail}"


@cache.command("rm-downloads")
@click.argument("models", nargs=-1)
def cache_rm_downloads(models):
    """Delete the raw downloaded checkpoints of these models (all known models if none are
    named) from the Hugging Face cache; converted models stay usable."""
    from . import hub, registry

    known = registry.all_models()  # an unreadable AIM_MLX_REGISTRY: its own error, no hint
    try:
        specs = [registry.get(m) for m in models] or list(known.values())
    except registry.RegistryError as e:  # a model since taken out of the registry, perhaps
        raise registry.RegistryError(
            f"{e}; the downloads of a model no longer registered: `hf cache ls`, then "
            "`hf cache rm model/ORG/NAME`"
        ) from None
    removed = False
    for spec in specs:
        if freed := hub.remove_downloads(spec):
            removed = True
            click.echo(f"removed {spec.name} downloads ({_gb(freed)})")
    if not removed:
        names = ", ".join(spec.name for spec in specs) if models else "any model"
        click.echo(f"nothing to remove: no downloads of {names} in the Hugging Face cache")


# ---- Export ---------------------------------------------------------------------------------


@main.group()
def export():
    """Export a model to another format."""


@export.command("coreml")
@model_options_for(quantize=False)  # a package holds float weights: -q is refused
@output_options("Output .mlpackage (missing parent folders are created).", path_type=Path)
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default="float16",
    show_default=True,
    help="mixed: float32 layer norms, attention and residual stream.",
)
@click.option(
    "--compress",
    type=click.Choice(COMPRESSIONS),
    default="none",
    show_default=True,
    help="Weight compression (int8: linear; palettize: k-means look-up tables).",
)
@img_size_option
@click.option(
    "--target",
    type=click.Choice(TARGETS),
    default="iOS17",
    show_default=True,
    help="Oldest OS that loads the package (iOS17: macOS 14; iOS18: macOS 15, fused attention).",
)
@click.option("--features", is_flag=True, help="Output the pooled features, not class labels.")
@click.option(
    "--sample",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="Image(s) for the float16 range check (repeatable) [default: synthetic images].",
)
@progress_option
def export_coreml(
    model,
    head,
    dtype,
    quantize,
    q_bits,
    out,
    force,
    precision,
    compress,
    img_size,
    target,
    features,
    sample,
    progress,
):
    """Write a Core ML .mlpackage (an Xcode-ready image classifier by default)."""
    from . import distributed
    from .export import coreml
    from .transforms import ImageError

    distributed.one_process("export coreml")
    # the library checks these too: here, before anything, they name their option
    if out.suffix != ".mlpackage":
        raise click.BadParameter(f"must end in .mlpackage, got {out}", param_hint="--out")
    if sample and precision == "float32":
        raise click.BadParameter(
            "images for the float16 range check: a float32 package has none (use it with "
            "--precision float16 or mixed)",
            param_hint="--sample",
        )
    try:
        result = coreml.export_model(
            model,
            out,
            head=head,
            dtype=dtype,
            precision=precision,
            compress=compress,
            img_size=img_size,
            target=target,
            features=features,
            sample_paths=sample,
            force=force,
            progress=progress,
        )
    except ImageError as e:  # a --sample image (decoded before the model is loaded)
        raise click.BadParameter(str(e), param_hint="--sample") from None
    click.echo(f"wrote {out} (weights {result.weight_bytes / MiB:.1f} MiB)")
    if compress == "none" and (bits := result.dequantized_bits):
        click.echo(
            f"note: the model's {bits}-bit weights are in the package dequantized, at "
            f"{precision}'s size; --compress int8 or palettize4 / palettize6 makes it smaller"
        )
    if result.weight_bytes > coreml.ANE_WEIGHT_LIMIT:
        click.echo(
            "note: the weight file is over the Neural Engine's 2 GiB limit; Core ML will run "
            "it on the GPU/CPU. --compress palettize4 / palettize6 / int8 make it smaller."
        )


# ---- Your own classifier: a head trained on the frozen trunk ---------------------------------


@main.group()
def probe():
    """Train your own classifier (a head on the frozen trunk) and evaluate it."""


@probe.command("train")
@click.argument("train_dir", type=click.Path(exists=True, file_okay=False))
@model_option("The trunk to use.")
@output_options("Output head folder (missing parent folders are created).", file_okay=False)
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
@click.option(
    "--epochs", default=30, show_default=True, type=click.IntRange(1), help="Training epochs."
)
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
    default=3e-3,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Peak learning rate (linear warmup, cosine decay).",
)
@click.option(
    "--weight-decay",
    default=0.05,
    show_default=True,
    type=click.FloatRange(0),
    help="AdamW's weight decay, of the weight matrices (not biases or the query).",
)
@click.option(
    "--warmup", default=3.0, show_default=True, type=click.FloatRange(0), help="Warmup epochs."
)
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=click.IntRange(0, 2**64 - 1),
    help="Seed of the validation split, the head's initial weights and the batch order.",
)
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default=None, help=DTYPE_HELP)
@quantize_option
@q_bits_option
@click.option(
    "--extract-batch-size",
    default=8,
    show_default=True,
    type=click.IntRange(1),
    help="Images per trunk batch when extracting features.",
)
@json_option("Print the head's config as JSON on stdout.")
@progress_option
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

    from .probe import Settings, train

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
            quantize_bits=_bits(quantize, q_bits),
            extract_batch_size=extract_batch_size,
            progress=progress,
            force=force,
            log=lambda line: click.echo(line, err=True),
        )
    except (KeyboardInterrupt, SystemExit) as e:  # Ctrl-C, or SIGTERM (a SystemExit)
        stopped = INTERRUPTED if isinstance(e, KeyboardInterrupt) else e.code
        if stopped not in (INTERRUPTED, TERMINATED):
            raise
        click.echo("interrupted; extracted features stay cached, the next run resumes", err=True)
        sys.exit(stopped)
    except AimMlxError:  # its message names the path (an OutputError is an OSError too)
        raise
    except OSError as e:  # writing the feature cache or the head folder
        where = e.filename or "the feature cache (AIM_MLX_CACHE)"
        raise click.ClickException(f"{where}: {e.strerror or e}") from None
    if result is None:  # under mlx.launch, a rank other than 0: its share went to rank 0
        return
    for path, reason in result.errors:
        report_error(path, reason)
    best = result.best
    top5 = f", top-5 {best.val_top5:.1f}%" if best.val_top5 is not None else ""
    click.echo(
        f"best epoch {best.epoch}: val top-1 {best.val_top1:.1f}%{top5} "
        f"({result.train_images} training, {_count(result.val_images, 'validation image')}, "
        f"{_count(len(result.classes), 'class')}; {_count(result.extracted, 'image')} through "
        "the trunk)",
        err=True,
    )
    click.echo(f"wrote {out}", err=True)
    if as_json:
        click.echo(json.dumps(json.loads((result.out / "config.json").read_text())))


@probe.command("eval")
@click.argument("val_dir", type=click.Path(exists=True, file_okay=False))
@model_options_for("Required: the trained head's folder (made by `aim-mlx probe train`).")
@batch_size_option()
@click.option(
    "--confusion",
    type=click.Path(dir_okay=False),
    help="Write the confusion matrix as a PNG picture.",
)
@click.option("--force", is_flag=True, help="Replace an existing --confusion file.")
@json_option("Print the result as JSON on stdout.")
@progress_option
def probe_eval(
    val_dir, model, head, dtype, quantize, q_bits, batch_size, confusion, force, as_json, progress
):
    """Top-1 (top-5 with more than 5 classes) and per-class accuracy of a trained head
    (--head DIR) on VAL_DIR, one sub-folder per class."""
    from .probe.evaluate import evaluate_trained_head

    evaluation = evaluate_trained_head(
        model,
        val_dir,
        head,
        dtype=dtype,
        quantize_bits=_bits(quantize, q_bits),
        batch_size=batch_size,
        confusion=confusion,
        force=force,
        progress=progress,
    )
    _report_evaluation(evaluation, as_json, per_class=True, wrote=confusion)


if __name__ == "__main__":
    main()
