"""A heartbeat that measures how late the event loop wakes a 1 ms sleeper (test helper)."""

from __future__ import annotations

import time
from types import TracebackType

import anyio
import anyio.abc
import anyio.lowlevel


class LoopLag:
    """``async with LoopLag() as lag:`` ticks every ``period`` s; ``lag.max_ms`` is the worst lateness."""

    def __init__(self, period: float = 0.001) -> None:
        self.period = period
        self.late: list[float] = []
        self._tg: anyio.abc.TaskGroup | None = None

    async def _beat(self) -> None:
        while True:
            due = time.perf_counter() + self.period
            await anyio.sleep(self.period)
            self.late.append(max(0.0, time.perf_counter() - due))

    async def __aenter__(self) -> LoopLag:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._beat)
        await anyio.lowlevel.checkpoint()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(et, e, tb)

    @property
    def beats(self) -> int:
        return len(self.late)

    @property
    def max_ms(self) -> float:
        return 1e3 * max(self.late, default=0.0)
