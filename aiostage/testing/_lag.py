"""LoopLag: measure how late the event loop wakes a sleeper while some work runs."""

from __future__ import annotations

import math
import time
from types import TracebackType

import anyio
import anyio.abc
import anyio.lowlevel


class LoopLag:
    """``async with LoopLag() as lag: await work()``, then assert on ``lag.max_ms``.

    A task sleeps ``interval`` seconds in a loop and records how late each wake-up was; work that
    blocks the loop thread shows up as lateness of about its blocking time. Blocks on nothing.
    """

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.at: list[float] = []  # seconds since entry, of each wake-up
        self.lateness: list[float] = []  # seconds each wake-up came after it was due
        self._tg: anyio.abc.TaskGroup | None = None
        self._stop = anyio.Event()
        self._began = 0.0

    async def __aenter__(self) -> LoopLag:
        self._began = time.perf_counter()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._beat)
        await anyio.lowlevel.checkpoint()  # the heartbeat sleeps before the measured work starts
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._tg is not None
        self._stop.set()  # its last beat still counts: a blocked loop delays it
        await self._tg.__aexit__(et, e, tb)

    async def _beat(self) -> None:
        while not self._stop.is_set():
            due = time.perf_counter() + self.interval
            await anyio.sleep(self.interval)
            now = time.perf_counter()
            self.at.append(now - self._began)
            self.lateness.append(max(0.0, now - due))

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
