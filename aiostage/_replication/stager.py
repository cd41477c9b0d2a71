"""``ReplicationStager``: keep a copy of a partner rank's state in memory and on local disk.

``stage`` snapshots this rank's state dict (``DefaultStager``), lays it out as a data file's
header and entries (``_layout.plan_file``), and in one task group sends it to the partner and
receives the state of the rank it protects (``_transport``), both under one timeout. The received
replica lands in reused buffers and is persisted in the background with the durable writer.
``recover`` is the collective that gives a restarted rank its state back. See
``docs/replication.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

import anyio
import anyio.lowlevel
import torch

from .._core import dist
from .._core.tree import Tree, flatten
from .._format.codec import MANIFEST, Header, Source
from .._staging import DefaultStager, StagingOptions
from .._storage import localfs
from .._storage.reader import load
from ..errors import CheckpointCorrupt, ReplicationError, ReplicationTimeout, UsageError
from .frames import frame_sources, outgoing, rebuild
from .receive import ReceiveBuffers
from .replicas import write_replica
from .transport import Link, partners, recv_frame, send_frame, send_nothing

__all__ = ["ReplicationStager", "ReplicationStatistics"]

_T = TypeVar("_T")


_MAX_DATA = 1 << 42


#: a received state: its header, its bytes, and the digests its sender computed (if it did)
_Frame = tuple[Header, torch.Tensor, Sequence[int] | None]


@dataclass(frozen=True, slots=True)
class ReplicationStatistics:
    """Counters: rounds done, bytes each way, receive buffers allocated, last round's phases."""

    rounds: int
    bytes_sent: int
    bytes_received: int
    receive_allocations: int
    last_snapshot_seconds: float
    last_exchange_seconds: float


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

    Blocks on nothing. Raises ``ReplicationError`` naming the peer rank and phase,
    ``ReplicationTimeout`` after ``timeout`` (the stager is then broken: recreate the process
    group and the stager), ``UnsupportedValueError`` for a leaf that is not JSON, and
    ``UsageError`` when the ranks' ``partner=`` choices do not pair up (checked once).
    """

    def __init__(
        self,
        pg: Any = None,
        *,
        timeout: timedelta | float = timedelta(minutes=5),
        storage_dir: str | Path | None = None,
        partner: int | None = None,
        copy_cpu: bool = False,
        verify: bool = True,
        verify_on_arrival: bool = False,
    ) -> None:
        self._timeout = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
        if not (self._timeout > 0 and math.isfinite(self._timeout)):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
        self._pg = pg if pg is not None else dist.default_group()
        self._rank, self._world = dist.rank_and_size(self._pg) if self._pg is not None else (0, 1)
        self._send_to, self._recv_from = partners(self._rank, self._world, partner)
        self._paired = partner is None  # a chosen partner is checked against the others' once
        self._dir = Path(storage_dir) if storage_dir is not None else None
        self._copy_cpu, self._verify = copy_cpu, verify
        self._on_arrival = verify and verify_on_arrival
        self._link_: Link | None = None
        self._local = DefaultStager(StagingOptions(pool_size=1 if self._world > 1 else 2))
        self._arenas = ReceiveBuffers()
        self._leases: dict[int, tuple[Any, torch.Tensor]] = {}
        self._latest: _Frame | None = None
        self._lock = anyio.Lock()
        self._broken: str | None = None
        self._closed = False
        self._tg: anyio.abc.TaskGroup | None = None
        self._persisting: anyio.Event | None = None
        self._persist_error: BaseException | None = None
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
        if self._link_ is None:
            device = dist.backend_device(self._pg)
            self._link_ = Link(self._pg, device, 2 * self._timeout + 10, verify=self._verify)
        return self._link_

    def storage_path(self, peer: int) -> Path | None:
        """Where the replica of group rank ``peer`` is persisted (``None`` without storage)."""
        return self._dir / f"replica_of_rank_{peer:05d}" if self._dir is not None else None

    def statistics(self) -> ReplicationStatistics:
        """Counters since creation."""
        return ReplicationStatistics(
            **self._stats, receive_allocations=self._arenas.allocations,
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
        if self._persisting is not None:
            await self._persisting.wait()
        self._closed = True
        self._latest = None
        self._leases.clear()
        self._arenas.clear()
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
            if self._persisting is not None:  # one replica write in flight (backpressure)
                await self._persisting.wait()
            if not self._paired:
                await self._check_pairs()
            began = time.perf_counter()
            planned = await anyio.to_thread.run_sync(outgoing, state_dict, not self._copy_cpu)
            staged = None
            if planned is None:
                staged = await self._local.stage(state_dict)
            try:
                if staged is not None:
                    planned = await anyio.to_thread.run_sync(outgoing, staged, True)
                assert planned is not None
                tree, header, sources = planned
                snapshot = time.perf_counter()
                frame = await self._exchange(header, sources)
            finally:
                if staged is not None:
                    self._local.release(staged)
            self._seconds = (snapshot - began, time.perf_counter() - snapshot)
            replica = await self._accept(frame, tree, "latest")
            self._persist_soon(frame)
            return replica  # type: ignore[no-any-return]

    def release(self, staged: Any) -> None:
        """Hand back the buffer of a replica ``stage`` or ``recover`` returned (once)."""
        if self._world == 1:
            self._local.release(staged)
            return
        entry = self._leases.pop(id(staged), None)
        if entry is None or entry[0] is not staged:
            raise UsageError("release() got an object this ReplicationStager did not return")
        self._arenas.drop(entry[1], "leased")

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise ReplicationError(
                f"this stager is broken ({self._broken}); a timed-out or failed exchange cannot "
                "be withdrawn from the process group: recreate the group and the stager",
                phase="broken",
            )
        if self._closed:
            raise UsageError("this ReplicationStager is closed; create a new one")

    async def _exchange(self, header: Header, sources: list[Source]) -> _Frame:
        """Send to the partner and receive from the protected rank at once, under the timeout."""
        link, got = self._link(), []

        async def receive() -> None:
            frame = await recv_frame(
                link, self._recv_from, self._buffer, max_data=_MAX_DATA, check=self._on_arrival
            )
            got.append(frame)

        async with self._guard(self._recv_from, "exchange"), anyio.create_task_group() as tg:
            tg.start_soon(send_frame, link, self._send_to, header, sources)
            tg.start_soon(receive)
        if got[0] is None:
            raise ReplicationError("sent no state", peer=self._recv_from, phase="header")
        self._stats["bytes_sent"] += header.data_bytes
        self._stats["bytes_received"] += got[0][0].data_bytes
        self._stats["rounds"] += 1
        header, data, digests = got[0]
        return header, data, digests if self._verify else None

    async def _check_pairs(self) -> None:
        """With ``partner=``: check that every rank's choice pairs up (one all-gather), so a
        mismatch is a clear error on every rank, not a timeout."""
        async with self._guard(self._recv_from, "partners"):
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

    async def _buffer(self, n: int) -> torch.Tensor:
        return await self._arenas.get(n, "receiving")

    @contextlib.asynccontextmanager
    async def _guard(self, peer: int, phase: str) -> AsyncIterator[None]:
        """Run under the timeout; a timeout or a failure breaks the stager (the group is unusable)."""
        try:
            with anyio.fail_after(self._timeout):
                yield
        except Exception as exc:
            first = _first_error(exc)
            self._broken = f"rank {self._rank}: {phase} failed: {first}"
            if isinstance(first, TimeoutError):
                raise ReplicationTimeout(
                    f"no progress within {self._timeout} s; the peer is slow, hung or gone",
                    peer=peer,
                    phase=phase,
                ) from exc
            if first is exc and isinstance(exc, ReplicationError):
                raise
            p, ph = (
                (first.peer, first.phase) if isinstance(first, ReplicationError) else (peer, phase)
            )
            raise ReplicationError(str(first), peer=p, phase=ph) from exc

    async def _accept(self, frame: _Frame, tree: Tree | None, keep: str) -> Any:
        """The state dict of ``frame`` as views into its buffer, leased to the caller."""
        header, data, _ = frame
        sender = self._recv_from if keep == "latest" else self._send_to
        owner = self._recv_from if keep == "latest" else self._rank
        try:
            where = (dist.global_rank(self._pg, owner), self._pg)
            out = await anyio.to_thread.run_sync(rebuild, header, data, tree, sender, where)
        except BaseException:
            self._arenas.drop(data, "receiving")
            raise
        if keep == "latest":
            if self._latest is not None:
                self._arenas.drop(self._latest[1], "latest")
            self._latest = frame
            self._arenas.hold(data, "latest")
        self._arenas.hold(data, "leased")
        self._arenas.drop(data, "receiving")
        self._leases[id(out)] = (out, data)
        return out

    def _persist_soon(self, frame: _Frame) -> None:
        if self._tg is None or self._dir is None:
            return
        self._arenas.hold(frame[1], "persisting")
        done = self._persisting = anyio.Event()
        self._tg.start_soon(self._persist, frame, self._recv_from, done)

    async def _persist(self, frame: _Frame, peer: int, done: Any) -> None:
        """Write ``frame`` as a checkpoint directory and swap it in atomically, its bytes checked
        against the sender's digests on the way (background)."""
        header, data, digests = frame
        target = self.storage_path(peer)
        assert target is not None
        meta = {"replica_of": peer, "rank": self._rank, "world_size": self._world}
        try:
            await write_replica(target, header, data, meta, digests)
            self._persist_error = None
        except Exception as exc:
            self._persist_error = exc
        finally:
            self._arenas.drop(data, "persisting")
            done.set()

    async def persisted(self) -> None:
        """Wait until the latest received replica is on disk (at once without ``storage_dir``).

        Raises ``ReplicationError`` if writing it failed (phase ``"persist"``) or its bytes do not
        match the digests the sender computed (phase ``"verify"``; nothing was written).
        """
        if self._persisting is not None:
            await self._persisting.wait()
        else:
            await anyio.lowlevel.checkpoint()
        error = self._persist_error
        if error is not None:
            phase = "verify" if isinstance(error, CheckpointCorrupt) else "persist"
            raise ReplicationError(
                f"persisting the replica failed: {error}", peer=self._recv_from, phase=phase
            ) from error

    async def recover(self, *, lost: bool, like: Any = None) -> Any:
        """Give every rank that lost its state that state back; every rank of the group calls it.

        ``lost``: whether this rank lost its state (a restart). ``like``: on such a rank, a state
        dict of the same structure (e.g. a freshly built model's), whose DTensors and
        ShardedTensors give the recovered tensors their wrappers (without it they come back as
        local tensors). The partner sends the replica it holds in memory, else the one it
        persisted in ``storage_dir`` (checksums verified either way). Returns the recovered state
        (leased: ``release`` it) where ``lost``, else ``None``. Raises ``ReplicationError`` (phase
        ``"recover"``) when no replica of a lost rank exists, and ``ReplicationTimeout``.
        """
        self._check_usable()
        if self._world == 1:
            if lost:
                raise ReplicationError("no peer holds this rank's state", phase="recover")
            return None
        async with self._lock:
            flags = await self._agree(lost)
            template = await anyio.to_thread.run_sync(flatten, like) if like is not None else None
            return await self._swap(flags[self._recv_from] == 1, lost, template)

    async def _agree(self, lost: bool) -> list[int]:
        async with self._guard(self._recv_from, "recover"):
            rows = await dist.all_gather_ints(
                self._pg, [int(lost)], pg_timeout=self._timeout, what="replication recovery"
            )
        return [r[0] for r in rows]

    async def _swap(self, give: bool, lost: bool, template: Tree | None) -> Any:
        """Send the protected rank its replica (if it lost it); receive ours (if we did)."""
        link, got = dataclasses.replace(self._link(), verify=True), []

        async def receive() -> None:
            frame = await recv_frame(link, self._send_to, self._buffer, max_data=_MAX_DATA)
            got.append(frame)

        peer = self._send_to if lost else self._recv_from
        async with self._guard(peer, "recover"), anyio.create_task_group() as tg:
            if give:
                tg.start_soon(self._give, link)
            if lost:
                tg.start_soon(receive)
        if not lost:
            return None
        if got[0] is None:
            raise ReplicationError(
                "holds no replica of this rank (none in memory, none in its storage_dir)",
                peer=self._send_to,
                phase="recover",
            )
        return await self._accept(got[0], template, "recovered")

    async def _give(self, link: Link) -> None:
        frame = await self._held_replica()
        if frame is None:
            await send_nothing(link, self._recv_from)
        else:
            await send_frame(link, self._recv_from, *frame)

    async def _held_replica(self) -> tuple[Header, list[Source], Sequence[int] | None] | None:
        """The replica of the protected rank: the one in memory (with its owner's digests, so
        the owner checks it end to end), else the persisted file (checked as it is read)."""
        if self._latest is not None:
            header, data, digests = self._latest
            return header, frame_sources(header, data), digests
        path = self.storage_path(self._recv_from)
        if path is None or await localfs.path_kind(path, MANIFEST) == "absent":
            return None
        state = await load(path)
        planned = await anyio.to_thread.run_sync(outgoing, state, True)
        assert planned is not None  # load returns CPU tensors
        return planned[1], planned[2], None


def _first_error(e: BaseException) -> BaseException:
    if isinstance(e, BaseExceptionGroup):
        kids = [_first_error(x) for x in e.exceptions]
        return next((k for k in kids if isinstance(k, ReplicationError)), kids[0])
    return e
