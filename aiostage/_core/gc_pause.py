"""Pause automatic garbage collection while a worker thread builds many short-lived objects.

Planning a state dict of thousands of tensors allocates enough objects to trigger full
collections, each of which walks the whole heap (~100 ms with torch loaded) and stops every
thread. ``paused()`` turns collection off for the duration and back on after (if it was on);
nested and concurrent uses share one pause.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

__all__ = ["paused"]

_lock = threading.Lock()
_depth = 0
_resume = False


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """No automatic collection inside the block (reference counting still frees memory)."""
    global _depth, _resume
    with _lock:
        if _depth == 0:
            _resume = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _resume and not gc.isenabled():
                gc.enable()
