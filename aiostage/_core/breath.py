"""Hand the GIL over by the clock: a worker's long Python work calls ``breathe()`` between small
steps, and it hands over (``gc_pause.hand_over``) once ``GAP`` has passed since the thread last
did.

A hand-over costs tens of microseconds (the sleep lets a waiting event loop take the GIL and the
CPU), so handing over after a fixed count of items either wastes that on cheap items or holds
the GIL for milliseconds on dear ones. By the clock, the loop waits at most about ``GAP`` plus
one step, whatever the steps cost, and cheap steps pay only a clock read.
"""

from __future__ import annotations

import threading
import time

from . import gc_pause

__all__ = ["GAP", "breathe", "rested"]

#: the longest a worker holds the GIL between two hand-overs, in seconds (plus one step)
GAP = 0.0003

_local = threading.local()


def breathe() -> None:
    """Hand the GIL over if ``GAP`` has passed since this thread last handed it over here (the
    first call of a thread, or one after an idle spell, hands over too)."""
    now = time.perf_counter()
    if now >= getattr(_local, "due", 0.0):
        gc_pause.hand_over()
        _local.due = time.perf_counter() + GAP


def rested() -> None:
    """Start this thread's clock now: a worker that has just taken the GIL (a new job) need not
    hand it over at its first ``breathe``."""
    _local.due = time.perf_counter() + GAP
