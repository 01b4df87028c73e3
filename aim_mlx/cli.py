"""The `aim-mlx` command line: parse options, call the library, print."""

from __future__ import annotations

from pathlib import Path

import click

from . import __version__
from .convert import coreml


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="aim-mlx")
def main():
    """Apple's AIM v1 vision models in pure MLX."""


def _load_model(ref: str):
    try:
        from . import load
    except ImportError:
        raise click.ClickException("this build cannot load models yet (aim_mlx.load)") from None
    return load(ref)


@main.group()
def export():
    """Export a model to another format."""


@export.command("coreml")
@click.option("--model", "model_ref", required=True, help="Official name (aim-600M...) or model folder.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output .mlpackage.")
@click.option("--precision", type=click.Choice(coreml.PRECISIONS), default="float16",
              show_default=True, help="mixed: float32 layer norms, attention, residual stream.")
@click.option("--compress", type=click.Choice(coreml.COMPRESSIONS), default="none",
              show_default=True, help="Weight compression.")
@click.option("--img-size", type=int, default=None, help="Input size [default: the model's].")
@click.option("--target", type=click.Choice(coreml.TARGETS), default="iOS17", show_default=True,
              help="iOS18 uses the fused scaled_dot_product_attention op.")
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
