"""The publisher's staged versions: two pooled buffers, in private or in shared memory.

Private memory: ``DefaultStager`` (``pool_size=2``) and the frame sent from its copy. Shared
memory (the same-host fast path): the frame's data region itself, written into one of two
named shared-memory regions (``shm``) that subscribers on this host map and copy from;
the frames sent to other subscribers come from the same region. A buffer an abandoned send may
still read is poisoned: never reused, and staging moves on to a fresh pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread

from .._format.codec import Header, Source
from .._replication.frames import NeedsStaging, frame_sources, plan_cpu_frame, plan_frame
from .._staging import DefaultStager, StagingOptions
from .._storage.digests import source_digests
from .shm import Region, fill_region

__all__ = ["Snapshot", "Snapshots"]


@dataclass(eq=False)
class Snapshot:
    """One staged version: its frame, its buffer, and how many sends still read it."""

    version: int
    seq: int
    header: Header
    sources: list[Source]
    staged: Any = None  # the DefaultStager copy (private memory)
    stager: DefaultStager | None = None
    region: Region | None = None  # the shared-memory region (fast path)
    digests: list[int] | None = None  # per entry, hashed once for every subscriber
    hashing: anyio.Lock = field(default_factory=anyio.Lock)
    users: int = 0
    poisoned: bool = False
    released: bool = False


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
    regions: list[Region] = field(default_factory=list)
    changed: anyio.Event = field(default_factory=anyio.Event)

    async def stage(self, state_dict: Any, version: int, seq: int) -> Snapshot:
        """Copy ``state_dict`` into a free buffer (waiting for one while both are in use)."""
        if self.shared:
            return await self._stage_shared(state_dict, version, seq)
        return await self._stage_private(state_dict, version, seq)

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
            region = await self._region(header.data_bytes)
            try:
                await anyio.to_thread.run_sync(fill_region, region, header, sources)
            except BaseException:
                self._free(region)
                raise
        finally:
            if staged is not None:
                self.stager.release(staged)
        data = region.data[: header.data_bytes]
        return Snapshot(version, seq, header, frame_sources(header, data), region=region)

    async def digests(self, snap: Snapshot) -> list[int] | None:
        """The entries' digests of ``snap`` (``None`` without ``verify``): hashed by the first
        send that needs them, not while the trainer waits for ``stage``, and only once."""
        if not self.verify:
            await anyio.lowlevel.checkpoint()
            return None
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
        return Snapshot(version, seq, planned.header, planned.sources, staged=staged, stager=stager)

    async def _region(self, nbytes: int) -> Region:
        """A free region of at least ``nbytes`` (two at most; waits for a release)."""
        while True:
            idle = [r for r in self.regions if not r.busy]
            fit = next((r for r in idle if r.nbytes >= nbytes), None)
            if fit is not None:
                fit.busy = True
                await anyio.lowlevel.checkpoint()
                return fit
            if len(self.regions) >= 2 and idle:
                self.regions.remove(idle[0])  # too small: make room
            if len(self.regions) < 2:
                region = await anyio.to_thread.run_sync(Region.create, nbytes)
                self.regions.append(region)
                return region
            await self.changed.wait()

    def _free(self, region: Region) -> None:
        region.busy = False
        self.changed.set()
        self.changed = anyio.Event()

    def release(self, snap: Snapshot) -> None:
        """Hand ``snap``'s buffer back (once, and never a poisoned one)."""
        if snap.released or snap.poisoned:
            return
        snap.released = True
        if snap.region is not None:
            self._free(snap.region)
        elif snap.stager is not None:
            snap.stager.release(snap.staged)

    def poison(self, snap: Snapshot) -> None:
        """Never reuse ``snap``'s buffer: an abandoned send may still read it."""
        snap.poisoned = True
        if snap.region is not None and snap.region in self.regions:
            self.regions.remove(snap.region)
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
