"""Rank functions for ``test_channel.py``: the weight channel in real gloo worlds.

Rank 0 publishes; the other ranks serve "requests" (a forward pass in a worker thread) and
install updates between requests. Every parameter of version ``v`` holds the value ``v``, so a
request that read half-old, half-new weights sees two values. Top-level so spawned ranks import
them by name; each asserts inside the rank and returns a small summary.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread
import pytest
import torch
import torch.distributed as dist

import aiostage
from aiostage._channel import notes as wire
from aiostage.errors import ReplicationError, ReplicationTimeout


def make_model(hidden: int = 64) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 4)
    )
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.0)
    return model


def set_version(model: torch.nn.Module, version: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(version)


def request(model: torch.nn.Module) -> float:
    """One request: a forward pass, then the version of the weights it read (one value, or
    an AssertionError naming the mix)."""
    with torch.no_grad():
        model(torch.ones(2, 16))
        values = {float(v) for p in model.parameters() for v in p.unique()}
    assert len(values) == 1, f"a request saw weights of several versions: {sorted(values)}"
    return values.pop()


async def serve(sub: aiostage.WeightSubscriber, model: torch.nn.Module, last: int) -> list[float]:
    """Answer requests until version ``last`` is installed; install updates between requests."""
    seen: list[float] = []
    while sub.version != last:
        update = sub.pending
        if update is not None:
            await update.apply()
        seen.append(await anyio.to_thread.run_sync(request, model))
    return seen


async def publish_five(
    rank: int, world: int, hidden: int, shared: bool, swap: bool
) -> dict[str, Any]:
    """Rank 0 publishes versions 1..5 (overwriting its weights right after each is staged);
    ``shared``: through shared memory (the subscribers are on this host); ``swap``: the
    subscribers re-point their parameters instead of copying."""
    if rank != 0:
        return await _subscriber(hidden, last=5, swap=swap)
    model = make_model(hidden)
    subs = list(range(1, world))
    reports = []
    async with aiostage.WeightPublisher(subscribers=subs, timeout=30, shared_memory=shared) as pub:
        publications = []
        for v in range(1, 6):
            set_version(model, v)
            publications.append(await pub.submit(model.state_dict(), v))
            set_version(model, -1.0)  # training goes on: the staged copy must not see this
        reports = [await p.report for p in publications]
        for p, r in zip(publications, reports, strict=True):  # each subscriber's, one by one
            assert p.done()
            assert {rank: await d for rank, d in p.deliveries.items()} == r.deliveries
        with pytest.raises(ValueError, match="does not increase"):
            await pub.submit(model.state_dict(), 5)
    for report in reports:
        assert not report.dropped, report
        assert {d.status for d in report.deliveries.values()} <= {"delivered", "superseded"}
    assert reports[-1].delivered == subs, reports[-1]
    assert all(d.shared_memory == shared for d in reports[-1].deliveries.values()), reports[-1]
    return {"statuses": [[d.status for d in r.deliveries.values()] for r in reports]}


async def _subscriber(hidden: int, last: int, swap: bool) -> dict[str, Any]:
    model = make_model(hidden)
    async with aiostage.WeightSubscriber(publisher=0, target=model, timeout=30, swap=swap) as sub:
        seen = await serve(sub, model, last)
        assert sub.received_version == last
        async for _ in sub:  # the publisher closes after `last`: the stream ends
            pass
    assert seen == sorted(seen), seen  # versions never go back
    applied = sorted(set(seen) - {0.0})
    assert sub.skipped + len(applied) == last, (sub.skipped, applied)
    return {"requests": len(seen), "applied": applied, "skipped": sub.skipped}


async def killed_mid_transfer(rank: int, world: int) -> dict[str, Any]:
    """Rank 2 takes an offer, reads the frame's first message and SIGKILLs itself: the
    publisher drops it fast and keeps serving rank 1."""
    if rank == 2:
        await _take_offer_then_die()
    if rank == 1:
        return await _serve_until_two()
    first, second, seconds, states = await _publish_two(20.0)
    assert first.delivered == [1], first
    error = first.deliveries[2].error
    assert isinstance(error, ReplicationError), first
    assert not isinstance(error, ReplicationTimeout), error
    assert error.peer == 2, error
    assert seconds < 10, f"the publisher took {seconds:.1f} s to drop the dead subscriber"
    assert second.delivered == [1], second
    assert second.deliveries[2].status == "dropped", second
    assert states[2] == "dropped", states
    return {"seconds": seconds}


async def _serve_until_two() -> dict[str, Any]:
    """Rank 1: serve requests until version 2 is installed."""
    model = make_model(256)
    async with aiostage.WeightSubscriber(target=model, timeout=20) as sub:
        await serve(sub, model, last=2)
    return {}


async def _publish_two(
    drop_after: float, then: Callable[[], None] = lambda: None
) -> tuple[aiostage.PublishReport, aiostage.PublishReport, float, dict[int, str]]:
    """Rank 0: publish versions 1 and 2 to ranks 1 and 2 (the first one timed), then call
    ``then`` before the publisher closes; the reports, the seconds, the subscribers' states."""
    model = make_model(256)
    async with aiostage.WeightPublisher(subscribers=[1, 2], timeout=drop_after) as pub:
        set_version(model, 1)
        began = time.perf_counter()
        first = await pub.publish(model.state_dict(), 1)
        seconds = time.perf_counter() - began
        set_version(model, 2)
        second = await pub.publish(model.state_dict(), 2)
        then()
        states = pub.states
    return first, second, seconds, states


async def _take_offer_then_die() -> None:
    await _take_offer(then=signal.SIGKILL)


async def _take_offer(then: signal.Signals) -> None:
    """Ask for a version like a subscriber, read the first message of its frame, send ``then``
    to this process."""
    offers = wire.Mailbox(dist.group.WORLD, 0, wire.OFFER_TAG)
    offers.post()
    await wire.send_note(dist.group.WORLD, 0, wire.READY_TAG, wire.Note(wire.READY, 0))
    note = await offers.take()
    assert note.kind == wire.OFFER, note
    head = torch.zeros(5, dtype=torch.int64)
    await anyio.to_thread.run_sync(lambda: dist.recv(head, 0, tag=wire.FRAME_TAG))
    os.kill(os.getpid(), then)


async def late_joiner(rank: int, world: int) -> dict[str, Any]:
    """Rank 2 subscribes after versions 1..3: it gets version 3 at once, then version 4."""
    barrier = dist.barrier
    if rank == 1:
        model = make_model()
        async with aiostage.WeightSubscriber(target=model, timeout=20) as sub:
            await anyio.to_thread.run_sync(barrier)
            await anyio.to_thread.run_sync(barrier)
            await serve(sub, model, last=4)
        return {}
    if rank == 2:
        await anyio.to_thread.run_sync(barrier)  # versions 1..3 are out
        model = make_model()
        async with aiostage.WeightSubscriber(target=model, timeout=20) as sub:
            with anyio.fail_after(20):
                update = await sub.wait_for(3)
            assert update.version == 3, update
            assert await update.apply() == 3
            assert request(model) == 3.0
            await anyio.to_thread.run_sync(barrier)
            await serve(sub, model, last=4)
            return {"skipped": sub.skipped, "first": 3}
    model = make_model()
    reports = []
    async with aiostage.WeightPublisher(subscribers=[1, 2], timeout=2) as pub:
        for v in (1, 2, 3):
            set_version(model, v)
            reports.append(await pub.publish(model.state_dict(), v))
        await anyio.to_thread.run_sync(barrier)
        await anyio.to_thread.run_sync(barrier)  # rank 2 holds version 3
        set_version(model, 4)
        reports.append(await pub.publish(model.state_dict(), 4))
    first = reports[0].deliveries[2]
    assert first.status == "dropped", first
    assert isinstance(first.error, ReplicationTimeout), first
    assert first.error.phase == "ready", first.error
    assert [r.deliveries[2].status for r in reports[1:3]] == ["dropped"] * 2, reports
    assert reports[3].delivered == [1, 2], reports[3]
    return {"first_wait": reports[0].seconds}


async def close_and_rejoin(rank: int, world: int) -> dict[str, Any]:
    """Rank 1 closes its subscriber (BYE), versions go on, then it subscribes again: first with a
    target of another shape (``StateDictMismatch`` on apply), then with the right one."""
    barrier = dist.barrier
    if rank == 1:
        model = make_model()
        async with aiostage.WeightSubscriber(target=model, timeout=20) as sub:
            assert await (await sub.wait_for(1)).apply() == 1
        await anyio.to_thread.run_sync(barrier)  # A: closed; version 2 goes out
        await anyio.to_thread.run_sync(barrier)  # B
        wrong = make_model(hidden=32)
        async with aiostage.WeightSubscriber(target=wrong, timeout=20) as sub:
            update = await sub.wait_for(2)
            with pytest.raises(aiostage.errors.StateDictMismatch) as caught:
                await update.apply()
        async with aiostage.WeightSubscriber(target=model, timeout=20) as sub:
            assert await (await sub.wait_for(2)).apply() == 2
            assert request(model) == 2.0
        await anyio.to_thread.run_sync(barrier)  # C
        return {"mismatch": caught.value.problems[0]}
    model = make_model()
    async with aiostage.WeightPublisher(subscribers=[1], timeout=20) as pub:
        set_version(model, 1)
        first = await pub.publish(model.state_dict(), 1)
        await anyio.to_thread.run_sync(barrier)  # A
        set_version(model, 2)
        second = await pub.publish(model.state_dict(), 2)
        await anyio.to_thread.run_sync(barrier)  # B
        await anyio.to_thread.run_sync(barrier)  # C
    assert first.delivered == [1], first
    assert second.deliveries[1].status == "closed", second
    return {}


async def frozen_mid_transfer(rank: int, world: int) -> dict[str, Any]:
    """Rank 2 takes an offer, reads the frame's first message and freezes (SIGSTOP): the
    publisher drops it with a timeout within its bound, keeps serving rank 1, then kills it."""
    pid = torch.tensor([os.getpid()])
    if rank == 2:
        await anyio.to_thread.run_sync(lambda: dist.send(pid, 0, tag=77))
        await _take_offer(then=signal.SIGSTOP)
    if rank == 1:
        return await _serve_until_two()
    await anyio.to_thread.run_sync(lambda: dist.recv(pid, 2, tag=77))
    timeout = 3.0
    # the frozen rank's cleanup, once both versions are out
    first, second, seconds, _ = await _publish_two(
        timeout, lambda: os.kill(int(pid), signal.SIGKILL)
    )
    error = first.deliveries[2].error
    assert isinstance(error, ReplicationTimeout), first
    assert (error.peer, error.phase) == (2, "send"), error
    assert first.delivered == [1], first
    assert seconds < timeout + 2, f"the publisher took {seconds:.1f} s to drop the frozen rank"
    assert second.delivered == [1], second
    assert second.deliveries[2].status == "dropped", second
    return {"seconds": seconds}


async def beside_replication(rank: int, world: int) -> dict[str, Any]:
    """A weight channel and a ReplicationStager between the same two ranks of the same group at
    once: each stream keeps to its own tag, so neither takes the other's frames."""
    mine: dict[str, Any] = {"x": torch.full((1 << 18,), float(rank)), "step": rank}
    got: list[float] = []
    async with aiostage.ReplicationStager(timeout=30) as stager:

        async def replicate() -> None:
            for _ in range(5):
                replica = await stager.stage(mine)
                assert replica["step"] == 1 - rank, replica["step"]
                got.append(float(replica["x"].mean()))
                stager.release(replica)

        model = make_model(512)
        if rank == 0:
            async with (
                aiostage.WeightPublisher(subscribers=[1], timeout=30) as pub,
                anyio.create_task_group() as tg,
            ):
                tg.start_soon(replicate)
                for v in (1, 2, 3):
                    set_version(model, v)
                    assert (await pub.publish(model.state_dict(), v)).delivered == [1]
            return {"replicas": got}
        async with (
            aiostage.WeightSubscriber(target=model, timeout=30) as sub,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(replicate)
            assert await serve(sub, model, last=3)
    assert request(model) == 3.0
    return {"replicas": got}


async def shared_memory_fallback(rank: int, world: int) -> dict[str, Any]:
    """Rank 2 runs with a /dev/shm of its own (as in another container on this host): it cannot
    map the publisher's shared memory, answers NO_SHM and gets each version over gloo; rank 1
    maps it."""
    model = make_model(256)
    if rank:
        async with aiostage.WeightSubscriber(target=model, timeout=20) as sub:
            await serve(sub, model, last=2)
            began = time.perf_counter()
        # closing as the publisher closes: a note that had landed as the receiver was cancelled
        # used to be lost, and closing then waited out the whole timeout
        assert time.perf_counter() - began < 10, "closing the subscriber waited for the timeout"
        return {"version": request(model)}
    reports = []
    async with aiostage.WeightPublisher(subscribers=[1, 2], timeout=20, shared_memory=True) as pub:
        for v in (1, 2):
            set_version(model, v)
            reports.append(await pub.publish(model.state_dict(), v))
    return {
        "delivered": [r.delivered for r in reports],
        "shared": [[r.deliveries[p].shared_memory for p in (1, 2)] for r in reports],
    }
