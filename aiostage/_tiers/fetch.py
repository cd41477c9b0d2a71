"""Fetching the chosen step: this rank's own sources read in place, a partner's copies sent
over the group as checksummed frames, landing straight in ``into``'s tensors where a message is
one tensor's bytes (no copy after), every byte verified before the fetch counts as done."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import torch

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup, ExceptionGroup

from .._core import dist
from .._core.buffers import allocate
from .._core.tree import Tree, flatten
from .._format.codec import encode_header, step_name
from .._replication.frames import (
    Planned,
    expected_header,
    frame_leaves,
    frame_tensors,
)
from .._replication.transport import Link, recv_frame, send_frame, send_nothing
from .._replication.wire import Limits, limits_like
from .._storage.reader import load
from .._storage.reshard import check_local, into_result
from ..errors import (
    CheckpointCorrupt,
    CheckpointNotFound,
    ReplicationError,
    ReplicationTimeout,
)
from .inplace import InPlace, plan_apart
from .local import LocalTier
from .memory import MemoryTier
from .plan import Choice

__all__ = ["Fetched", "Holdings", "fetch", "limits_for"]

TAG = 0x5A5F


@dataclass(slots=True)
class Holdings:
    """What this rank restores from: its memory tier, local tier, the durable root (read with
    ``pg``'s rank), and the group its partners answer on; ``limits``: what it takes from a
    partner (``limits_for``, worked out while the ranks agree; ``None``: not yet)."""

    rank: int
    pg: Any
    memory: MemoryTier
    local: LocalTier | None
    root: Path
    timeout: float
    limits: Limits | None = None


@dataclass(slots=True)
class Fetched:
    """This rank's fetch: the state (``None`` when it failed: ``reason``), its bytes and time,
    and what it could not give others (``(rank, reason)``)."""

    state: Any = None
    bytes: int = 0
    seconds: float = 0.0
    reason: str = ""
    unable: list[tuple[int, str]] = field(default_factory=list)


async def fetch(have: Holdings, plan: Sequence[Choice], into: Any) -> Fetched:
    """Give every rank whose chosen source this rank holds its state, and take this rank's own
    from its chosen source, at once. Raises ``ReplicationTimeout`` naming a partner that did
    not send or receive within the timeout; a copy that fails verification is reported in the
    result, not raised."""
    out = Fetched()
    device = dist.backend_device(have.pg) if have.pg is not None else torch.device("cpu")
    link = Link(have.pg, device, 2 * have.timeout + 10, tag=TAG)
    try:
        async with anyio.create_task_group() as tg:
            for c in plan:
                if c.holder == have.rank and c.rank != have.rank:
                    tg.start_soon(_give, have, link, c, out)
            tg.start_soon(_take, have, link, plan[have.rank], into, out)
    except ExceptionGroup as group:
        first = _first(group)
        if isinstance(first, ReplicationError):  # one error, the whole group as its cause
            raise type(first)(first.message, peer=first.peer, phase=first.phase) from group
        raise first from None
    return out


def _first(e: BaseException) -> BaseException:
    """A task group's first ``ReplicationError``, else its first error."""
    if isinstance(e, BaseExceptionGroup):
        kids = [_first(x) for x in e.exceptions]
        return next((k for k in kids if isinstance(k, ReplicationError)), kids[0])
    return e


async def _take(have: Holdings, link: Link, c: Choice, into: Any, out: Fetched) -> None:
    began = time.perf_counter()
    try:
        out.state = await _fetch_own(have, link, c, into)
    except ReplicationTimeout:
        raise
    except (CheckpointCorrupt, CheckpointNotFound, ReplicationError) as exc:
        out.reason = str(exc)
        return
    out.seconds = time.perf_counter() - began
    out.bytes = await anyio.to_thread.run_sync(_tensor_bytes, into)


async def _fetch_own(have: Holdings, link: Link, c: Choice, into: Any) -> Any:
    if c.source == "memory":
        kept = have.memory.own
        if kept is None or kept.step != c.step:
            raise CheckpointNotFound(f"step {c.step} is no longer in this rank's memory")
        return await anyio.to_thread.run_sync(_copy_tree, kept.state, into)
    if c.source == "local":
        assert have.local is not None
        path = have.local.policy.own_path(have.rank, c.step)
        return await load(path, into=into)  # type: ignore[arg-type]
    if c.source == "durable":
        return await load(have.root / step_name(c.step), into=into, pg=have.pg)
    limits = have.limits
    if limits is None:
        limits = await anyio.to_thread.run_sync(limits_for, into)
    direct = InPlace(into, c.holder)
    with _deadline(have.timeout, c.holder):
        landed = [
            await recv_frame(
                link, c.holder, _buffer, limits=limits, check=True, direct=direct.targets
            )
        ]
    if landed[0] is None:
        raise ReplicationError(f"could not supply step {c.step}", peer=c.holder, phase="restore")
    where = f"rank {c.holder}'s {c.source} copy of step {c.step}"
    return await anyio.to_thread.run_sync(_copy_frame, landed, c.holder, into, where, direct.landed)


async def _give(have: Holdings, link: Link, c: Choice, out: Fetched) -> None:
    """Send rank ``c.rank`` its state from this rank's memory or disk; a copy that fails
    verification here is reported (``out.unable``) and the rank told there is none."""
    state: Any = None
    planned: Planned | None = None
    if c.source == "peer_memory":
        kept = have.memory.replica
        if kept is not None and (kept.of, kept.step) == (c.rank, c.step):
            state, planned = kept.state, kept.planned
    elif have.local is not None:
        where = have.local.policy.replica_dir(c.rank)
        assert where is not None
        try:
            state = await load(where / step_name(c.step))
        except (CheckpointCorrupt, CheckpointNotFound) as exc:
            out.unable.append((c.rank, str(exc)))
    with _deadline(have.timeout, c.rank):
        if state is None:
            await send_nothing(link, c.rank)
            return
        if planned is None:
            planned = await anyio.to_thread.run_sync(plan_apart, state)
        await send_frame(link, c.rank, planned.header, planned.sources)


class _deadline:
    """``anyio.fail_after(seconds)`` that names ``peer`` (``ReplicationTimeout``)."""

    def __init__(self, seconds: float, peer: int) -> None:
        self._scope = anyio.fail_after(seconds)
        self._seconds, self._peer = seconds, peer

    def __enter__(self) -> None:
        self._scope.__enter__()

    def __exit__(self, et: Any, e: Any, tb: Any) -> None:
        try:
            self._scope.__exit__(et, e, tb)
        except TimeoutError as exc:
            raise ReplicationTimeout(
                f"no progress within {self._seconds} s", peer=self._peer, phase="restore"
            ) from exc


async def _buffer(n: int) -> torch.Tensor:
    """A fresh buffer for a frame about to land: one mapping with transparent huge pages
    where the kernel has them (fewer page faults as the frame lands, a faster unmapping)."""
    buffers = await anyio.to_thread.run_sync(allocate, (("cpu", n),), False, False, True)
    return buffers.flats[0]


def limits_for(into: Any) -> Limits:
    """Twice ``into``'s size, plus slack: what a frame for this rank may be (worker thread)."""
    header = expected_header(flatten(into))
    return limits_like(encode_header(header), header.data_bytes, "into=")


def _copy_views(
    root: Any,
    leaves: Sequence[Any],
    views: Sequence[torch.Tensor],
    into: Any,
    where: str,
    done: frozenset[int] = frozenset(),
) -> Any:
    """Check ``into`` against the received tensors, then copy them in, but for the records
    ``done`` (landed in place already) (worker thread)."""
    paths = [leaf.path for leaf in leaves]
    records = [_Record(tuple(v.shape), v.dtype) for v in views]
    targets = check_local(flatten(into).leaves, paths, records, where)  # type: ignore[arg-type]
    with torch.no_grad():
        for i, (dst, src) in enumerate(zip(targets, views, strict=True)):
            if i not in done:
                dst.copy_(src)
    return into_result(root, paths, into)


def _copy_frame(
    landed: list[Any], holder: int, into: Any, where: str, done: frozenset[int] = frozenset()
) -> Any:
    """``_copy_views`` from the one frame in ``landed``, taken out of it so that its buffer
    (a GiB takes a tenth of a second to unmap) is freed here, not on the event loop (worker
    thread)."""
    header, data, _ = landed.pop()
    root, leaves = frame_leaves(header, holder)
    return _copy_views(root, leaves, frame_tensors(header, data), into, where, done)


def _copy_tree(state: Any, into: Any) -> Any:
    """``_copy_views`` from a state dict in this process's memory (worker thread)."""
    tree: Tree = flatten(state)
    views = [leaf.data for leaf in tree.leaves]
    return _copy_views(tree.root, tree.leaves, views, into, "this rank's copy in memory")


@dataclass(frozen=True, slots=True)
class _Record:
    """What ``check_local`` compares: a saved tensor's shape and dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def _tensor_bytes(state: Any) -> int:
    return sum(leaf.data.nbytes for leaf in flatten(state).leaves)
