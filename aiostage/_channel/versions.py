"""The publisher's staged versions: two pooled buffers, in private or in shared memory.

Private memory: the frame's data region in one of two flat buffers, prepared first (planned, a
buffer leased) and written afterwards (``fill``) while its frames are already being sent from
it (``Snapshot.outgoing``: each message waits for the entries it carries); a state dict not in
CPU memory is staged whole by a ``DefaultStager`` (``pool_size=2``) and sent from its copy.
Shared memory (the same-host fast path): the frame's data region itself, written into one of
two named shared-memory regions (``shm``) that subscribers on this host map and copy from; the
frames sent to other subscribers come from the same region. With ``verify``, a buffer written
here has its entries hashed as they are copied (one read of the bytes); a version staged by the
``DefaultStager`` is hashed by its first send. A buffer an abandoned send may still read is
poisoned: never reused, and staging moves on to a fresh one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import torch

from .._core.buffers import allocate, let_go
from .._format.codec import Header, Source
from .._replication.frames import NeedsStaging, frame_sources, plan_cpu_frame, plan_frame
from .._staging import DefaultStager, StagingOptions
from .._storage.digests import source_digests
from .fill import Fill, Filling
from .shm import Region

__all__ = ["Flat", "Snapshot", "Snapshots"]


@dataclass(eq=False)
class Flat:
    """A private flat byte buffer of the pool (a version's data region)."""

    data: torch.Tensor
    busy: bool = True

    @property
    def nbytes(self) -> int:
        """Its size in bytes."""
        return self.data.numel()

    @classmethod
    def create(cls, nbytes: int) -> Flat:
        """A new buffer (blocking: call it from a worker thread)."""
        return cls(allocate((("cpu", max(nbytes, 1)),), False, False, True).flats[0])


@dataclass(eq=False)
class Snapshot:
    """One staged version: its frame, its buffer, and how many sends still read it."""

    version: int
    seq: int
    header: Header
    sources: list[Source]
    staged: Any = None  # the DefaultStager copy (private memory, not on the CPU)
    stager: DefaultStager | None = None
    region: Region | None = None  # the shared-memory region (fast path)
    flat: Flat | None = None  # the private buffer (private memory, on the CPU)
    fill: Fill | None = None  # the copy into ``flat``, while it runs
    written: anyio.Event = field(default_factory=anyio.Event)
    digests: list[int] | None = None  # per entry, hashed once for every subscriber
    hashing: anyio.Lock = field(default_factory=anyio.Lock)
    users: int = 0
    poisoned: bool = False
    released: bool = False

    @property
    def outgoing(self) -> Sequence[Source]:
        """What its frames are sent from: its sources, read once written (worker threads)."""
        if self.fill is None or self.fill.finished:
            return self.sources
        return Filling(self.fill, self.sources)


@dataclass(eq=False)
class Snapshots:
    """Stage versions into a pool of two buffers (``shared``: shared-memory regions); with
    ``verify``, each version's entries are hashed once, for all its frames."""

    shared: bool
    verify: bool = True
    stager: DefaultStager = field(
        default_factory=lambda: DefaultStager(StagingOptions(pool_size=2, lease_warning=None))
    )
    retired: list[DefaultStager] = field(default_factory=list)
    regions: list[Region | Flat] = field(default_factory=list)
    changed: anyio.Event = field(default_factory=anyio.Event)

    async def stage(self, state_dict: Any, version: int, seq: int) -> Snapshot:
        """Copy ``state_dict`` into a free buffer (waiting for one while both are in use)."""
        snap = await self.prepare(state_dict, version, seq)
        await self.fill(snap)
        return snap

    async def prepare(self, state_dict: Any, version: int, seq: int) -> Snapshot:
        """Plan ``state_dict`` as a version and lease its buffer (waiting for one while both
        are in use); a CPU state dict in private memory is copied in by ``fill`` afterwards
        (the caller must not change it before), anything else is copied here."""
        if self.shared:
            return await self._stage_shared(state_dict, version, seq)
        planned = await anyio.to_thread.run_sync(plan_frame, state_dict, True)
        if isinstance(planned, NeedsStaging):
            return await self._stage_private(state_dict, version, seq)
        header = planned.header
        flat = await self._lease(header.data_bytes, Flat.create, Flat)
        assert isinstance(flat, Flat)
        data = flat.data[: header.data_bytes]
        snap = Snapshot(version, seq, header, frame_sources(header, data), flat=flat)
        snap.fill = Fill(header, planned.sources, data, hashing=self.verify)
        return snap

    async def fill(self, snap: Snapshot) -> None:
        """Copy ``snap``'s state dict into its buffer, if ``prepare`` left that to do; shielded
        (a copy in memory, bounded), so sends that already began from it always end."""
        fill = snap.fill
        try:
            if fill is not None and not fill.finished:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(fill.run)
            else:
                await anyio.lowlevel.checkpoint()
        finally:
            if fill is not None:
                fill.abandon("the publisher stopped copying this version")
                snap.digests = fill.digests  # hashed while copied (``verify``)
            snap.written.set()

    async def _stage_shared(self, state_dict: Any, version: int, seq: int) -> Snapshot:
        planned = await anyio.to_thread.run_sync(plan_frame, state_dict, True)
        staged = None
        if isinstance(planned, NeedsStaging):  # stage to the CPU first, then into the region
            staged = await self.stager.stage(state_dict)
        try:
            if staged is not None:
                planned = await anyio.to_thread.run_sync(plan_cpu_frame, staged)
            assert not isinstance(planned, NeedsStaging)
            header, sources = planned.header, planned.sources
            region = await self._lease(header.data_bytes, _region_or_flat, Region)
            fill = Fill(header, sources, region.data[: header.data_bytes], hashing=self.verify)
            try:
                await anyio.to_thread.run_sync(fill.run)
            except BaseException:
                self._free(region)
                raise
        finally:
            if staged is not None:
                self.stager.release(staged)
        data = region.data[: header.data_bytes]
        sources = frame_sources(header, data)
        if isinstance(region, Flat):  # no shared memory this time: sent as plain frames
            snap = Snapshot(version, seq, header, sources, flat=region)
        else:
            snap = Snapshot(version, seq, header, sources, region=region)
        snap.digests = fill.digests  # hashed while copied (``verify``)
        snap.written.set()
        return snap

    async def digests(self, snap: Snapshot) -> list[int] | None:
        """The entries' digests of ``snap`` (``None`` without ``verify``): hashed as ``fill``
        copied it, else by the first send that needs them, not while the trainer waits for
        ``stage``; only once."""
        if not self.verify:
            await anyio.lowlevel.checkpoint()
            return None
        await snap.written.wait()
        async with snap.hashing:
            if snap.digests is None:
                snap.digests = await anyio.to_thread.run_sync(source_digests, snap.sources)
        return snap.digests

    async def _stage_private(self, state_dict: Any, version: int, seq: int) -> Snapshot:
        stager = self.stager
        staged = await stager.stage(state_dict)
        try:
            planned = await anyio.to_thread.run_sync(plan_cpu_frame, staged)
        except BaseException:
            stager.release(staged)
            raise
        snap = Snapshot(version, seq, planned.header, planned.sources, staged=staged, stager=stager)
        snap.written.set()
        return snap

    async def _lease(
        self, nbytes: int, create: Callable[[int], Region | Flat], kind: type[Region | Flat]
    ) -> Region | Flat:
        """A free buffer of ``kind`` and at least ``nbytes`` (two at most; waits for a release;
        an idle one of another kind, a fallback's, is made room of like a small one)."""
        while True:
            idle = [r for r in self.regions if not r.busy]
            fit = next((r for r in idle if r.nbytes >= nbytes and isinstance(r, kind)), None)
            if fit is not None:
                fit.busy = True
                await anyio.lowlevel.checkpoint()
                return fit
            if len(self.regions) >= 2 and idle:  # too small: make room, freed off the loop
                doomed: list[Any] = [idle[0]]
                idle.clear()
                self.regions.remove(doomed[0])
                await let_go(doomed)
                continue
            if len(self.regions) < 2:
                made = await anyio.to_thread.run_sync(create, nbytes)
                self.regions.append(made)
                return made
            await self.changed.wait()

    def _free(self, region: Region | Flat) -> None:
        region.busy = False
        self.changed.set()
        self.changed = anyio.Event()

    def release(self, snap: Snapshot) -> None:
        """Hand ``snap``'s buffer back (once, and never a poisoned one)."""
        if snap.released or snap.poisoned:
            return
        snap.released = True
        buffer = snap.region or snap.flat
        if buffer is not None:
            self._free(buffer)
        elif snap.stager is not None:
            snap.stager.release(snap.staged)

    def poison(self, snap: Snapshot) -> None:
        """Never reuse ``snap``'s buffer: an abandoned send may still read it."""
        snap.poisoned = True
        buffer = snap.region or snap.flat
        if buffer is not None and buffer in self.regions:
            self.regions.remove(buffer)
            self.changed.set()
            self.changed = anyio.Event()
        elif snap.stager is self.stager:
            self.retired.append(self.stager)
            self.stager = DefaultStager(StagingOptions(pool_size=2, lease_warning=None))

    async def aclose(self) -> None:
        """Free every buffer (shielded)."""
        with anyio.CancelScope(shield=True):
            for stager in [self.stager, *self.retired]:
                await stager.aclose()
        self.regions.clear()


def _region_or_flat(nbytes: int) -> Region | Flat:
    """A shared-memory region, or a private buffer when torch's shared-memory manager fails
    (it answers within 1 s or not at all, which a loaded host can miss): that version goes
    as plain frames, and the next one tries shared memory again (worker thread)."""
    try:
        return Region.create(nbytes)
    except RuntimeError:
        return Flat.create(nbytes)
