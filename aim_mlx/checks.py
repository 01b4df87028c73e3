"""Checks of values given through the Python API."""

import numbers


def is_whole(value) -> bool:
    """An integer: Python's or numpy's (a loop over `np.arange` gives numpy's), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
