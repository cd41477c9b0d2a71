"""Rank functions for ``test_channel_handback.py``: what a subscriber gets once the caller has
its tensors back (``publish`` returned or was cancelled) and changes them.

Every element of version ``v`` holds ``v``; the caller writes ``SCRIBBLE`` into its tensors as
soon as ``publish`` returns, as a trainer's next step would. Top-level so spawned ranks import
them by name; each returns what its rank observed, as plain data.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

import anyio
import anyio.to_thread
import numpy as np
import torch
import torch.distributed as dist
from _channel_workers import all_live

import aiostage
from aiostage._channel import notes as wire
from aiostage._replication.wire import plan_messages

#: elements of the one tensor published in ``cancelled_midway``: 64 MiB, more than gloo buffers
ELEMENTS = 16 << 20
SCRIBBLE = 99.0
ON_THE_WIRE, GO_ON = 71, 72  # tags of rank 1's "I read the frame's head" and rank 0's answer


def _values(t: torch.Tensor) -> list[float]:
    return sorted(float(v) for v in torch.unique(t))


async def cancelled_midway(rank: int, world: int) -> dict[str, Any]:
    """Rank 0 publishes version 1 from a tensor it alone holds and is cancelled while the
    frame is on the wire to rank 1 (a hand-written subscriber that stops after the frame's
    head until rank 0 cancelled); it then scribbles over the tensor and drops it. Rank 0
    returns whether the cancellation was caught and whether anything still holds the tensor;
    rank 1 the values it received."""
    if rank == 1:
        return await _read_slowly()
    return await _publish_cancelled()


async def late_after_scribble(rank: int, world: int) -> dict[str, Any]:
    """Rank 0 publishes version 1 while rank 1 is absent (the report does not wait for it),
    then scribbles over its tensor; rank 1 subscribes only then. Rank 0 returns the report's
    statuses; rank 1 what it installed and the values."""
    if rank == 1:
        await anyio.to_thread.run_sync(dist.barrier)  # A: the publish returned
        target = {"w": torch.zeros(ELEMENTS)}
        async with aiostage.WeightSubscriber(target=target, timeout=20) as sub:
            with anyio.fail_after(20):
                update = await sub.wait_for(1)
            got = await update.apply()
        await anyio.to_thread.run_sync(dist.barrier)  # B
        return {"got": got, "values": _values(target["w"])}
    state = {"w": torch.full((ELEMENTS,), 1.0)}
    async with aiostage.WeightPublisher(subscribers=[1], timeout=20) as pub:
        report = await pub.publish(state, 1)
        state["w"].fill_(SCRIBBLE)
        await anyio.to_thread.run_sync(dist.barrier)  # A
        await anyio.to_thread.run_sync(dist.barrier)  # B
    return {"statuses": {p: d.status for p, d in report.deliveries.items()}}


async def _publish_cancelled() -> dict[str, Any]:
    array = np.full(ELEMENTS, 1.0, dtype=np.float32)
    held = weakref.ref(array)  # dies once nothing refers to the tensor's memory
    state = {"w": torch.from_numpy(array)}
    del array
    scope = anyio.CancelScope()

    async def cancel_on_the_wire() -> None:
        await anyio.to_thread.run_sync(lambda: dist.recv(torch.zeros(1), 1, tag=ON_THE_WIRE))
        scope.cancel()
        await anyio.to_thread.run_sync(lambda: dist.send(torch.zeros(1), 1, tag=GO_ON))

    async with aiostage.WeightPublisher(subscribers=[1], timeout=20) as pub:
        await all_live(pub)
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_on_the_wire)
            with scope:
                await pub.publish(state, 1)
        state["w"].fill_(SCRIBBLE)  # the caller has its tensors back
        del state
        gc.collect()
        seen = {"cancelled": scope.cancelled_caught, "held": held() is not None}
        await anyio.to_thread.run_sync(dist.barrier)  # rank 1 read the frame
    return seen


async def _read_slowly() -> dict[str, Any]:
    """Rank 1: ask for a version, read the frame's head, tell rank 0, wait for its answer, then
    read the rest (one entry: the data in ``plan_messages`` ranges) and ask for the next; the
    data's values, and the note that ends the stream."""
    group = dist.group.WORLD
    offers = wire.Mailbox(group, 0, wire.OFFER_TAG)
    offers.post()
    await wire.send_note(group, 0, wire.READY_TAG, wire.Note(wire.READY, 0))
    offered = await offers.take()

    def read() -> torch.Tensor:
        head = torch.zeros(5, dtype=torch.int64)
        dist.recv(head, 0, tag=wire.FRAME_TAG)
        dist.send(torch.zeros(1), 0, tag=ON_THE_WIRE)
        dist.recv(torch.zeros(1), 0, tag=GO_ON)
        dist.recv(torch.empty(int(head[2]), dtype=torch.uint8), 0, tag=wire.FRAME_TAG)
        data = torch.empty(int(head[3]), dtype=torch.uint8)
        for a, b in plan_messages([(0, int(head[3]))]):
            dist.recv(data[a:b], 0, tag=wire.FRAME_TAG)
        dist.recv(torch.empty(int(head[4]), dtype=torch.int64), 0, tag=wire.FRAME_TAG)
        return data

    data = await anyio.to_thread.run_sync(read)
    offers.post()
    await wire.send_note(group, 0, wire.READY_TAG, wire.Note(wire.READY, offered.b))
    await anyio.to_thread.run_sync(dist.barrier)
    ended = await offers.take()  # the publisher closes: CLOSED
    return {"offered": offered.kind, "values": _values(data.view(torch.float32)), "end": ended.kind}
