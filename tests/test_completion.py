"""wait_until: polling a foreign completion from the loop with an adaptive back-off."""

from __future__ import annotations

import time

import anyio
import anyio.lowlevel
import pytest

from aiostage._core.completion import Backoff, wait_until
from aiostage.testing import LoopLag


class LateCompletion:
    """A stand-in for a CUDA event or a ProcessGroup work: ``query()`` turns true at a deadline."""

    def __init__(self, after: float) -> None:
        self.deadline = time.perf_counter() + after
        self.queries = 0

    def query(self) -> bool:
        self.queries += 1
        return time.perf_counter() >= self.deadline


async def test_already_done_returns_after_one_poll() -> None:
    assert await wait_until(lambda: True) == 1


async def test_returns_soon_after_completion_and_keeps_the_loop_free() -> None:
    backoff = Backoff(min_interval=0.0005, max_interval=0.004)
    done = LateCompletion(0.2)
    async with LoopLag() as lag:
        polls = await wait_until(done.query, backoff)
    overshoot = time.perf_counter() - done.deadline
    assert overshoot < backoff.max_interval + 0.02
    assert polls == done.queries
    # doubling from 0.5 ms to the 4 ms cap: ~8 ramp-up polls, then one per 4 ms (about 48)
    assert 20 <= polls <= 80, polls
    assert lag.beats > 100
    assert lag.max_ms < 10


async def test_a_short_wait_costs_few_polls() -> None:
    done = LateCompletion(0.001)
    polls = await wait_until(done.query, Backoff(0.0002, 0.002))
    assert polls <= 8


async def test_timeout_is_a_scope() -> None:
    done = LateCompletion(60)
    began = time.perf_counter()
    with pytest.raises(TimeoutError):
        with anyio.fail_after(0.05):
            await wait_until(done.query)
    assert time.perf_counter() - began < 0.5


async def test_cancellation_stops_polling() -> None:
    done = LateCompletion(60)
    with anyio.move_on_after(0.02) as scope:
        await wait_until(done.query)
    assert scope.cancelled_caught
    seen = done.queries
    await anyio.sleep(0.01)
    assert done.queries == seen


@pytest.mark.parametrize(("lo", "hi"), [(0, 0.001), (0.002, 0.001), (0.001, float("inf"))])
def test_backoff_bounds_are_validated(lo: float, hi: float) -> None:
    with pytest.raises(ValueError, match="poll intervals"):
        Backoff(lo, hi)


async def test_an_announced_change_ends_the_sleep_at_once() -> None:
    """With ``woken``, setting the event wakes the poller mid-sleep: with a minute between
    polls, the change is seen within the test's deadline only through the event."""
    done, event = [False], anyio.Event()

    async def announce() -> None:
        await anyio.lowlevel.checkpoint()
        done[0] = True
        event.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(announce)
            polls = await wait_until(lambda: done[0], Backoff(60.0, 60.0), lambda: event)
    assert polls >= 2
