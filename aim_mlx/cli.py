"""The `aim-mlx` command line: parse options, call the library, print."""

from __future__ import annotations

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="aim-mlx")
def main():
    """Apple's AIM v1 vision models in pure MLX."""


if __name__ == "__main__":
    main()
