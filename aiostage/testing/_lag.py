"""LoopLag: measure how late the event loop wakes a sleeper while some work runs, and (on request)
sample what the loop thread was running whenever a wake-up is overdue."""

from __future__ import annotations

import functools
import math
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from types import FrameType, TracebackType

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread

from .._core.completion import wait_until

__all__ = ["LoopLag", "Stalls"]

#: the loop thread's innermost frame is one of these: it is waiting to be woken (epoll), so a
#: late wake-up there is the GIL or the CPU held elsewhere, not work of the loop
_IDLE = frozenset({"select", "poll", "epoll"})


def _where(frame: FrameType | None) -> str:
    """``file.py:function:line`` of ``frame``, the path shortened to its last two parts."""
    if frame is None:
        return "?"
    code = frame.f_code
    parts = code.co_filename.replace("\\", "/").rsplit("/", 2)
    return f"{'/'.join(parts[-2:])}:{code.co_name}:{frame.f_lineno}"


def _owner(frame: FrameType | None) -> str:
    """The innermost frame of aiostage's own code (not its tests' helpers) on the stack, or
    ``"-"`` when the loop runs none."""
    while frame is not None:
        name = frame.f_code.co_filename.replace("\\", "/")
        if "/aiostage/" in name and "/aiostage/testing/" not in name:
            return _where(frame)
        frame = frame.f_back
    return "-"


@dataclass
class Stalls:
    """Samples of the loop thread's stack taken while a heartbeat was overdue.

    ``loop``: where the loop thread was (its innermost frame; ``idle: ...`` when it was waiting
    in the selector, i.e. late because another thread held the GIL or the CPU); ``owners``: the
    innermost aiostage frame on the loop thread's stack; ``others``: the innermost frame of every
    other thread at the same instants (who may have held the GIL).
    """

    samples: int = 0
    loop: Counter[str] = field(default_factory=Counter)
    owners: Counter[str] = field(default_factory=Counter)
    others: Counter[str] = field(default_factory=Counter)

    def take(self, loop_thread: int, watcher: int) -> None:
        """Sample every thread's innermost frame now (the watchdog thread)."""
        frames = sys._current_frames()
        frame = frames.get(loop_thread)
        if frame is None:
            return
        self.samples += 1
        where = _where(frame)
        self.loop[f"idle: {where}" if frame.f_code.co_name in _IDLE else where] += 1
        self.owners[_owner(frame)] += 1
        for ident, other in frames.items():
            if ident not in (loop_thread, watcher):
                self.others[_where(other)] += 1

    def table(self, top: int = 8) -> list[tuple[str, str, int, float]]:
        """``(kind, where, samples, share)`` rows, most sampled first, for a report."""
        rows: list[tuple[str, str, int, float]] = []
        for kind, counts in (
            ("loop", self.loop),
            ("aiostage", self.owners),
            ("other", self.others),
        ):
            rows += [
                (kind, where, n, n / max(self.samples, 1)) for where, n in counts.most_common(top)
            ]
        return rows


class LoopLag:
    """``async with LoopLag() as lag: await work()``, then assert on ``lag.max_ms``.

    A task sleeps ``interval`` seconds in a loop and records how late each wake-up was; work that
    blocks the loop thread shows up as lateness of about its blocking time. ``stalls`` (seconds):
    also run a watchdog thread that samples the loop thread's stack (``sys._current_frames``)
    every ``interval / 2`` while a wake-up is more than ``stalls`` overdue, into ``lag.stalls``
    (it costs the loop a little: use it to find a stall, not to measure one). Blocks on nothing.
    """

    def __init__(self, interval: float = 0.001, *, stalls: float | None = None) -> None:
        self.interval = interval
        self.at: list[float] = []  # seconds since entry, of each wake-up
        self.lateness: list[float] = []  # seconds each wake-up came after it was due
        self.stalls = Stalls()
        self._stall_after = stalls
        self._tg: anyio.abc.TaskGroup | None = None
        self._stop = anyio.Event()
        self._halt = threading.Event()
        self._watching = threading.Event()
        self._began = 0.0
        self._due = math.inf
        self._loop_thread = 0

    async def __aenter__(self) -> LoopLag:
        self._began = time.perf_counter()
        self._loop_thread = threading.get_ident()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._beat)
        if self._stall_after is not None:
            self._tg.start_soon(functools.partial(anyio.to_thread.run_sync, self._watch))
            await wait_until(self._watching.is_set)  # sampling from the work's first instant
        await anyio.lowlevel.checkpoint()  # the heartbeat sleeps before the measured work starts
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._tg is not None
        self._stop.set()  # its last beat still counts: a blocked loop delays it
        if e is not None:
            self._halt.set()
        await self._tg.__aexit__(et, e, tb)

    async def _beat(self) -> None:
        try:
            while not self._stop.is_set():
                due = self._due = time.perf_counter() + self.interval
                await anyio.sleep(self.interval)
                now = time.perf_counter()
                self.at.append(now - self._began)
                self.lateness.append(max(0.0, now - due))
        finally:
            self._halt.set()  # the watchdog ends with the heartbeat, whatever ended it

    def _watch(self) -> None:
        """Sample the loop thread while its heartbeat is overdue (a worker thread)."""
        assert self._stall_after is not None
        watcher = threading.get_ident()
        self._watching.set()
        while not self._halt.wait(self.interval / 2):
            if time.perf_counter() - self._due > self._stall_after:
                self.stalls.take(self._loop_thread, watcher)

    @property
    def beats(self) -> int:
        """How many wake-ups were recorded."""
        return len(self.lateness)

    @property
    def max_ms(self) -> float:
        """The largest lateness, in ms."""
        return 1e3 * max(self.lateness, default=0.0)

    @property
    def p99_ms(self) -> float:
        """The 99th percentile lateness (nearest rank), in ms."""
        if not self.lateness:
            return 0.0
        ordered = sorted(self.lateness)
        return 1e3 * ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]

    def trace(self) -> list[list[float]]:
        """``[[ms since entry, lateness ms], ...]``: the lateness over time, for a timeline."""
        return [
            [round(1e3 * a, 3), round(1e3 * b, 3)]
            for a, b in zip(self.at, self.lateness, strict=True)
        ]
