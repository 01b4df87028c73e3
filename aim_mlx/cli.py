"""The `aim-mlx` command line: parse options, call the library, print."""

from __future__ import annotations

import signal
import sys

import click

from . import __version__


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
    type=click.Choice(["float32", "float16", "bfloat16"]),
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
    bad = [v for v in items if v not in ("float32", "float16", "bfloat16")]
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
    """Versions, device and the BLAS that MLX's CPU matmuls use."""
    from . import bench as lib

    for key, value in lib.environment().items():
        click.echo(f"{key}: {value}")


if __name__ == "__main__":
    main()
