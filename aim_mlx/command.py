"""The `aim-mlx` console script: a module cheap to import (the package's `__init__` runs first,
and stops the same way), so that Ctrl-C while the command line loads (MLX, NumPy, click: a
fraction of a second) exits as an interrupted command does, 130 and one line, not a traceback."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

INTERRUPTED = 130  # 128 + SIGINT, the shell's convention


def is_command() -> bool:
    """Whether this process is the `aim-mlx` command or `python -m aim_mlx` (rather than Python
    importing aim_mlx)."""
    argv = getattr(sys, "argv", None) or [""]
    if os.path.basename(argv[0]) == "aim-mlx":
        return True
    orig = getattr(sys, "orig_argv", [])  # python [options] -m aim_mlx [argv[1:]]
    start = len(orig) - len(argv)
    return start > 0 and orig[start - 1 : start + 1] == ["-m", "aim_mlx"]


@contextmanager
def interruptible():
    """Ctrl-C in the block ends the command as the commands end on it (cli._reported): a line
    `interrupted` and exit status 130. Only in the command: a library's user gets their
    KeyboardInterrupt."""
    try:
        yield
    except KeyboardInterrupt:
        if not is_command():
            raise
        if sys.stderr is not None:
            sys.stderr.write("\ninterrupted\n")
        sys.exit(INTERRUPTED)


def main():
    with interruptible():
        from .cli import main as command
    return command()
