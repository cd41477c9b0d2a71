"""aiostage.testing.run_world / arun_world: results, remote errors, hangs, deaths, no leftovers."""

from __future__ import annotations

import sys
import time
import types
from collections.abc import Iterator

import _world_workers as workers
import anyio
import psutil
import pytest

from aiostage.testing import WorldError, WorldTimeout, arun_world, run_world

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(90)]


def _leftover_children() -> list[psutil.Process]:
    """Children of this process, zombies included, minus the daemons that outlive a test by
    design: multiprocessing's resource tracker and torch's shared-memory manager (started by the
    first tensor put in shared memory, e.g. by the channel's shared-memory tests)."""
    leftovers = []
    for child in psutil.Process().children(recursive=True):
        try:
            if any(
                d in " ".join(child.cmdline()) for d in ("resource_tracker", "torch_shm_manager")
            ):
                continue
        except psutil.ZombieProcess:
            pass  # an unreaped rank is a leftover too
        except psutil.NoSuchProcess:
            continue
        leftovers.append(child)
    return leftovers


@pytest.fixture(autouse=True)
def no_leftover_children() -> Iterator[None]:
    """Every test must leave no rank process behind, running or zombie."""
    yield
    assert _leftover_children() == []


def test_results_come_back_per_rank() -> None:
    results = run_world(workers.identify, 2, "tag")
    assert results == [(0, 2, 0, 2, "tag", 3.0), (1, 2, 1, 2, "tag", 3.0)]


def test_async_rank_function_runs_under_asyncio() -> None:
    assert run_world(workers.identify_async, 2) == [(0, "gloo", 2.0), (1, "gloo", 2.0)]


async def test_arun_world_does_not_block_the_loop() -> None:
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await anyio.sleep(0.05)
            ticks += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(tick)
        results = await arun_world(workers.identify, 2, "async")
        tg.cancel_scope.cancel()
    assert [r[0] for r in results] == [0, 1]
    assert ticks >= 10  # a world takes seconds; the loop kept running all along


def test_exception_in_rank_one_names_rank_one() -> None:
    with pytest.raises(WorldError) as info:
        run_world(workers.raise_on_rank_one, 2)
    err = info.value
    assert not isinstance(err, WorldTimeout)
    assert err.rank == 1
    assert str(err).startswith("rank 1 of 2 raised ValueError: boom from rank 1")
    remote = err.failures[0].traceback
    assert remote is not None
    assert 'raise ValueError("boom from rank 1")' in remote
    assert "_world_workers.py" in remote


def test_ranks_still_running_after_a_failure_are_killed_soon() -> None:
    began = time.monotonic()
    with pytest.raises(WorldError) as info:
        run_world(workers.raise_on_one_while_zero_sleeps, 2, timeout=60)
    assert time.monotonic() - began < 30  # the grace after a failure, not the 60 s timeout
    err = info.value
    assert not isinstance(err, WorldTimeout)
    assert err.ranks == (1,)
    assert "rank 1 of 2 raised KeyError: 'missing from rank 1'" in str(err)
    assert "SIGKILLed rank(s) 0, still running" in str(err)


def test_hanging_rank_times_out_and_is_killed() -> None:
    timeout = 15.0  # spawn and set-up count too: room for rank 0 to finish on a loaded box
    began = time.monotonic()
    with pytest.raises(WorldTimeout) as info:
        run_world(workers.hang_on_rank_one, 2, timeout=timeout)
    assert time.monotonic() - began < timeout + 5
    err = info.value
    assert isinstance(err, TimeoutError)
    assert err.ranks == (1,)
    assert err.timeout == timeout
    assert err.failures[0].signal == "SIGKILL"
    assert "rank 1 of 2 was still running without returning a result" in str(err)
    assert _leftover_children() == []


def test_rank_killed_by_a_signal_is_named_with_its_signal() -> None:
    with pytest.raises(WorldError) as info:
        run_world(workers.sigkill_rank_one, 2)
    err = info.value
    assert not isinstance(err, WorldTimeout)
    assert err.rank == 1
    assert err.failures[0].signal == "SIGKILL"
    assert err.failures[0].exitcode == -9
    assert str(err).startswith("rank 1 of 2 was killed by signal SIGKILL before returning")


def test_rank_exiting_without_a_result_is_named_with_its_exit_code() -> None:
    with pytest.raises(WorldError) as info:
        run_world(workers.exit_quietly, 2)
    assert info.value.ranks == (0,)
    assert info.value.failures[0].exitcode == 3
    assert info.value.failures[0].signal is None
    assert "rank 0 of 2 exited with code 3 before returning a result" in str(info.value)


def test_unpicklable_result_is_reported() -> None:
    with pytest.raises(WorldError, match="returned a result that cannot be pickled"):
        run_world(workers.unpicklable_result, 2)


def test_local_function_is_refused_before_spawning() -> None:
    def local(rank: int, world_size: int) -> int:
        return rank

    with pytest.raises(TypeError, match="top-level function"):
        run_world(local, 2)


def test_function_the_ranks_cannot_import_is_reported() -> None:
    ghost = types.ModuleType("_ghost_workers")  # importable here, absent in a fresh process
    exec("def fn(rank, world_size):\n    return rank\n", ghost.__dict__)
    sys.modules[ghost.__name__] = ghost
    try:
        with pytest.raises(WorldError, match="cannot import the function") as info:
            run_world(ghost.fn, 2)
    finally:
        del sys.modules[ghost.__name__]
    assert "No module named '_ghost_workers'" in str(info.value)


@pytest.mark.parametrize(("size", "timeout"), [(0, 1.0), (2, 0.0), (2, -1.0)])
def test_bad_arguments(size: int, timeout: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        run_world(workers.identify, size, "x", timeout=timeout)


async def test_cancelling_arun_world_kills_the_ranks() -> None:
    began = time.monotonic()
    with anyio.move_on_after(6) as scope:
        await arun_world(workers.hang_on_rank_one, 2, timeout=60)
    assert scope.cancelled_caught
    assert time.monotonic() - began < 6 + 3
    assert _leftover_children() == []
