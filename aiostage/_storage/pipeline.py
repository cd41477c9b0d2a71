"""Streaming bytes through a small ring of aligned buffers: cut into chunks, fill, drain.

The writer fills a buffer (copy + hash) while earlier ones drain to storage, several at once
where the storage allows it; the reader's checks hash mapped data chunk by chunk. Pure memory
and tasks, no file-system access.
"""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import anyio
import anyio.abc
import anyio.to_thread

__all__ = ["cut", "pipeline", "ring"]

_J = TypeVar("_J")


@contextlib.asynccontextmanager
async def ring(slots: int, size: int) -> AsyncIterator[list[memoryview]]:
    """``async with ring(slots, size) as bufs``: page-aligned buffers of anonymous memory.

    Mapped and unmapped in worker threads: unmapping tens of MiB takes milliseconds.
    """
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS  # mmap's default, MAP_SHARED, is shmem
    arena = await anyio.to_thread.run_sync(lambda: mmap.mmap(-1, slots * size, flags=flags))
    views = [memoryview(arena)[i * size : (i + 1) * size] for i in range(slots)]
    try:
        yield views
    finally:
        for v in views:
            v.release()
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_unmap, arena)


def _unmap(arena: mmap.mmap) -> None:
    with contextlib.suppress(BufferError):  # a view still alive: the collector unmaps it later
        arena.close()


def cut(lengths: Sequence[int], chunk: int) -> Iterator[list[tuple[int, int, int]]]:
    """Cut consecutive segments of ``lengths`` bytes into chunks of ``chunk`` bytes.

    Yields, per chunk, its pieces as ``(segment, start within the segment, bytes)``; every
    chunk but the last is full.
    """
    pieces: list[tuple[int, int, int]] = []
    room = chunk
    for segment, total in enumerate(lengths):
        at = 0
        while at < total:
            n = min(room, total - at)
            pieces.append((segment, at, n))
            at, room = at + n, room - n
            if room == 0:
                yield pieces
                pieces, room = [], chunk
    if pieces:
        yield pieces


async def pipeline(
    slots: int,
    jobs: Iterable[_J],
    first: Callable[[int, _J], Awaitable[None]],
    second: Callable[[int, _J], Awaitable[None]],
    *,
    depth: int = 1,
) -> None:
    """Run ``first(slot, job)`` then ``second(slot, job)`` for every job.

    ``first`` runs for one job at a time, in order, while ``second`` runs for up to ``depth``
    earlier jobs at once (started in order; with ``depth`` 1 also finished in order), with at
    most ``slots`` jobs (and ring buffers) between the two stages. A failure in either stage
    cancels the rest and surfaces as the task group's ``ExceptionGroup``.
    """
    send_full, recv_full = anyio.create_memory_object_stream[tuple[int, _J]](slots)
    send_free, recv_free = anyio.create_memory_object_stream[int](slots)
    for slot in range(slots):
        send_free.send_nowait(slot)
    lanes = anyio.Semaphore(depth)

    async def drained(slot: int, job: _J) -> None:
        await second(slot, job)
        lanes.release()
        send_free.send_nowait(slot)

    async def drain(tg: anyio.abc.TaskGroup) -> None:
        async with recv_full:
            async for slot, job in recv_full:
                await lanes.acquire()
                tg.start_soon(drained, slot, job)

    with recv_free, send_free:
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain, tg)
            async with send_full:
                try:
                    for job in jobs:
                        slot = await recv_free.receive()
                        await first(slot, job)
                        await send_full.send((slot, job))
                except anyio.BrokenResourceError:
                    return  # ``second`` failed: its error alone leaves the task group
