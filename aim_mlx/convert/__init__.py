"""Checkpoint reading and conversion to MLX."""

from .checkpoint import CheckpointError, UnsafePickleError, open_checkpoint
from .converter import FORMAT_VERSION, ConversionError, convert, parse_probe_layers

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "ConversionError",
    "UnsafePickleError",
    "convert",
    "open_checkpoint",
    "parse_probe_layers",
]
