"""Every background task has an owner: nothing is left running after a public object closes.

For each public object that starts work (``DefaultStager``, ``Checkpointer``, the ``async_save``
handle's task group, ``ReplicationStager`` in a world of one, ``WeightPublisher`` in a gloo world
of one), compare what runs before it is opened and after it is closed (``aclose()`` or leaving
``async with``): no new asyncio task, no new thread, and no anyio worker thread still busy.

What counts as left running is ``tests/_leftovers.py``'s. ``WeightSubscriber`` and a
``ReplicationStager`` that really exchanges need a peer rank: they are checked in a spawned
world (``tests/distributed/test_channel.py::test_nothing_outlives_a_subscriber_or_a_stager``).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
import torch.distributed as dist
from _leftovers import Running, nothing_left, settled_executor

import aiostage
from aiostage._core.completion import wait_until


def state(seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(1 << 12, generator=g), "b": torch.randn(7, generator=g), "n": seed}


async def test_the_check_sees_a_leaked_task_thread_and_busy_worker() -> None:
    before = Running.now()
    go = threading.Event()
    task = asyncio.get_running_loop().create_task(asyncio.sleep(30), name="leaked")
    thread = threading.Thread(target=go.wait, name="leaked-thread")
    thread.start()
    started = threading.Event()

    def work() -> None:
        started.set()
        go.wait()

    async with anyio.create_task_group() as tg:  # a worker abandoned while busy
        tg.start_soon(lambda: anyio.to_thread.run_sync(work, abandon_on_cancel=True))
        await wait_until(started.is_set)
        tg.cancel_scope.cancel()
    pending = asyncio.get_running_loop().run_in_executor(None, go.wait)  # never awaited
    await settled_executor(before)
    try:
        left = Running.now().since(before)
        assert any("task leaked" in x for x in left), left
        assert "thread leaked-thread" in left
        assert any(x.startswith("busy anyio worker") for x in left), left
        assert "1 busy executor threads" in left
    finally:
        go.set()
        task.cancel()
        await anyio.to_thread.run_sync(thread.join)
        await pending
    with anyio.move_on_after(5):  # the cancelled task ends, the abandoned worker reports back
        await wait_until(lambda: not Running.now().since(before))
    assert Running.now().since(before) == []


@pytest.mark.parametrize("close", ["async with", "aclose"])
async def test_default_stager(close: str) -> None:
    async with nothing_left():
        stager = aiostage.DefaultStager(aiostage.StagingOptions(pool_size=2))
        async with contextlib.AsyncExitStack() as stack:
            if close == "async with":
                await stack.enter_async_context(stager)
            stager.release(await stager.stage(state(1)))
            await stager.stage(state(2))  # still leased when it closes
        if close == "aclose":
            await stager.aclose()
        await stager.aclose()  # idempotent


@pytest.mark.parametrize("close", ["async with", "aclose"])
async def test_checkpointer(tmp_path: Path, close: str) -> None:
    async with nothing_left() as before:
        ckpt = aiostage.Checkpointer(tmp_path, keep_last=1)
        await ckpt.__aenter__()
        try:
            await (await ckpt.save(1, state(1))).committed
            handle = await ckpt.save(2, state(2))  # in flight when it closes
            assert Running.now().tasks - before.tasks  # its worker task runs meanwhile
        finally:
            if close == "async with":
                await ckpt.__aexit__(None, None, None)
            else:
                await ckpt.aclose()
        assert handle.done()
        await ckpt.aclose()  # idempotent
    assert ckpt.steps() == [2]


async def test_async_save_is_bounded_by_its_task_group(tmp_path: Path) -> None:
    async with nothing_left() as before:
        async with anyio.create_task_group() as tg:
            handle = await aiostage.async_save(state(3), tmp_path / "one", task_group=tg)
            assert Running.now().tasks - before.tasks  # the save runs in the background
        assert handle.done()  # never awaited: leaving the group waited for it
    assert (await handle.committed) is not None


async def test_a_cancelled_async_save_leaves_nothing(tmp_path: Path) -> None:
    async with nothing_left():
        async with anyio.create_task_group() as tg:
            handle = await aiostage.async_save(state(4), tmp_path / "one", task_group=tg)
            await anyio.wait_all_tasks_blocked()  # the save is under way in a worker
            tg.cancel_scope.cancel()
        assert handle.done()


@pytest.mark.parametrize("close", ["async with", "aclose"])
async def test_replication_stager_in_a_world_of_one(tmp_path: Path, close: str) -> None:
    async with nothing_left():
        stager = aiostage.ReplicationStager(None, storage_dir=tmp_path, timeout=30)
        async with contextlib.AsyncExitStack() as stack:
            if close == "async with":
                await stack.enter_async_context(stager)
            stager.release(await stager.stage(state(5)))
            await stager.persisted()
        if close == "aclose":
            await stager.aclose()
        await stager.aclose()  # idempotent


@pytest.fixture
def gloo_world_of_one() -> Iterator[None]:
    """The default process group, gloo, of this process alone (no spawned ranks)."""
    if dist.is_initialized():
        pytest.skip("a default process group exists already")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.usefixtures("gloo_world_of_one")
@pytest.mark.parametrize("close", ["async with", "aclose"])
async def test_weight_publisher_in_a_world_of_one(close: str) -> None:
    async with nothing_left():
        pub = aiostage.WeightPublisher(subscribers=[], timeout=30)
        await pub.__aenter__()
        try:
            report = await pub.publish(state(6), 1)
            assert (report.version, report.deliveries) == (1, {})
            publication = await pub.submit(state(7), 2)
            assert (await publication.report).version == 2
            assert publication.done()
        finally:
            if close == "async with":
                await pub.__aexit__(None, None, None)
            else:
                await pub.aclose()
        await pub.aclose()  # idempotent
