"""Keep the collector and big frees from stopping every thread: pause automatic garbage
collection while a worker thread builds many short-lived objects, and free large containers
a slice at a time.

Planning a state dict of thousands of tensors allocates enough objects to trigger full
collections, each of which walks the whole heap (~100 ms with torch loaded) and stops every
thread. ``paused()`` turns collection off for the duration and back on after (if it was on);
nested and concurrent uses share one pause. ``save`` and ``load`` hold one for their whole run,
so that their per-tensor objects are freed before any collection could walk them (walking
tens of thousands of them is tens of ms with the GIL held, and promotes them towards full
collections). A pause never lasts longer than ``MAX_PAUSE`` seconds: the program's own cyclic
garbage is collected at least that often, however long or back to back the saves (a pause
that runs out ends as before: one collection walks what is alive then). Freeing a list of tens of thousands of tensors or
records is one C call of milliseconds that holds the GIL; ``dismantle`` frees them in slices.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["MAX_PAUSE", "dismantle", "hand_over", "paused"]

#: the longest a pause keeps automatic collection off, in seconds
MAX_PAUSE = 10.0

#: members freed between two hand-overs of the GIL (well under a millisecond)
_PIECE = 1024

_lock = threading.Lock()
_depth = 0
_resume = False
_timer: threading.Timer | None = None  # ends the pause at ``MAX_PAUSE``


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """No automatic collection inside the block (reference counting still frees memory), for
    at most ``MAX_PAUSE`` seconds from the start of the outermost pause."""
    global _depth, _resume, _timer
    with _lock:
        if _depth == 0:
            _resume = gc.isenabled()
            gc.disable()
            if _resume:
                _timer = threading.Timer(MAX_PAUSE, _run_out)
                _timer.daemon = True
                _timer.start()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                if _timer is not None:
                    _timer.cancel()
                    _timer = None
                if _resume and not gc.isenabled():
                    gc.enable()
                _resume = False


def _run_out() -> None:
    """``MAX_PAUSE`` is over: collection on again until the last pause ends (the timer's
    thread; a later pause nested in this one does not turn it off)."""
    global _resume
    with _lock:
        if _depth and _resume:
            _resume = False  # the end of the pause has nothing left to turn on
            gc.enable()


def hand_over() -> None:
    """Let a thread waiting for the GIL (an event loop) take it: the call a worker makes every
    millisecond or so of Python work. Nothing on an event loop's own thread (a small header
    decoded there), which has no one to hand over to and must not sleep."""
    if asyncio._get_running_loop() is None:
        time.sleep(0)


def dismantle(doomed: list[Any]) -> None:
    """Free what ``doomed`` holds (the caller's last references; a worker thread), a slice of
    ``_PIECE`` members at a time with the GIL handed over between slices. A list, tuple or dict
    of more members than that (or a small one wrapping one, like ``{"dict": [...]}``) is taken
    apart if nothing else refers to it; anything else is freed whole. ``doomed`` ends empty."""
    while doomed:
        x = doomed.pop()
        if not _big(x, 3) or sys.getrefcount(x) > 2:  # ``x`` and the call's argument
            continue
        items = list(x.values()) if type(x) is dict else list(x)
        if type(x) is not tuple:
            x.clear()
        x = None  # the container alone goes: ``items`` holds its members
        while items:
            piece = items[-_PIECE:]
            del items[-_PIECE:]
            doomed += [p for p in piece if _big(p, 3)]
            del piece
            hand_over()


def _big(x: Any, depth: int) -> bool:
    """Whether ``x`` is a list, tuple or dict of more than ``_PIECE`` members, or wraps one in
    up to ``depth`` levels of containers of at most two members."""
    kind = type(x)
    if kind is not list and kind is not tuple and kind is not dict:
        return False
    if len(x) > _PIECE:
        return True
    if depth == 0 or len(x) > 2:
        return False
    return any(_big(k, depth - 1) for k in (x.values() if kind is dict else x))
