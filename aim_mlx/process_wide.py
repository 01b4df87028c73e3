"""A change to process-wide state that threads share."""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import contextmanager


class ProcessWide:
    """A change to process-wide state (warning filters, huggingface_hub's bars) kept while any
    thread is inside a `held()` block: `make()` when the first block opens, `undo(what make
    returned)` when the last one ends. One `with` per thread, each undoing its own change,
    would undo it under another thread's block, or restore old state out of order for good."""

    def __init__(self, make: Callable[[], object], undo: Callable[[object], None]):
        self._make, self._undo = make, undo
        self._lock = threading.Lock()
        self._blocks, self._made = 0, None

    @contextmanager
    def held(self):
        with self._lock:
            if not self._blocks:
                self._made = self._make()
            self._blocks += 1
        try:
            yield
        finally:
            with self._lock:
                self._blocks -= 1
                if not self._blocks:
                    self._undo(self._made)
