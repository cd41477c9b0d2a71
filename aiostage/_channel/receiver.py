"""A subscriber's background receiver: ask for versions, land each offered one, pass it through
the ``gate`` or refuse it.

One ``Receiver`` per subscriber, driven by its receive loop. It says ``LIMIT`` once, then for
each version ``READY``, and lands what the publisher offers: a frame over the group, or a copy
out of the publisher's shared memory. A version that lands and passes the gate is handed to
``land``; one that does not is refused (its buffer is free again) and the receiver asks again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread
import torch

from .._format.codec import Header
from .._replication.receive import ReceiveBuffers
from .._replication.transport import Link, recv_frame
from .._replication.wire import RefusedAfterLanding
from ..errors import ReplicationError, ReplicationTimeout
from .gate import Gate
from .install import Received
from .notes import (
    BACKSTOP,
    BYE_ACK,
    CLOSED,
    DONE,
    FRAME_TAG,
    LIMIT,
    NO_SHM,
    OFFER,
    OFFER_SHM,
    OFFER_TAG,
    READY,
    READY_TAG,
    TOO_BIG,
    Mailbox,
    Note,
    send_note,
)
from .shm import PeerRegion, host_token, recv_description
from .verify import check_landed

__all__ = ["Receiver"]


class Receiver:
    """Receive the versions group rank ``publisher`` of ``pg`` offers, each transfer under
    ``timeout``, into ``arenas``; hand each admitted one to ``land``."""

    def __init__(
        self,
        pg: Any,
        publisher: int,
        *,
        timeout: float,
        verify: bool,
        gate: Gate,
        arenas: ReceiveBuffers,
        land: Callable[[Received], None],
    ) -> None:
        self.pg, self.pub, self.timeout, self.gate = pg, publisher, timeout, gate
        self.link = Link(pg, torch.device("cpu"), BACKSTOP, verify=verify, tag=FRAME_TAG)
        self.offers = Mailbox(pg, publisher, OFFER_TAG)
        self.arenas = arenas
        self.land = land
        self.have = 0  # the publish sequence number of the newest version landed
        self.receiving = False
        self._regions: dict[bytes, PeerRegion] = {}
        self._landing: torch.Tensor | None = None  # the buffer a frame is landing in
        self._host = host_token()

    async def announce(self) -> None:
        """Tell the publisher how many data bytes this subscriber takes in one version."""
        await send_note(self.pg, self.pub, READY_TAG, Note(LIMIT, self.gate.limits.data))

    async def next_version(self) -> bool:
        """Say ``READY``, then take offers until a version has landed or was refused; ``False``
        when the stream ended. Raises ``ReplicationError`` when it broke."""
        self.offers.post()
        await send_note(self.pg, self.pub, READY_TAG, Note(READY, self.have, self._host))
        while True:
            note = await self.offers.take()
            if note.kind in (CLOSED, BYE_ACK):
                return False
            if note.kind == TOO_BIG:
                raise self._too_big(note)
            if note.kind == OFFER:
                await self._receive(note, shared=False)
                return True
            if note.kind == OFFER_SHM:
                if await self._receive(note, shared=True):
                    return True
                self.offers.post()  # the plain offer follows
                await send_note(self.pg, self.pub, READY_TAG, Note(NO_SHM, self.have))

    def _too_big(self, note: Note) -> ReplicationError:
        limits = self.gate.limits
        return ReplicationError(
            f"version {note.a} is {note.b} bytes, more than the {limits.data} this subscriber "
            f"takes ({limits.why}); give it max_bytes=, or a target like the published state",
            peer=self.pub,
            phase="offer",
        )

    async def _receive(self, note: Note, *, shared: bool) -> bool:
        """Land the offered version and admit or refuse it; ``False`` when its shared memory is
        not read here (the plain offer follows)."""
        began = time.perf_counter()
        self.receiving = True
        try:
            with anyio.fail_after(self.timeout):
                frame = await (self._copy_shared(note) if shared else self._recv_plain())
        except TimeoutError as exc:
            raise ReplicationTimeout(
                f"version {note.a} did not arrive within {self.timeout} s; the stream is broken",
                peer=self.pub,
                phase="receive",
            ) from exc
        except ReplicationError as exc:  # damaged bytes or records: the whole frame is in
            if exc.phase != "verify" and not isinstance(exc, RefusedAfterLanding):
                raise
            self._refuse(exc)
            return True
        finally:
            self.receiving = False
        if frame is None:
            return not shared
        await self._admit(note, *frame, time.perf_counter() - began)
        return True

    async def _recv_plain(self) -> tuple[Header, torch.Tensor] | None:
        """Land a frame, then (``verify``) check it against its digests: hashed once it has
        landed, at a lower CPU priority, so the hashing does not compete with the transfer."""
        got = await recv_frame(
            self.link, self.pub, self._buffer, limits=self.gate.limits, check=False
        )
        if got is None:
            return None
        header, data, digests = got
        if self.link.verify:
            await check_landed(header, data, digests, self.pub)
        return header, data

    async def _admit(self, note: Note, header: Header, data: torch.Tensor, seconds: float) -> None:
        """Hand a landed version to ``land`` if it passes the gate, else refuse it."""
        try:
            self.gate.check_order(note.a, note.b)
            views = await self.gate.views(header, data)
        except ReplicationError as exc:
            self._refuse(exc)
            return
        self.gate.accept(note.a, note.b)
        self._landing = None
        self.have = note.b
        self.land(Received(note.a, note.b, header, data, seconds, views))

    def _refuse(self, error: ReplicationError) -> None:
        """Drop the offer (its buffer is free again); raises once too many in a row were."""
        if self._landing is not None:
            self.arenas.drop(self._landing, "receiving")
            self._landing = None
        self.gate.refuse(error)

    async def _buffer(self, n: int) -> torch.Tensor:
        self._landing = await self.arenas.get(n, "receiving")
        return self._landing

    async def _copy_shared(self, note: Note) -> tuple[Header, torch.Tensor] | None:
        """Copy a version out of the publisher's shared memory, then say DONE; ``None`` when
        the region is not read here (another IPC namespace, or refused)."""
        described = await recv_description(self.pg, self.pub, self.gate.limits)
        try:
            self.gate.check_region(described.name)
            header = await anyio.to_thread.run_sync(described.decode, self.pub, self.gate.limits)
        except ReplicationError as exc:
            self._refuse(exc)
            return None
        region = await self._region(described.name, described.size)
        if region is None:
            return None
        data = await self._buffer(header.data_bytes)
        try:
            await region.read_into(data)
        except ValueError as exc:  # the region shrank under us
            self._refuse(ReplicationError(str(exc), peer=self.pub, phase="region"))
            return None
        await send_note(self.pg, self.pub, READY_TAG, Note(DONE, note.b))
        return header, data

    async def _region(self, name: bytes, size: int) -> PeerRegion | None:
        """The region ``name`` opened read-only (once), or ``None``: not on this host (another
        IPC namespace) or refused (not the publisher's, not the announced size)."""
        region = self._regions.get(name)
        if region is not None and region.nbytes == size:
            return region
        try:
            region = await anyio.to_thread.run_sync(PeerRegion.open, name, size)
        except ValueError as exc:
            self._refuse(ReplicationError(str(exc), peer=self.pub, phase="region"))
            return None
        except OSError:
            return None
        self.gate.region_accepted(name)
        if len(self._regions) >= 4:
            self.close()
        self._regions[name] = region
        return region

    def close(self) -> None:
        """Close the regions it opened."""
        for region in self._regions.values():
            region.close()
        self._regions.clear()
