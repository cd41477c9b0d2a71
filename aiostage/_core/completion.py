"""Awaiting foreign completions from the event loop without blocking it.

A CUDA event, a ProcessGroup work or a worker thread finishes on its own; the loop learns of it by
polling a ``query()`` with an adaptive back-off (yield first, then sleep ``min_interval`` doubling up
to ``max_interval``), so a short wait costs almost nothing and a long one a few wake-ups per
``max_interval``. Nothing here ever calls a blocking wait on the loop thread.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import anyio

__all__ = []


@dataclass(frozen=True, slots=True)
class Backoff:
    """Poll intervals in seconds: the first sleep after one bare yield, and the cap."""

    min_interval: float = 0.0002
    max_interval: float = 0.002

    def __post_init__(self) -> None:
        if not 0 < self.min_interval <= self.max_interval or not math.isfinite(self.max_interval):
            raise ValueError(
                f"poll intervals need 0 < min_interval <= max_interval < inf, got "
                f"{self.min_interval} and {self.max_interval}"
            )


async def wait_until(
    done: Callable[[], bool],
    backoff: Backoff = Backoff(),
    woken: Callable[[], anyio.Event] | None = None,
) -> int:
    """Return once ``done()`` is true, polling it from the loop; return how many polls it took.
    ``woken()``: an event whose setting ends the current sleep at once (a poll follows), for a
    condition some of whose changes are announced and others not.

    Bound it with ``anyio.fail_after``. Cancellation takes effect at the next poll; the foreign
    work itself is not stopped by it.
    """
    polls = 1
    if done():
        await anyio.lowlevel.checkpoint()
        return polls
    delay = 0.0
    while True:
        if woken is None:
            await anyio.sleep(delay)
        else:
            with anyio.move_on_after(delay):
                await woken().wait()
        polls += 1
        if done():
            return polls
        delay = backoff.min_interval if delay == 0 else min(2 * delay, backoff.max_interval)
