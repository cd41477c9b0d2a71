"""Rank functions for ``test_hostile_peers.py``: a broken or hostile peer against replication and
the weight channel.

The hostile rank is raw gloo: it speaks aiostage's wire format by hand (``dist.isend`` of the
head, the header and the payload it chooses, valid digests where that takes an attack further:
``send_frame`` of a real layout it then bends), never a ``ReplicationStager`` or a
``WeightPublisher``. The other rank runs aiostage as a user does and returns what it observed as
plain data (``_seen``); the test body asserts on it. Sends the receiver refuses stay posted;
the ranks leave through ``run_world``'s exit, which drops them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import struct
from typing import Any

import anyio
import anyio.to_thread
import torch
import torch.distributed as dist
from _seen import error_seen, raised

import aiostage
from aiostage._channel import notes as wire
from aiostage._channel.shm import Region, fill_region
from aiostage._core.completion import wait_until
from aiostage._format.codec import Header, encode_header
from aiostage._replication import transport
from aiostage._replication.frames import plan_cpu_frame
from aiostage._replication.wire import MAGIC
from aiostage.errors import ReplicationError

TIB = 1 << 40
#: sends the receiver never takes: kept, since dropping the work of a posted gloo send waits
#: for it to complete (forever)
POSTED: list[Any] = []


def state_of(version: float, n: int = 64) -> dict[str, Any]:
    """A published (or replicated) state: one tensor holding ``version`` everywhere."""
    return {"w": torch.full((n,), float(version))}


def huge_header(nbytes: int) -> Header:
    """A self-consistent header announcing one uint8 tensor of ``nbytes``: it passes every
    check of the format, and only the receiver's own expectation can refuse it."""
    small = plan_cpu_frame({"w": torch.zeros(8, dtype=torch.uint8)}).header
    (entry,), (record,) = small.entries, small.records
    return dataclasses.replace(
        small,
        entries=(replaced(entry, shape=(nbytes,), end=nbytes),),
        records=(replaced(record, shape=(nbytes,)),),
    )


def replaced(item: Any, **changes: Any) -> Any:
    """An ``Entry`` or ``Record`` of a header with ``changes`` (named tuples; dataclasses in
    earlier versions, which these attacks were first tried on)."""
    if hasattr(item, "_replace"):
        return item._replace(**changes)
    return dataclasses.replace(item, **changes)


def post_raw(peer: int, tag: int, head: list[int], raw: bytes) -> None:
    """Post a frame's first message and header bytes as they are, without waiting: a receiver
    that refuses the head never takes the header (its send stays posted)."""
    messages = [torch.tensor(head, dtype=torch.int64)]
    if raw:
        messages.append(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    POSTED.extend(dist.isend(m, peer, tag=tag) for m in messages)


def framed(header: Header) -> list[torch.Tensor]:
    """The first two messages of a frame of ``header``: its head and its header bytes."""
    raw = encode_header(header)
    head = [MAGIC, 1, len(raw), header.data_bytes, len(header.entries)]
    return [torch.tensor(head), torch.frombuffer(bytearray(raw), dtype=torch.uint8)]


def post_header(peer: int, tag: int, header: Header) -> None:
    """Post the head and header of ``header`` (its data is not sent)."""
    POSTED.extend(dist.isend(m, peer, tag=tag) for m in framed(header))


def json_of(item: bytes, nbytes: int) -> bytes:
    """A frame header of ``nbytes`` (length prefix included) holding ``[item,item,...]``."""
    k = (nbytes - 8 - 2 - len(item)) // (len(item) + 1)
    body = (b"[" + (item + b",") * k + item + b"]").ljust(nbytes - 8)
    return struct.pack("<Q", len(body)) + body


def maxrss() -> int:
    """This process's peak resident memory so far, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def link(tag: int = transport.TAG) -> transport.Link:
    return transport.Link(dist.group.WORLD, torch.device("cpu"), 30.0, tag=tag)


async def barrier() -> None:
    await anyio.to_thread.run_sync(dist.barrier)


# ---------------------------------------------------------------- replication


async def replica_of_a_tebibyte(rank: int, world: int) -> dict[str, Any]:
    """Rank 1 answers rank 0's ``stage`` with a self-consistent frame of 1 TiB, then its
    ``recover(lost=True, like=...)`` with another: both refused as a header, nothing allocated.
    (The recovery runs in a group of its own: the header rank 0 refused to take is still posted
    in the first, where the next message it takes would be that one.)

    Rank 0 returns what ``stage`` and ``recover`` raised and the receive buffers allocated."""
    header = huge_header(TIB)
    if rank == 1:
        post_header(0, transport.TAG, header)  # the answer to stage
        await barrier()
        group = dist.new_group(backend="gloo")
        out = [torch.zeros(1, dtype=torch.int64) for _ in range(2)]
        dist.all_gather(out, torch.tensor([0]), group=group)  # who lost their state: rank 0
        POSTED.extend(dist.isend(m, 0, group=group, tag=transport.TAG) for m in framed(header))
        await barrier()
        return {}
    stager = aiostage.ReplicationStager(timeout=20)
    seen: dict[str, Any] = {"stage": await raised(stager.stage(state_of(0)), ReplicationError)}
    seen["allocations"] = stager.statistics().receive_allocations
    await stager.aclose()
    await barrier()
    group = dist.new_group(backend="gloo")
    restarted = aiostage.ReplicationStager(group, timeout=20)
    seen["recover"] = await raised(restarted.recover(lost=True, like=state_of(0)), ReplicationError)
    seen["allocations_back"] = restarted.statistics().receive_allocations
    await restarted.aclose()
    await barrier()
    return seen


async def uneven_partners(rank: int, world: int, max_bytes: int | None) -> dict[str, Any]:
    """Rank 1's state is 80 MiB, rank 0's 256 bytes: beyond twice rank 0's state plus slack
    only when ``max_bytes`` is not given. Rank 0 returns what ``stage`` raised (``None``) and
    the size of the replica; rank 1 the size of its replica or what ``stage`` raised."""
    state = state_of(rank, 64 if rank == 0 else (80 << 20) // 4)
    stager = aiostage.ReplicationStager(timeout=20 if rank == 0 else 3, max_bytes=max_bytes)
    try:
        replica = await stager.stage(state)
    except ReplicationError as exc:
        return {"error": error_seen(exc)}
    finally:
        await stager.aclose()
    return {"error": None, "numel": replica["w"].numel()}


async def header_of_many_lists(rank: int, world: int, nbytes: int) -> dict[str, Any]:
    """Rank 1 answers rank 0's ``stage`` with an ``nbytes`` header of ``[[],[],...]`` (parsing
    costs ~22 times its size): over what rank 0's own header could need, it is refused before
    it is received. Rank 0 returns the error and how much its peak memory grew."""
    if rank == 1:
        post_raw(0, transport.TAG, [MAGIC, 1, nbytes, 0, 0], json_of(b"[]", nbytes))
        await barrier()
        return {}
    before = maxrss()
    stager = aiostage.ReplicationStager(timeout=20)
    seen: dict[str, Any] = {"stage": await raised(stager.stage(state_of(0)), ReplicationError)}
    seen["grew"] = maxrss() - before
    await stager.aclose()
    await barrier()
    return seen


async def header_of_many_dicts(rank: int, world: int, nbytes: int) -> dict[str, Any]:
    """Rank 0 restarts and recovers without ``like=`` (nothing is known of its state): rank 1
    gives it an ``nbytes`` header of ``[{},{},...]`` (parsing costs ~25 times its size). It is
    within the format's header length, so it is received, then refused by its parse cost
    before it is parsed. Rank 0 returns the error and how much its peak memory grew."""
    if rank == 1:
        dist.all_gather([torch.zeros(1, dtype=torch.int64) for _ in range(2)], torch.tensor([0]))
        post_raw(0, transport.TAG, [MAGIC, 1, nbytes, 0, 0], json_of(b"{}", nbytes))
        await barrier()
        return {}
    before = maxrss()
    restarted = aiostage.ReplicationStager(timeout=20)
    seen: dict[str, Any] = {"recover": await raised(restarted.recover(lost=True), ReplicationError)}
    seen["grew"] = maxrss() - before
    await restarted.aclose()
    await barrier()
    return seen


async def payload_longer_than_announced(rank: int, world: int) -> dict[str, Any]:
    """Rank 1 announces a frame of 4 KiB of data and sends 8 KiB in its place: gloo aborts
    rank 0 (SIGABRT from its own thread), which nothing in aiostage can catch."""
    planned = plan_cpu_frame(state_of(1, 1024))
    if rank == 1:
        post_header(0, transport.TAG, planned.header)
        longer = torch.ones(2 * planned.header.data_bytes, dtype=torch.uint8)
        work = dist.isend(longer, 0, tag=transport.TAG)
        assert work is not None
        with contextlib.suppress(RuntimeError):  # rank 0 is gone
            await anyio.to_thread.run_sync(work.wait)
        return {}
    stager = aiostage.ReplicationStager(timeout=20)
    await stager.stage(state_of(0, 1024))
    return {"survived": True}


#: records a hostile peer bends, each a class of issue 21 (items 2-4): malformed tensor
#: attributes, a quantized dtype, an element count past int64 whose view fits its entry
BENT_RECORDS: dict[str, dict[str, Any]] = {
    "attrs": {"attrs": {"float": []}},
    "qint8": {"dtype": torch.qint8},
    "overflow": {"shape": (1 << 62, 8), "stride": (0, 1)},
}


async def bent_replicas(rank: int, world: int) -> dict[str, Any]:
    """Rank 1 answers each of rank 0's ``stage`` calls with a frame of a real layout whose
    first record is bent (``BENT_RECORDS``), each exchange in a group of its own. Rank 0 returns
    what each ``stage`` raised, and the replica a good exchange after them staged."""
    good = plan_cpu_frame(state_of(1)).header
    seen: dict[str, Any] = {}
    for name, changes in BENT_RECORDS.items():
        group = dist.new_group(backend="gloo")
        if rank == 1:
            header, sources = bent(good, **changes), plan_cpu_frame(state_of(1)).sources
            await transport.send_frame(
                transport.Link(group, torch.device("cpu"), 20.0), 0, header, sources
            )
        else:
            stager = aiostage.ReplicationStager(group, timeout=20)
            seen[name] = await raised(stager.stage(state_of(0)), ReplicationError)
            await stager.aclose()
        await barrier()
    group = dist.new_group(backend="gloo")
    stager = aiostage.ReplicationStager(group, timeout=20)
    seen["good"] = float((await stager.stage(state_of(rank)))["w"][0])
    await stager.aclose()
    await barrier()
    return seen


# ---------------------------------------------------------------- the weight channel


class Publisher:
    """The hostile publisher's side of the channel, by hand: it takes a subscriber's notes and
    answers with offers of its choosing."""

    def __init__(self, peer: int = 1) -> None:
        self.pg, self.peer = dist.group.WORLD, peer
        self.ready = wire.Mailbox(self.pg, peer, wire.READY_TAG)
        self.link = link(wire.FRAME_TAG)
        self.seq = 0

    async def take(self) -> wire.Note:
        """The subscriber's next note other than ``LIMIT`` (its size, sent first)."""
        while (note := await self.ready.take()).kind == wire.LIMIT:
            pass
        return note

    async def asked(self) -> None:
        """Wait for the subscriber's ``READY``: it is done with the last offer, if any."""
        note = await self.take()
        if note.kind != wire.READY:  # a guard: the test names the note
            raise RuntimeError(f"expected READY, got {note}")

    async def offer(self, version: int, header: Header | None = None) -> None:
        """Offer ``version`` with the next sequence number and send the frame of
        ``state_of(version)`` (with ``header`` in place of its own when given: valid digests
        of the real bytes either way)."""
        self.seq += 1
        await self.note(wire.OFFER, version, self.seq)
        planned = plan_cpu_frame(state_of(version))
        header = header if header is not None else planned.header
        await transport.send_frame(self.link, self.peer, header, planned.sources)

    async def note(self, kind: int, a: int, b: int = 0) -> None:
        await wire.send_note(self.pg, self.peer, wire.OFFER_TAG, wire.Note(kind, a, b))

    async def close(self) -> None:
        """Tell the subscriber, which has asked, that the stream ended."""
        await self.note(wire.CLOSED, 0)


def held(sub: aiostage.WeightSubscriber, target: dict[str, Any]) -> dict[str, Any]:
    """What a subscriber holds: the installed version, the value its target reads, the newest
    version received, whether one is pending, the refusals, and the error that ended its
    stream."""
    return {
        "version": sub.version,
        "target": float(target["w"][0]),
        "received_version": sub.received_version,
        "pending": sub.pending is not None,
        "refused": [error_seen(e) for e in sub.refused],
        "error": error_seen(sub.error),
    }


async def offer_of_a_tebibyte(rank: int, world: int) -> dict[str, Any]:
    """Rank 0 offers version 10, then version 11 as a frame of 1 TiB. Rank 1, serving version
    10, refuses it before allocating (the stream is out of step: it ends, with the error) and
    keeps serving version 10. Rank 1 returns what it holds and what iterating raised."""
    if rank == 0:
        pub = Publisher()
        await pub.asked()
        await pub.offer(10)
        await pub.asked()
        pub.seq += 1
        await pub.note(wire.OFFER, 11, pub.seq)
        post_header(1, wire.FRAME_TAG, huge_header(TIB))
        await barrier()
        return {}
    target = {"w": torch.zeros(64)}
    async with aiostage.WeightSubscriber(target=target, timeout=20) as sub:
        with anyio.fail_after(20):
            await (await sub.wait_for(10)).apply()
            seen = {"iterating": await raised(anext(aiter(sub)), ReplicationError)}
        seen |= held(sub, target)
    await barrier()
    return seen


async def honest_but_too_big(rank: int, world: int) -> dict[str, Any]:
    """A real publisher, and a subscriber that takes at most 1,000 bytes (``max_bytes``): the
    publisher learns it and does not send its 64 KiB version; both say why, nothing hangs.
    Rank 0 returns its report; rank 1 what ``wait_for`` raised."""
    if rank == 0:
        async with aiostage.WeightPublisher(subscribers=[1], timeout=20) as pub:
            with anyio.fail_after(20):
                await pub.wait_for_subscribers()
            report = await pub.publish(state_of(1, 16384), 1)
        return {"dropped": report.dropped, "error": error_seen(report.deliveries[1].error)}
    async with aiostage.WeightSubscriber(timeout=20, max_bytes=1000) as sub:
        with anyio.fail_after(20):
            return {"wait_for": await raised(sub.wait_for(1), ReplicationError)}


async def versions_going_back(rank: int, world: int) -> dict[str, Any]:
    """Rank 0 offers version 10, then 5 (a valid frame, valid digests), then 11, then 4, 3
    and 2 in a row. Rank 1 refuses 5 and keeps 10, takes 11, and drops the publisher after the
    third refusal in a row. Rank 1 returns what it held after 5, after 11, and at the end."""
    if rank == 0:
        pub = Publisher()
        for version in (10, 5, 11, 4, 3, 2):
            await pub.asked()
            if version == 5:
                await barrier()  # A: rank 1 installed 10
            if version == 11:
                await barrier()  # B: rank 1 looked at what it holds after 5
            await pub.offer(version)
        await barrier()
        return {}
    refused, after_11, end = await refusing_subscriber(11)
    return {"after_5": refused, "after_11": after_11, "end": end}


async def refusing_subscriber(then: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Rank 1 of a run where the hand-made publisher offers 10, then a version to refuse, then
    ``then``: install 10 (barrier A), wait for the refusal (or a change), look (barrier B),
    install ``then``, wait for the publisher's end. What it held after the refusal, after
    ``then`` and at the end."""
    target = {"w": torch.zeros(64)}
    async with aiostage.WeightSubscriber(target=target, timeout=20) as sub:
        with anyio.fail_after(20):
            await (await sub.wait_for(10)).apply()
            await barrier()  # A
            await wait_until(lambda: len(sub.refused) == 1 or sub.received_version != 10)
            refused = held(sub, target)
            await barrier()  # B
            await (await sub.wait_for(then)).apply()
            after = held(sub, target)
            await wait_until(lambda: sub.ended)
        end = held(sub, target)
    await barrier()
    return refused, after, end


def bent(header: Header, **changes: Any) -> Header:
    """``header`` with its first record changed (``attrs=``) or its tree (``skeleton=``)."""
    if "skeleton" in changes:
        return dataclasses.replace(header, skeleton=changes["skeleton"])
    first, *rest = header.records
    return dataclasses.replace(header, records=(replaced(first, **changes), *rest))


async def malformed_structure(rank: int, world: int) -> dict[str, Any]:
    """Rank 0 offers version 10, then 11 with malformed tensor attributes, 12 with a tree that
    does not decode (valid digests both), then a good 13. Rank 1 refuses 11 and 12 as they
    land (neither is ever pending, ``apply`` never meets them) and takes 13. Rank 1 returns
    what it held after 12 and at the end, and what ``apply`` returned after 12."""
    good = plan_cpu_frame(state_of(0)).header
    if rank == 0:
        pub = Publisher()
        for version, header in [
            (10, None),
            (11, bent(good, attrs={"float": []})),
            (12, bent(good, skeleton={"no": "tree"})),
            (13, None),
        ]:
            await pub.asked()
            if version == 13:
                await barrier()  # rank 1 looked at what it holds after 12
            await pub.offer(version, header)
        await pub.asked()
        await pub.close()
        await barrier()
        return {}
    target = {"w": torch.zeros(64)}
    async with aiostage.WeightSubscriber(target=target, timeout=20) as sub:
        with anyio.fail_after(20):
            await (await sub.wait_for(10)).apply()
            await wait_until(lambda: len(sub.refused) == 2 or sub.received_version != 10)
            after_12 = held(sub, target)
            update = sub.pending
            applied = await raised(update.apply(), Exception) if update is not None else None
            await barrier()
            await (await sub.wait_for(13)).apply()
            async for _ in sub:  # to the end of the stream
                pass
        seen = {"after_12": after_12, "applied": applied, "end": held(sub, target)}
    await barrier()
    return seen


def shm_file(name: bytes) -> str:
    return "/dev/shm" + name.decode()


async def foreign_shared_memory(
    rank: int, world: int, torch_victim: bytes, plain_victim: bytes
) -> dict[str, Any]:
    """Rank 0 offers version 1 through a shared-memory region of its own, then offers each
    later version through an object that is not such a region (a region of another process,
    a plain /dev/shm file, its own region with a larger size announced), then over gloo once
    the subscriber says it cannot read it. The names go as the subscriber of 4ae8ad0 took them
    (``manager\nhandle``, which reached torch's shared-memory manager) and as aiostage takes
    them now (the handle). Rank 0 returns its own region's size on disk at the end; rank 1
    what it held and what it served."""
    if rank == 0:
        pub = Publisher()
        planned = plan_cpu_frame(state_of(1))
        region = Region.create(planned.header.data_bytes)
        fill_region(region, planned.header, planned.sources)
        storage: Any = region.data.untyped_storage()
        manager, own, _ = storage._share_filename_cpu_()  # its manager, its region's handle
        answers = [await shm_offer(pub, 1, own, region.nbytes)]
        for version, name, size in [
            (2, manager + b"\n" + torch_victim, 8192),
            (3, manager + b"\n" + plain_victim, 4096),
            (4, manager + b"\n" + own, 2 * region.nbytes),
            (5, torch_victim, 4096),
            (6, own, 2 * region.nbytes),
        ]:
            answers.append(await shm_offer(pub, version, name, size))
        await pub.asked()
        await pub.close()
        size = os.stat(shm_file(own)).st_size
        await barrier()
        return {"answers": answers, "own_size": size, "region_bytes": region.nbytes}
    target = {"w": torch.zeros(64)}
    async with aiostage.WeightSubscriber(target=target, timeout=20) as sub:
        with anyio.fail_after(20):
            versions = [await update.apply() async for update in sub]
        seen = {"versions": versions, "end": held(sub, target)}
    await barrier()
    return seen


async def shm_offer(pub: Publisher, version: int, name: bytes, size: int) -> str:
    """Offer ``version`` through the shared-memory object ``name`` said to hold ``size`` bytes
    (the frame header of ``state_of(version)``); if the subscriber answers that it cannot read
    it, offer it over gloo. Returns the answer: ``"DONE"`` or ``"NO_SHM"``."""
    from aiostage._channel.shm import send_description

    await pub.asked()
    pub.seq += 1
    await pub.note(wire.OFFER_SHM, version, pub.seq)
    header = plan_cpu_frame(state_of(version)).header
    fake = Region(torch.empty(size, dtype=torch.uint8), name)
    await send_description(pub.pg, pub.peer, fake, header)
    answer = await pub.take()
    if answer.kind == wire.DONE:
        return "DONE"
    if answer.kind != wire.NO_SHM:
        raise RuntimeError(f"expected DONE or NO_SHM, got {answer}")
    pub.seq -= 1
    await pub.offer(version)
    return "NO_SHM"
