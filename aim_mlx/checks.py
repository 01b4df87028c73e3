"""Checks of values given through the Python API."""

import numbers
import os

from .errors import OptionError


def is_whole(value) -> bool:
    """An integer: Python's or numpy's (a loop over `np.arange` gives numpy's), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_path(value) -> bool:
    """A non-empty str or os.PathLike: None was a TypeError from pathlib, "" the working folder."""
    return isinstance(value, (str, os.PathLike)) and str(value) != ""


def check_path(what: str, value) -> None:
    """OptionError unless `value` is a path (`is_path`)."""
    if not is_path(value):
        raise OptionError(f"{what} must be a path, got {value!r}")
