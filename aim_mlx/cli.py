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


if __name__ == "__main__":
    main()
