"""wait_until: polling a foreign completion from the loop with an adaptive back-off."""

from __future__ import annotations

import time

import anyio
import anyio.lowlevel
import pytest
from _loopwork import LoopWork

from aiostage._core.completion import Backoff, wait_until


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
    """Polls back off to the cap and stop at the first true ``query()``; between polls the loop's
    thread is free (what it runs per iteration, not a heartbeat's wall-clock lag, which a loaded
    machine stretches whatever runs)."""
    backoff = Backoff(min_interval=0.0005, max_interval=0.004)
    done = LateCompletion(0.2)
    async with LoopWork() as work:
        polls = await wait_until(done.query, backoff)
    assert time.perf_counter() >= done.deadline
    assert polls == done.queries
    # doubling from 0.5 ms to the 4 ms cap: ~8 ramp-up polls, then one per 4 ms (about 48 in
    # all; fewer when sleeps overrun on a loaded machine, never more)
    assert 2 <= polls <= 80, polls
    assert work.iterations >= polls
    assert work.max_cpu < 0.005, f"{work.max_cpu * 1e3:.1f} ms of CPU in one loop iteration"


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
