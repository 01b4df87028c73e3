"""aim-mlx: Apple's AIM v1 vision models in pure MLX."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("aim-mlx")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"


def load(path):
    """Load a converted aim-mlx model folder; returns `aim_mlx.models.AIM` in eval mode."""
    from .loader import load_model

    return load_model(path)
