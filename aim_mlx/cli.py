"""The `aim-mlx` command line: parse options, call the library, print."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click

from . import __version__
from .convert import coreml


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


def _load_model(ref: str):
    """A converted model folder, loaded lazily."""
    from . import load
    from .loader import ModelLoadError

    if not Path(ref).is_dir():
        raise click.ClickException(
            f"{ref}: not a model folder; convert the checkpoints first (aim-mlx convert --out "
            "FOLDER ...) and pass --model FOLDER"
        )
    try:
        return load(ref)
    except ModelLoadError as e:
        raise click.ClickException(str(e)) from None


@main.group()
def export():
    """Export a model to another format."""


@export.command("coreml")
@click.option(
    "--model", "model_ref", required=True, help="Official name (aim-600M...) or model folder."
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output .mlpackage.")
@click.option(
    "--precision",
    type=click.Choice(coreml.PRECISIONS),
    default="float16",
    show_default=True,
    help="mixed: float32 layer norms, attention, residual stream.",
)
@click.option(
    "--compress",
    type=click.Choice(coreml.COMPRESSIONS),
    default="none",
    show_default=True,
    help="Weight compression.",
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
@click.option("--force", is_flag=True, help="Replace an existing package.")
def export_coreml(model_ref, out, precision, compress, img_size, target, features, force):
    """Write a Core ML .mlpackage (an Xcode-ready image classifier by default)."""
    try:
        coreml.require_coremltools()
        name, source = coreml.describe_model_ref(model_ref)
        path = coreml.export_coreml(
            _load_model(model_ref),
            out,
            precision=precision,
            compress=compress,
            img_size=img_size,
            target=target,
            features=features,
            name=name,
            source=source,
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


if __name__ == "__main__":
    main()
