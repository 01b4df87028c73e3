"""aim-mlx: Apple's AIM v1 vision models in pure MLX."""

# First, before anything imports mlx.core: a bounded GPU command buffer (runtime.py) and an
# optimized BLAS for MLX on the Linux CPU (blas.py).
import os
import sys

from .command import interruptible, is_command

with interruptible():  # Ctrl-C while `aim-mlx` starts: exit 130, no traceback (command.py)
    from . import blas, runtime

    try:
        runtime.check_backend()
    except ImportError as e:
        if is_command():  # one line, not a traceback
            sys.exit(f"Error: {str(e).removeprefix('aim-mlx: ')}")
        raise
    runtime.setup()
    blas.setup()

    from importlib.metadata import PackageNotFoundError, version

    try:
        __version__ = version("aim-mlx")
    except PackageNotFoundError:  # running from a source tree that is not installed
        __version__ = "0.0.0+local"


def load(model, head=None, dtype=None, **kwargs):
    """An AIM model (`aim_mlx.models.AIM`, eval mode) from a model name such as "aim-600M"
    (downloaded and converted into the cache on first use), a converted folder, or a folder of
    PyTorch checkpoints. `head`: "best", "last", or a trained head's folder (`aim-mlx probe
    train`); None takes a converted folder's own head, else best. See `aim_mlx.resolve.resolve`
    for the options. An AIM_MLX_* setting it does not take is a SettingError, before any work."""
    from .resolve import load as load_resolved

    runtime.check_settings()
    return load_resolved(model, head, dtype, **kwargs)


def preprocess(image, size=224):
    """An image path, a PIL image or a uint8 numpy array (H, W, 3) RGB or (H, W) grey ->
    float32 array (3, size, size), the evaluation transform; `size` a multiple of 14."""
    from .transforms import ImageError
    from .transforms import preprocess as run

    try:
        return run(image, size)
    except ImageError as e:
        if isinstance(image, (str, os.PathLike)):  # which file: the CLI names it on its row
            raise ImageError(f"{image}: {e}") from None
        raise


def classify(model, inputs, **kwargs):
    """Top-k classes (ImageNet's, or a trained head's) for image files and folders, one row
    per image as `aim-mlx classify --json` prints it; see `aim_mlx.classifier.classify`."""
    from .classifier import classify as run

    return run(model, inputs, **kwargs)
