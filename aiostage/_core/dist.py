"""The one module that calls ``torch.distributed``: awaitable collectives with timeouts, no pickle.

Each collective is issued with ``async_op=True`` (gloo runs it on its own threads) and its work
polled from the loop (``completion.wait_until``) under ``anyio.fail_after``: the loop never
blocks, and a peer that is slow or gone turns into a ``TimeoutError`` naming the step. A timed-out
collective cannot be withdrawn from the group; treat the group as broken afterwards.
"""

from __future__ import annotations

import atexit
import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import torch

from . import cuda
from .completion import Backoff, wait_until

__all__ = [
    "all_gather_ints",
    "backend_device",
    "broadcast_bytes",
    "default_group",
    "foreign_sharded_tensor",
    "global_rank",
    "grouped_exchange",
    "own_group",
    "post_recv",
    "post_send",
    "private_group",
    "rank_and_size",
    "uses_nccl",
    "wait_work",
    "wait_works",
]

#: peers may be writing gigabytes; a few wake-ups per 10 ms is plenty
_POLL = Backoff(0.0005, 0.01)
#: how often a worker thread waiting for a p2p work checks whether its call was abandoned
_ABANDON_POLL = 0.05
#: the threads of ``wait_work`` still inside a gloo wait (``_let_waiters_return``)
_WAITERS: set[threading.Thread] = set()
#: how long interpreter exit waits for them: a peer that exits at the same time closes its
#: connections, which ends their waits, well within it
_EXIT_GRACE = 10.0


def rank_and_size(pg: Any) -> tuple[int, int]:
    """This process's rank in ``pg`` and the size of ``pg``."""
    import torch.distributed as dist

    return dist.get_rank(pg), dist.get_world_size(pg)


async def broadcast_bytes(pg: Any, data: bytes, *, pg_timeout: float, what: str) -> bytes:
    """Group rank 0's ``data`` on every rank (all pass the same length), moved through the
    device ``pg``'s backend takes (``backend_device``)."""
    import torch.distributed as dist

    device = backend_device(pg)
    buf = bytearray(data)
    t = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
    moved = await _to_device(t, device)
    work = dist.broadcast(moved, group=pg, group_src=0, async_op=True)
    await _wait(work, pg, pg_timeout, what)
    return (await _to_cpu(moved, device)).numpy().tobytes()


async def all_gather_ints(
    pg: Any, values: Sequence[int], *, pg_timeout: float, what: str
) -> list[list[int]]:
    """Every rank's ``values`` (int64, same length everywhere), indexed by group rank; moved
    through the device ``pg``'s backend takes (an NCCL group takes no CPU tensor)."""
    import torch.distributed as dist

    device = backend_device(pg)
    mine = await _to_device(torch.tensor(list(values), dtype=torch.int64), device)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size(pg))]
    work = dist.all_gather(out, mine, group=pg, async_op=True)
    await _wait(work, pg, pg_timeout, what)
    rows = [await _to_cpu(t, device) for t in out]
    return [[int(v) for v in t.tolist()] for t in rows]


async def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``: the CPU tensor itself, else copied in a worker thread on it."""
    if device.type == "cpu":
        await anyio.lowlevel.checkpoint()
        return t
    return await anyio.to_thread.run_sync(cuda.bound(device, t.to), device)


async def _to_cpu(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on the CPU: a copy made in a worker thread (it waits for the GPU), never here."""
    if t.device.type == "cpu":
        await anyio.lowlevel.checkpoint()
        return t
    return await anyio.to_thread.run_sync(cuda.bound(device, t.cpu))


async def _wait(work: Any, pg: Any, pg_timeout: float, what: str) -> None:
    try:
        with anyio.fail_after(pg_timeout):
            await wait_until(work.is_completed, _POLL)
    except TimeoutError as exc:
        rank, size = rank_and_size(pg)
        raise TimeoutError(
            f"rank {rank} of {size}: {what} did not complete within {pg_timeout} s; a peer is slow, "
            "hung or gone (raise timeout= if saves legitimately take longer)"
        ) from exc
    work.wait()  # already complete: returns at once, or raises the backend's error


# ---------------------------------------------------------------- point to point (replication)


async def private_group(pg: Any) -> Any:
    """A new gloo group over the ranks of ``pg``, so background collectives never interleave
    with the caller's own on ``pg``. Collective: every rank of the default group must call it."""
    import torch.distributed as dist

    ranks = dist.get_process_group_ranks(pg)
    return await anyio.to_thread.run_sync(lambda: dist.new_group(ranks=ranks, backend="gloo"))


def default_group() -> Any:
    """The default (world) group, or ``None`` when no process group is initialised."""
    import torch.distributed as dist

    return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None


def uses_nccl(pg: Any) -> bool:
    """Whether ``pg`` moves CPU tensors with nothing but NCCL (no gloo backend beside it)."""
    import torch.distributed as dist

    backend = str(dist.get_backend(pg)).lower()
    return "nccl" in backend and "gloo" not in backend


def backend_device(pg: Any) -> torch.device:
    """Where ``pg`` moves tensors from: the calling thread's current CUDA device, with its index,
    for an NCCL-only group (call it on the caller's thread: in a worker it would be device 0),
    the CPU for gloo, a group with gloo beside NCCL, and others."""
    return cuda.resolve(torch.device("cuda")) if uses_nccl(pg) else torch.device("cpu")


async def own_group(pg: Any, pg_timeout: float) -> Any:
    """A new group over the ranks of ``pg`` with ``pg``'s backend, for replication: a timed-out
    wait that aborts an NCCL communicator aborts only it, and NCCL (which ignores tags) never
    matches its messages with the caller's own point-to-point traffic on ``pg``.

    Collective over the ranks of ``pg`` only; its first operation (an all-gather every rank
    joins) sets up its communicator at once.
    """
    import torch.distributed as dist

    ranks = dist.get_process_group_ranks(pg)
    backend = dist.get_backend(pg)
    group = await anyio.to_thread.run_sync(
        lambda: dist.new_group(ranks=ranks, backend=backend, use_local_synchronization=True)
    )
    await all_gather_ints(
        group, [0], pg_timeout=pg_timeout, what="setting up the replication group"
    )
    return group


def grouped_exchange(
    pg: Any,
    send: tuple[torch.Tensor, int] | None,
    recv: tuple[torch.Tensor, int] | None,
    tag: int,
    backstop: float,
) -> None:
    """Send ``send[0]`` to group rank ``send[1]`` and receive into ``recv[0]`` from group rank
    ``recv[1]`` as one group of operations (``batch_isend_irecv``), then wait for both.

    NCCL queues a rank pair's traffic on one stream: a send and a receive posted apart, both
    ranks sending first, would wait for each other; grouped they run together. Blocking: a
    worker thread, on the device the tensors are on (``cuda.bound``).
    """
    import torch.distributed as dist

    ops = []
    if send is not None:
        ops.append(dist.P2POp(dist.isend, send[0], group=pg, tag=tag, group_peer=send[1]))
    if recv is not None:
        ops.append(dist.P2POp(dist.irecv, recv[0], group=pg, tag=tag, group_peer=recv[1]))
    for work in dist.batch_isend_irecv(ops) if ops else ():
        wait_work(work, backstop)


def global_rank(pg: Any, group_rank: int) -> int:
    """The default-group rank of ``group_rank`` in ``pg``."""
    import torch.distributed as dist

    return dist.get_global_rank(pg, group_rank)


def post_send(t: torch.Tensor, peer: int, pg: Any, tag: int) -> Any:
    """Post a non-blocking send of ``t`` to group rank ``peer``; return its work."""
    import torch.distributed as dist

    return dist.isend(t, group=pg, group_dst=peer, tag=tag)


def post_recv(t: torch.Tensor, peer: int, pg: Any, tag: int) -> Any:
    """Post a non-blocking receive into ``t`` from group rank ``peer``; return its work."""
    import torch.distributed as dist

    return dist.irecv(t, group=pg, group_src=peer, tag=tag)


def wait_work(work: Any, backstop: float) -> None:
    """Wait for a point-to-point ``work``: ``wait_works`` of it alone."""
    wait_works([work], backstop)


def wait_works(
    works: Sequence[Any], backstop: float, landed: Callable[[int], None] | None = None
) -> None:
    """Wait for point-to-point ``works`` in order, calling ``landed(i)`` (in the waiter thread)
    as work ``i`` completes: blocking, so call it from a worker thread only.

    One waiter thread for all of them: a thread started and joined per ~1 MiB message of a
    frame cost an exchange about a quarter of its throughput on a busy host.

    gloo's p2p works neither report ``is_completed()`` before ``wait()`` nor offer a future
    ("Work::getFuture not implemented"), and a wait cannot be interrupted, so a daemon thread of
    its own waits (at most ``backstop`` seconds per work) while the calling anyio worker checks
    for the cancellation of its call: an abandoned wait (a frozen peer) then frees the worker
    and leaves only a daemon thread, which never keeps the process from exiting. Raises the
    backend's ``RuntimeError`` (a peer gone, the backstop expired). At interpreter exit a
    waiter still waiting is given time to return (``_let_waiters_return``).
    """
    failed: list[BaseException] = []

    def wait() -> None:
        try:
            for i, work in enumerate(works):
                work.wait(timedelta(seconds=backstop))
                if landed is not None:
                    landed(i)
        except BaseException as exc:  # handed to the caller below
            failed.append(exc)
        finally:
            _WAITERS.discard(threading.current_thread())

    waiter = threading.Thread(target=wait, name="aiostage p2p wait", daemon=True)
    _WAITERS.add(waiter)
    try:
        waiter.start()
    except BaseException:
        _WAITERS.discard(waiter)
        raise
    waiter.join(_ABANDON_POLL)
    while waiter.is_alive():  # joined: no thread is left once the wait returned
        _check_cancelled()
        waiter.join(_ABANDON_POLL)
    if failed:
        raise failed[0]


@atexit.register
def _let_waiters_return() -> None:
    """At interpreter exit, wait (``_EXIT_GRACE`` at most) for the ``wait_work`` threads still
    inside a gloo wait to return.

    Exit handlers run before the interpreter finalizes. Once it finalizes, a daemon thread that
    comes back from C++ (a peer exited and its connection closed, a backstop passed) is ended
    with ``pthread_exit`` inside pybind11's GIL guard, whose unwinding aborts the process
    (SIGABRT, "terminate called without an active exception"), and gloo offers no way to
    interrupt the wait. A peer exiting at the same time ends them here instead; only a waiter
    on a peer that stays frozen past the grace is left (its wait returns no sooner than the
    peer thaws or dies).
    """
    deadline = time.monotonic() + _EXIT_GRACE
    for waiter in list(_WAITERS):
        waiter.join(max(0.0, deadline - time.monotonic()))


def _check_cancelled() -> None:
    """Raise the cancellation of the anyio call running this worker thread, if any."""
    with contextlib.suppress(anyio.NoEventLoopError):  # not an anyio worker: nobody abandons it
        anyio.from_thread.check_cancelled()


def foreign_sharded_tensor(
    shards: Sequence[torch.Tensor], metadata: Any, owner: int, pg: Any
) -> Any:
    """A ShardedTensor holding global rank ``owner``'s local ``shards`` (a replica kept on another
    rank), described by the global ``metadata`` (a ``ShardedTensorMetadata``, the same on all
    ranks). Raises ``ValueError`` when the shapes do not match ``owner``'s shards in it.
    """
    from torch.distributed._shard.sharded_tensor import Shard  # type: ignore[attr-defined]
    from torch.distributed._shard.sharded_tensor.api import ShardedTensorBase

    mine = [
        m
        for m in metadata.shards_metadata
        if m.placement is not None and m.placement.rank() == owner
    ]
    if [list(m.shard_sizes) for m in mine] != [list(t.shape) for t in shards]:
        raise ValueError(f"the received shards do not match rank {owner}'s shards")
    out = ShardedTensorBase._init_from_local_shards_and_global_metadata(
        [Shard(t, m) for t, m in zip(shards, mine, strict=True)], metadata
    )
    out._process_group = pg  # type: ignore[attr-defined]
    return out
