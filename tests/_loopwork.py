"""What the event loop's thread itself does per loop iteration: Python calls and CPU seconds.

A heartbeat's lag (``aiostage.testing.LoopLag``) is wall-clock time, which a loaded machine
stretches whatever aiostage does. Counting instead what runs on the loop's thread between two
iterations tells whether aiostage put per-tensor work or a copy there: per-leaf Python shows as
thousands of calls in one iteration, a copy as CPU seconds of that thread (``thread_time``
counts only the time the thread ran, not the time it waited for a CPU).
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field
from types import FrameType, TracebackType
from typing import Any


@dataclass
class LoopWork:
    """``async with LoopWork() as work:`` then ``work.max_calls`` and ``work.max_cpu``: the most
    Python and C calls, and the most CPU seconds of the loop's thread, in one loop iteration."""

    max_calls: int = 0
    max_cpu: float = 0.0
    iterations: int = 0
    _calls: int = field(default=0, repr=False)
    _began: float | None = field(default=None, repr=False)
    _before: Any = field(default=None, repr=False)

    def _profile(self, frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_name == "_run_once":
            self._end_iteration()
            self._began = time.thread_time()
        elif event in ("call", "c_call"):
            self._calls += 1

    def _end_iteration(self) -> None:
        if self._began is not None:
            self.iterations += 1
            self.max_calls = max(self.max_calls, self._calls)
            self.max_cpu = max(self.max_cpu, time.thread_time() - self._began)
        self._calls = 0
        self._began = None

    async def __aenter__(self) -> LoopWork:
        asyncio.get_running_loop()  # the loop's own thread only
        self._before = sys.getprofile()
        sys.setprofile(self._profile)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        sys.setprofile(self._before)
        self._end_iteration()
