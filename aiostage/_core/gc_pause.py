"""Keep the collector and big frees from stopping every thread: pause automatic garbage
collection while a worker thread builds many short-lived objects, and free large containers
a slice at a time.

Planning a state dict of thousands of tensors allocates enough objects to trigger full
collections, each of which walks the whole heap (~100 ms with torch loaded) and stops every
thread. ``paused()`` turns collection off for the duration and back on after (if it was on);
nested and concurrent uses share one pause. ``save`` and ``load`` hold one for their whole run,
so that their per-tensor objects are freed before any collection could walk them (walking
tens of thousands of them is tens of ms with the GIL held, and promotes them towards full
collections). A pause runs out after ``MAX_PAUSE`` seconds, so the program's own cyclic garbage
is collected however long or back to back the saves: the clock is read where pauses begin and
end and at every ``hand_over`` (a worker's, every millisecond or so of its work), with no thread
of its own (one per pause would outlive it and cost a thread start per staging). A pause that
runs out ends as before: one collection walks what is alive then. Freeing a list of tens of thousands of tensors or
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
_resume = False  # collection was on when the outermost pause began, and is off still
_since = 0.0  # when the outermost pause began (``_now``)
_now = time.monotonic


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """No automatic collection inside the block (reference counting still frees memory), until
    ``MAX_PAUSE`` seconds after the start of the outermost pause."""
    global _depth, _resume, _since
    with _lock:
        if _depth == 0:
            _resume = gc.isenabled()
            gc.disable()
            _since = _now()
        _depth += 1
    _run_out_if_due()  # a nested pause in one past its time
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                if _resume and not gc.isenabled():
                    gc.enable()
                _resume = False
    _run_out_if_due()  # an enclosing pause may be over its time


def _run_out_if_due() -> None:
    """Collection on again if the pause has lasted ``MAX_PAUSE``: until the outermost pause
    ends, later nested pauses do not turn it off (one clock read when nothing is due)."""
    global _resume
    if _resume and _now() - _since >= MAX_PAUSE:
        with _lock:
            if _depth and _resume:
                _resume = False  # the end of the pause has nothing left to turn on
                gc.enable()


def hand_over() -> None:
    """Let a thread waiting for the GIL (an event loop) take it: the call a worker makes every
    millisecond or so of Python work. Nothing on an event loop's own thread (a small header
    decoded there), which has no one to hand over to and must not sleep. Either way, a pause
    past ``MAX_PAUSE`` runs out here."""
    _run_out_if_due()
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
