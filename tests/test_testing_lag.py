"""``LoopLag``: the heartbeat's lateness, and the stall samples of ``stalls=``."""

from __future__ import annotations

import time

import anyio
import anyio.to_thread

from aiostage.testing import LoopLag


def _spin_until(done: float) -> None:
    while time.perf_counter() < done:
        pass


def _blocks_the_loop(lag: LoopLag) -> None:
    """Busy on the loop thread until the watchdog has sampled it (5 s at most)."""
    give_up = time.perf_counter() + 5
    while lag.stalls.samples == 0 and time.perf_counter() < give_up:
        _spin_until(time.perf_counter() + 0.005)


async def test_stall_samples_name_what_blocked_the_loop() -> None:
    async with LoopLag(stalls=0.002) as lag:
        _blocks_the_loop(lag)
    assert lag.stalls.samples > 0
    where = lag.stalls.loop.most_common(1)[0][0]
    assert "test_testing_lag.py:_spin_until" in where or "_blocks_the_loop" in where, lag.stalls
    assert lag.max_ms > 2


async def test_a_loop_waiting_for_another_thread_is_sampled_as_idle() -> None:
    async with LoopLag(stalls=0.002) as lag:
        await anyio.to_thread.run_sync(_spin_until, time.perf_counter() + 0.2)
    idle = sum(n for where, n in lag.stalls.loop.items() if where.startswith("idle: "))
    assert idle == sum(lag.stalls.loop.values()), lag.stalls.loop
    assert any("_spin_until" in w for w in lag.stalls.others) or lag.stalls.samples == 0


async def test_without_stalls_no_watchdog_runs() -> None:
    async with LoopLag() as lag:
        _spin_until(time.perf_counter() + 0.01)
    assert lag.stalls.samples == 0
    assert lag.beats >= 1
