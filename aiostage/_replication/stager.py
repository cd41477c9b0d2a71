"""``ReplicationStager``: keep a copy of a partner rank's state in memory and on local disk.

``stage`` lays this rank's state dict out as a data file's header and entries (``frames``; from
a ``DefaultStager`` copy where it cannot be sent from its own memory), and in one task group
sends it to the partner and receives the state of the rank it protects (``transport``), both
under one timeout (``guard``). The received replica lands in reused buffers (``held``) and is
persisted in the background (``persist``). ``recover`` is the collective that gives a restarted
rank its state back (``recovery``). See ``docs/replication.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import anyio
import anyio.abc
import anyio.lowlevel

from .._core import dist
from .._core.timeouts import DEFAULT_TIMEOUT, seconds
from .._core.tree import Tree, flatten
from .._format.codec import Header, Source, encode_header
from .._staging import DefaultStager, StagingOptions
from .._storage.locate import local_dir
from ..errors import ReplicationError, UsageError
from .frames import Frame, Planned, expected_header, plan_cpu_frame, plan_frame, rebuild
from .grouped import exchange_grouped
from .guard import Breaker
from .held import HeldReplicas
from .recovery import agree, swap
from .replicas import ReplicaWrites
from .transport import Link, encoded, partners, recv_frame, send_frame
from .wire import Limits, limits_like, limits_of, unknown_limits

__all__ = ["ReplicationStager", "ReplicationStatistics"]

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class ReplicationStatistics:
    """Counters: rounds done, bytes each way, receive buffers allocated, last round's phases."""

    rounds: int
    bytes_sent: int
    bytes_received: int
    receive_allocations: int
    last_snapshot_seconds: float
    last_exchange_seconds: float


def _limits_like_tree(tree: Tree) -> Limits:
    """The limits for a state like the flattened ``like=`` of ``recover`` (worker thread)."""
    header = expected_header(tree)
    return limits_like(encode_header(header), header.data_bytes, "like=")


class ReplicationStager:
    """Replicate each rank's state dict to a partner rank; implements ``AsyncStager``.

    ``replica = await stager.stage(sd)`` sends this rank's state to its partner and returns the
    state received from the rank it protects (DTensors and ShardedTensors rebuilt with this
    rank's own metadata of the same key, holding the peer's local shards). ``release(replica)``
    hands its buffer back. CPU tensors are sent from their own memory (do not modify them until
    ``stage`` returns; ``copy_cpu=True`` snapshots them first); others are staged to the CPU
    first (``DefaultStager``). With ``storage_dir`` (use ``async with``), each received replica is
    also written atomically to ``storage_dir/replica_of_rank_NNNNN`` in the background;
    ``await stager.persisted()`` waits for that. ``await stager.recover(lost=...)`` brings a
    restarted rank's state back (a collective, always checksummed). ``pg=None`` uses the default
    group; without one (or in a group of one) ``stage`` returns a staged copy, no network.

    Checksums are end to end: with ``verify=True`` (on every rank) the sender hashes each entry
    (xxh3_64) as it sends it, and the replica keeps those digests. They are checked where the
    replica is used: as it is written to ``storage_dir`` (``persisted()`` raises on a mismatch)
    and by the rank that gets its state back in ``recover``, which covers the first transfer,
    the time in the partner's memory and the way back. ``verify_on_arrival=True`` also hashes
    what lands during ``stage`` (more CPU in every exchange, an earlier error). ``verify=False``
    sends no digests; ``recover`` then hashes the replica it gives back.

    ``timeout`` (seconds or ``timedelta``, default 600) is the longest any one wait for another
    rank may take (a collective, a send or a receive); past it ``ReplicationTimeout``.

    A peer's frame is refused (``ReplicationError``, phase ``"header"``) before anything is
    allocated for it when it is larger than this rank expects: by default twice this rank's own
    state plus slack (in ``recover``: twice ``like``, or this host's memory without it);
    ``max_bytes`` sets the bound instead (partners whose states differ in size, e.g. pipeline
    stages).

    Blocks on nothing. Raises ``ReplicationError`` naming the peer rank and phase,
    ``ReplicationTimeout`` after ``timeout`` (the stager is then broken: recreate the process
    group and the stager), ``UnsupportedValueError`` for a leaf that is not JSON,
    ``UsageError`` when the ranks' ``partner=`` choices do not pair up (checked once) or for a
    ``storage_dir`` that is a URL (replicas stay on a local disk), and
    ``ValueError`` for a bad ``timeout`` or ``max_bytes``.
    """

    def __init__(
        self,
        pg: Any = None,
        *,
        timeout: float | timedelta = DEFAULT_TIMEOUT,
        storage_dir: str | Path | None = None,
        partner: int | None = None,
        copy_cpu: bool = False,
        verify: bool = True,
        verify_on_arrival: bool = False,
        max_bytes: int | None = None,
    ) -> None:
        self._timeout = seconds(timeout)
        if max_bytes is not None and (type(max_bytes) is not int or max_bytes < 1):
            raise ValueError(f"max_bytes must be a positive number of bytes, got {max_bytes!r}")
        self._max_bytes = max_bytes
        self._expected: tuple[bytes, Limits] | None = None  # limits for peers like our header
        self._pg = pg if pg is not None else dist.default_group()
        self._rank, self._world = dist.rank_and_size(self._pg) if self._pg is not None else (0, 1)
        self._send_to, self._recv_from = partners(self._rank, self._world, partner)
        self._paired = partner is None  # a chosen partner is checked against the others' once
        self._dir = local_dir(storage_dir, "storage_dir") if storage_dir is not None else None
        self._copy_cpu, self._verify = copy_cpu, verify
        self._on_arrival = verify and verify_on_arrival
        self._link_: Link | None = None
        self._local = DefaultStager(StagingOptions(pool_size=1 if self._world > 1 else 2))
        self._held = HeldReplicas()
        self._writes = self._replica_writes()
        self._lock = anyio.Lock()
        self._breaker = Breaker(self._rank, self._timeout)
        self._closed = False
        self._tg: anyio.abc.TaskGroup | None = None
        self._stats = {"rounds": 0, "bytes_sent": 0, "bytes_received": 0}
        self._seconds = (0.0, 0.0)

    @property
    def send_to(self) -> int:
        """The group rank this rank's state goes to (its partner)."""
        return self._send_to

    @property
    def receive_from(self) -> int:
        """The group rank whose state this rank keeps (the rank it protects)."""
        return self._recv_from

    def _link(self) -> Link:
        assert self._link_ is not None, "stage() and recover() make the link first"
        return self._link_

    async def _make_link(self) -> Link:
        """The link, made by the first ``stage`` or ``recover`` (every rank calls it). On an
        NCCL group it runs over a dedicated group of the same ranks (``dist.own_group``): a
        timed-out wait aborts only that group, and the caller's own point-to-point messages on
        ``pg`` (NCCL ignores tags) never meet the frames; frames move as grouped steps
        (``grouped``), on the caller's current device, noted here on the caller's thread."""
        if self._link_ is None:
            pg = self._pg
            if dist.uses_nccl(pg):
                async with self._breaker.guard(self._recv_from, "setup"):
                    pg = await dist.own_group(pg, self._timeout)
            device = dist.backend_device(pg)
            self._link_ = Link(pg, device, 2 * self._timeout + 10, verify=self._verify)
        return self._link_

    def storage_path(self, peer: int) -> Path | None:
        """Where the replica of group rank ``peer`` is persisted (``None`` without storage)."""
        return self._dir / f"replica_of_rank_{peer:05d}" if self._dir is not None else None

    def _replica_writes(self) -> ReplicaWrites | None:
        """The background writer of the protected rank's replicas (``None`` without storage)."""
        target = self.storage_path(self._recv_from)
        if target is None:
            return None
        meta = {"replica_of": self._recv_from, "rank": self._rank, "world_size": self._world}
        return ReplicaWrites(target, self._recv_from, meta, self._held.buffers)

    def statistics(self) -> ReplicationStatistics:
        """Counters since creation."""
        return ReplicationStatistics(
            **self._stats, receive_allocations=self._held.buffers.allocations,
            last_snapshot_seconds=self._seconds[0], last_exchange_seconds=self._seconds[1],
        )  # fmt: skip

    async def __aenter__(self) -> ReplicationStager:
        self._check_usable()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        tg, self._tg = self._tg, None
        try:
            if tg is not None:
                if e is not None:  # the body failed: abandon a background persist
                    tg.cancel_scope.cancel()
                await tg.__aexit__(None, None, None)
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Wait for a background persist, then drop every buffer; idempotent."""
        if self._writes is not None:
            await self._writes.wait()
        self._closed = True
        self._held.clear()
        await self._local.aclose()

    async def stage(self, state_dict: _T) -> _T:
        """Send ``state_dict`` to the partner; return the replica received from the protected
        rank (leased: ``release`` it); see the class docstring for what it raises."""
        self._check_usable()
        if self._world == 1:
            return await self._local.stage(state_dict)
        if self._dir is not None and self._tg is None:
            raise UsageError("with storage_dir, use `async with ReplicationStager(...)`")
        async with self._lock:
            if self._writes is not None:  # one replica write in flight (backpressure)
                await self._writes.wait()
            await self._make_link()
            if not self._paired:
                await self._check_pairs()
            began = time.perf_counter()
            async with self._planned(state_dict) as planned:
                snapshot = time.perf_counter()
                limits = await self._limits_like(planned.header)
                frame = await self._exchange(planned.header, planned.sources, limits)
            self._seconds = (snapshot - began, time.perf_counter() - snapshot)
            replica: _T = await self._lease(frame, planned.tree, self._recv_from, self._recv_from)
            self._held.keep_latest(frame)
            if self._writes is not None and self._tg is not None:
                self._writes.start(self._tg, frame)
            return replica

    @contextlib.asynccontextmanager
    async def _planned(self, state_dict: Any) -> AsyncIterator[Planned]:
        """``state_dict`` laid out as a frame: sent from its own memory where it can be, else
        from a staged CPU copy, released when the block ends."""
        planned = await anyio.to_thread.run_sync(plan_frame, state_dict, not self._copy_cpu)
        if isinstance(planned, Planned):
            yield planned
            return
        staged = await self._local.stage(state_dict)
        try:
            yield await anyio.to_thread.run_sync(plan_cpu_frame, staged)
        finally:
            self._local.release(staged)

    def release(self, staged: Any) -> None:
        """Hand back the buffer of a replica ``stage`` or ``recover`` returned (once)."""
        if self._world == 1:
            self._local.release(staged)
            return
        self._held.release(staged)

    def _check_usable(self) -> None:
        self._breaker.check()
        if self._closed:
            raise UsageError("this ReplicationStager is closed; create a new one")

    async def _limits_like(self, header: Header) -> Limits:
        """What this rank takes from a peer whose state is like ``header``'s (``max_bytes`` when
        given), worked out again only when the layout changes."""
        if self._max_bytes is not None:
            await anyio.lowlevel.checkpoint()
            return limits_of(self._max_bytes)
        raw = await anyio.to_thread.run_sync(encoded, self._link(), header)
        if self._expected is None or self._expected[0] is not raw:
            limits = await anyio.to_thread.run_sync(limits_like, raw, header.data_bytes)
            self._expected = (raw, limits)
        return self._expected[1]

    async def _limits_back(self, template: Tree | None) -> Limits:
        """What a rank that lost its state takes back in ``recover``: ``max_bytes``, else twice
        ``like`` (``template``), else twice what this stager last sent, else the host's memory."""
        if self._max_bytes is not None:
            await anyio.lowlevel.checkpoint()
            return limits_of(self._max_bytes)
        if template is not None:
            return await anyio.to_thread.run_sync(_limits_like_tree, template)
        sent = self._link().sent
        if sent is not None:
            return await anyio.to_thread.run_sync(limits_like, sent[1], sent[0].data_bytes)
        await anyio.lowlevel.checkpoint()
        return unknown_limits()

    async def _exchange(self, header: Header, sources: list[Source], limits: Limits) -> Frame:
        """Send to the partner and receive from the protected rank at once, under the timeout."""
        link, got = self._link(), []

        async def receive() -> None:
            frame = await recv_frame(
                link,
                self._recv_from,
                self._held.receive_into,
                limits=limits,
                check=self._on_arrival,
            )
            got.append(frame)

        async with self._breaker.guard(self._recv_from, "exchange"):
            if dist.uses_nccl(link.pg):  # one thread of grouped steps (see ``grouped``)
                got.append(
                    await exchange_grouped(
                        link, self._send_to, header, sources, self._recv_from,
                        self._held.receive_into, limits=limits, check=self._on_arrival,
                    )
                )  # fmt: skip
            else:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(send_frame, link, self._send_to, header, sources)
                    tg.start_soon(receive)
        if got[0] is None:
            raise ReplicationError("sent no state", peer=self._recv_from, phase="header")
        received, data, digests = got[0]
        self._stats["bytes_sent"] += header.data_bytes
        self._stats["bytes_received"] += received.data_bytes
        self._stats["rounds"] += 1
        return Frame(received, data, digests if self._verify else None)

    async def _check_pairs(self) -> None:
        """With ``partner=``: check that every rank's choice pairs up (one all-gather), so a
        mismatch is a clear error on every rank, not a timeout."""
        async with self._breaker.guard(self._recv_from, "partners"):
            rows = await dist.all_gather_ints(
                self._pg, [self._send_to, self._recv_from], pg_timeout=self._timeout,
                what="replication partner check",
            )  # fmt: skip
        for rank, (to, _) in enumerate(rows):
            if rows[to][1] != rank:
                raise UsageError(
                    f"partner= does not pair up: rank {rank} sends to rank {to}, which expects "
                    f"rank {rows[to][1]}; give each pair of ranks each other as partner"
                )
        self._paired = True

    async def _lease(self, frame: Frame, tree: Tree | None, sender: int, owner: int) -> Any:
        """The state dict of ``frame`` as views into its buffer, leased to the caller.

        ``sender``: the group rank it came from (named in errors); ``owner``: the group rank
        whose state it is (its DTensors and ShardedTensors are rebuilt as that rank's shards).
        """
        try:
            where = (dist.global_rank(self._pg, owner), self._pg)
            out = await anyio.to_thread.run_sync(
                rebuild, frame.header, frame.data, tree, sender, where
            )
        except BaseException:
            self._held.unused(frame)
            raise
        self._held.lease(out, frame)
        return out

    async def persisted(self) -> None:
        """Wait until the latest received replica is on disk (at once without ``storage_dir``).

        Raises ``ReplicationError`` if writing it failed (phase ``"persist"``) or its bytes do not
        match the digests the sender computed (phase ``"verify"``; nothing was written).
        """
        if self._writes is None:
            await anyio.lowlevel.checkpoint()
            return
        await self._writes.check()

    async def recover(self, *, lost: bool, like: Any = None) -> Any:
        """Give every rank that lost its state that state back; every rank of the group calls it.

        ``lost``: whether this rank lost its state (a restart). ``like``: on such a rank, a state
        dict of the same structure (e.g. a freshly built model's), whose DTensors and
        ShardedTensors give the recovered tensors their wrappers (without it they come back as
        local tensors). The partner sends the replica it holds in memory, else the one it
        persisted in ``storage_dir`` (checksums verified either way); a lost rank takes a state
        of at most ``max_bytes``, else twice ``like``'s size, else this host's memory. Returns the
        recovered state (leased: ``release`` it) where ``lost``, else ``None``. Raises
        ``ReplicationError`` (phase ``"recover"``) when no replica of a lost rank exists, phase
        ``"header"`` for a state over those bounds or malformed, and ``ReplicationTimeout``.
        """
        self._check_usable()
        if self._world == 1:
            if lost:
                raise ReplicationError("no peer holds this rank's state", phase="recover")
            return None
        async with self._lock:
            await self._make_link()
            async with self._breaker.guard(self._recv_from, "recover"):
                flags = await agree(self._pg, lost, self._timeout)
            template = await anyio.to_thread.run_sync(flatten, like) if like is not None else None
            return await self._swap(flags[self._recv_from], lost, template)

    async def _swap(self, give: bool, lost: bool, template: Tree | None) -> Any:
        """Send the protected rank its replica (if it lost it); receive ours (if we did)."""
        link = dataclasses.replace(self._link(), verify=True)
        peer = self._send_to if lost else self._recv_from
        limits = await self._limits_back(template)
        async with self._breaker.guard(peer, "recover"):
            frame = await swap(
                link,
                give_to=self._recv_from if give else None,
                take_from=self._send_to if lost else None,
                buffer=self._held.receive_into,
                limits=limits,
                latest=self._held.latest,
                stored=self.storage_path(self._recv_from),
            )
        if not lost:
            return None
        if frame is None:
            raise ReplicationError(
                "holds no replica of this rank (none in memory, none in its storage_dir)",
                peer=self._send_to,
                phase="recover",
            )
        return await self._lease(frame, template, self._send_to, self._rank)
