"""Rank functions for test_channel_damaged: a publisher by hand (``_hostile_workers``) that
sends a frame whose bytes differ from its digests, and a real subscriber."""

from __future__ import annotations

from typing import Any

import torch
from _hostile_workers import Publisher, barrier, refusing_subscriber, state_of

from aiostage._channel import notes as wire
from aiostage._replication import transport
from aiostage._replication.frames import plan_cpu_frame
from aiostage._storage.digests import source_digests


async def damaged_bytes(rank: int, world: int) -> dict[str, Any]:
    """Rank 0 offers version 10, then 11 with one byte flipped after hashing (the digests of
    the true bytes), then 12. Rank 1 refuses 11 once it landed and keeps serving 10, then
    takes 12. Rank 1 returns what it held after 11 and at the end."""
    if rank == 0:
        pub = Publisher()
        await pub.asked()
        await pub.offer(10)
        await pub.asked()
        await barrier()  # A: rank 1 installed 10
        pub.seq += 1
        await pub.note(wire.OFFER, 11, pub.seq)
        planned = plan_cpu_frame(state_of(11))
        digests = source_digests(planned.sources)
        byte = planned.sources[0][0][: planned.sources[0][0].numel()].view(torch.uint8)
        byte[7] = 255 - int(byte[7])
        await transport.send_frame(pub.link, 1, planned.header, planned.sources, digests)
        await pub.asked()  # it refused 11 and asks again
        await barrier()  # B: rank 1 looked at what it holds
        await pub.offer(12)
        await pub.asked()
        await pub.close()
        await barrier()
        return {}
    after_11, _, end = await refusing_subscriber(12)
    return {"after_11": after_11, "end": end}
