"""Recovery: who lost their state, and the swap that gives each such rank its replica back."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import torch

from .._core import dist
from .._storage.locate import locate
from .._storage.reader import load
from .frames import Frame, plan_cpu_frame
from .transport import Link, recv_frame, send_frame, send_nothing
from .wire import Limits

__all__ = ["agree", "give", "swap"]


async def agree(pg: Any, lost: bool, pg_timeout: float) -> list[bool]:
    """Whether each rank of ``pg`` lost its state (an all-gather of every rank's ``lost``)."""
    rows = await dist.all_gather_ints(
        pg, [int(lost)], pg_timeout=pg_timeout, what="replication recovery"
    )
    return [r[0] == 1 for r in rows]


async def swap(
    link: Link,
    *,
    give_to: int | None,
    take_from: int | None,
    buffer: Callable[[int], Awaitable[torch.Tensor]],
    limits: Limits,
    latest: Frame | None,
    stored: Path | None,
) -> Frame | None:
    """At once: ``give`` rank ``give_to`` its replica (if not ``None``), and receive this rank's
    own state from rank ``take_from`` (if not ``None``) into ``buffer``, within ``limits``.

    Returns what was received: ``None`` when nothing was to be received or the peer holds no
    replica. Bound it with a timeout; raises ``ReplicationError`` naming the peer and phase.
    """
    got: list[Frame | None] = [None]

    async def receive(peer: int) -> None:
        received = await recv_frame(link, peer, buffer, limits=limits)
        if received is not None:
            got[0] = Frame(*received)

    async with anyio.create_task_group() as tg:
        if give_to is not None:
            tg.start_soon(give, link, give_to, latest, stored)
        if take_from is not None:
            tg.start_soon(receive, take_from)
    return got[0]


async def give(link: Link, peer: int, latest: Frame | None, stored: Path | None) -> None:
    """Send ``peer`` the replica of its state this rank holds: ``latest`` in memory (with its
    owner's digests, so the owner checks it end to end), else the one persisted at ``stored``
    (checked as it is read), else a frame saying there is none."""
    if latest is not None:
        await send_frame(link, peer, latest.header, latest.sources(), latest.digests)
        return
    if stored is None or await locate(stored)[0].kind(stored) == "absent":
        await send_nothing(link, peer)
        return
    state = await load(stored)
    planned = await anyio.to_thread.run_sync(plan_cpu_frame, state)
    await send_frame(link, peer, planned.header, planned.sources)
