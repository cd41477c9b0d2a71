"""``WeightPublisher``: push versioned weights from a trainer rank to serving ranks.

``submit`` stages the state dict into one of two pooled CPU buffers (so the next version can be
staged while the previous one is still on the wire) and makes it the latest version. One task per
subscriber, owned by the publisher's task group, waits for that subscriber's ``READY`` note and
answers with the latest version it does not hold (``offers``: an ``OFFER`` note, then the frame,
or a shared-memory description), under ``timeout``. A version a subscriber was too busy
to take is superseded by the next one (latest wins). A subscriber that has not asked yet is
absent: no report waits for it. A subscriber that dies or times out is dropped, with the error
in each pending report, and rejoins when its next ``READY`` arrives. A version larger than a
subscriber said it takes (its ``LIMIT``) is not offered to it: it is told ``TOO_BIG`` and
dropped. See ``docs/channel.md``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import torch

from .._core.completion import Backoff, wait_until
from .._core.timeouts import DEFAULT_TIMEOUT, seconds
from .._replication.transport import Link
from ..errors import (
    ClosedError,
    ReplicationError,
    ReplicationTimeout,
    StagingError,
    UsageError,
)
from .notes import (
    BACKSTOP,
    BYE,
    BYE_ACK,
    CLOSED,
    FRAME_TAG,
    LIMIT,
    OFFER_TAG,
    READY,
    READY_TAG,
    Mailbox,
    Note,
    cpu_group,
    send_note,
)
from .offers import Peer, offer
from .report import Delivery, Publication, PublishReport, Sending
from .shm import host_token
from .versions import Snapshot, Snapshots

__all__ = ["WeightPublisher"]

_POLL = Backoff(0.0005, 0.005)


class WeightPublisher:
    """Send versioned state dicts from this rank to the ``subscribers`` (group ranks).

    ``async with WeightPublisher(pg, subscribers=[1, 2], timeout=30) as pub:`` then
    ``report = await pub.publish(model.state_dict(), version)``, or ``publication = await
    pub.submit(...)`` to keep training while it is sent and ``await publication.report`` later.
    Versions must increase. Each subscriber gets the latest version it does not hold, when it
    asks (a busy one skips versions); all are sent concurrently, each under ``timeout``. A
    subscriber that has not asked yet (not started) is ``"absent"``: reports do not wait for it,
    and it gets the latest version when it asks (``await pub.wait_for_subscribers()`` waits for
    them first). A subscriber that dies or does not answer in time is dropped
    (``report.deliveries[rank]`` holds the ``ReplicationError``) without delaying the others
    beyond ``timeout``, and is re-admitted when it asks again. ``pg`` must move CPU tensors
    (gloo); ``None``: the default group. ``verify=False`` (on the subscribers too) skips
    per-entry checksums. ``timeout`` (seconds or ``timedelta``, default 600) is the longest any
    one wait for another rank may take (a send, or a subscriber's request for a version it
    lacks); past it that subscriber is dropped (``ReplicationTimeout``).

    Blocks on nothing. Raises ``UsageError`` for a bad group or subscriber list, ``ValueError``
    for a bad ``timeout`` or a version that does not increase, ``ClosedError`` after ``aclose``.
    """

    def __init__(
        self,
        pg: Any = None,
        subscribers: Sequence[int] = (),
        *,
        timeout: float | timedelta = DEFAULT_TIMEOUT,
        verify: bool = True,
        shared_memory: bool = False,
    ) -> None:
        self._timeout = seconds(timeout)
        self._pg, self._rank, world = cpu_group(pg)
        ranks = list(subscribers)
        if len(set(ranks)) != len(ranks) or any(
            not 0 <= r < world or r == self._rank for r in ranks
        ):
            raise UsageError(
                f"subscribers must be distinct other ranks of a group of {world}: {ranks}"
            )
        cpu = torch.device("cpu")
        self._peers = {
            r: Peer(
                r,
                Link(self._pg, cpu, BACKSTOP, verify=verify, tag=FRAME_TAG),
                Mailbox(self._pg, r, READY_TAG),
            )
            for r in ranks
        }
        self._snaps = Snapshots(shared_memory, verify)
        self._host = host_token()
        self._latest: Snapshot | None = None
        self._seq = 0
        self._last_version: int | None = None
        self._pending: list[Sending] = []
        self._lock = anyio.Lock()
        self._tg: anyio.abc.TaskGroup | None = None
        self._closing = self._closed = False
        self._news = anyio.Event()  # set (and replaced) when a version is latest or on closing

    @property
    def states(self) -> dict[int, str]:
        """Each subscriber's state: ``"absent"`` (has not asked for a version yet), ``"live"``,
        ``"dropped"`` or ``"closed"``."""
        return {r: p.state for r, p in self._peers.items()}

    @property
    def errors(self) -> dict[int, ReplicationError]:
        """Why each dropped subscriber was dropped."""
        return {r: p.error for r, p in self._peers.items() if p.error is not None}

    async def __aenter__(self) -> WeightPublisher:
        if self._closed or self._tg is not None:
            raise UsageError("a WeightPublisher is entered once; create a new one")
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        for peer in self._peers.values():
            peer.mailbox.post()
            self._tg.start_soon(self._serve, peer)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._close(abandon=e is not None)

    async def aclose(self) -> None:
        """Wait for pending publications, tell waiting subscribers the stream ended, stop every
        task and free the buffers; idempotent. Blocks at most about twice ``timeout``."""
        await self._close(abandon=False)

    async def wait_for_subscribers(self, n: int | None = None) -> list[int]:
        """Wait until at least ``n`` subscribers (default: all) are live (have asked for a version
        and are not dropped or closed), and return the live ones' ranks; bound it with
        ``anyio.fail_after``.

        Raises ``ValueError`` when ``n`` is not between 0 and the number of subscribers,
        ``UsageError`` outside ``async with``, ``ClosedError`` after ``aclose``.
        """
        n = len(self._peers) if n is None else n
        if not 0 <= n <= len(self._peers):
            raise ValueError(f"n must be between 0 and {len(self._peers)} subscribers, got {n}")
        self._check_open()
        await wait_until(lambda: len(self._live()) >= n or self._closed, _POLL)
        self._check_open()
        return self._live()

    def _live(self) -> list[int]:
        return sorted(r for r, p in self._peers.items() if p.state == "live")

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("this WeightPublisher is closed; create a new one")
        if self._tg is None:
            raise UsageError("use `async with WeightPublisher(...) as pub:`")

    async def publish(self, state_dict: Any, version: int) -> PublishReport:
        """Stage ``state_dict`` as ``version``, send it, and return the report once every
        subscriber has an outcome; see ``submit`` for what it raises."""
        publication = await self.submit(state_dict, version)
        return await publication.report

    async def submit(self, state_dict: Any, version: int) -> Publication:
        """Stage ``state_dict`` as ``version`` and return once it is staged (the caller may then
        change its tensors); it is sent in the background: ``await publication.report``.

        Waits for the copy, and for a free buffer while two versions are still being sent; the
        version may already be on the wire while it is copied (each message once the entries it
        carries are in), so cancelled during the copy, it finishes the copy (shielded) and the
        version is still published.
        Raises ``ValueError`` when ``version`` does not increase, ``UsageError`` outside
        ``async with``, ``ClosedError`` after ``aclose``, ``StagingError`` for a leaf that
        cannot be staged.
        """
        self._check_open()
        assert self._tg is not None
        if self._last_version is not None and version <= self._last_version:
            raise ValueError(f"version {version} does not increase (last: {self._last_version})")
        self._last_version = version
        async with self._lock:
            began = time.perf_counter()
            snap = await self._snaps.prepare(state_dict, version, self._seq + 1)
            self._seq += 1  # only once prepared: a failed stage leaves no gap
            sending = self._track(snap)
            old, self._latest = self._latest, snap  # sends may begin while it is copied in
            self._announce()
            if old is not None:
                self._maybe_release(old)
            try:
                await self._snaps.fill(snap)
            except BaseException as exc:
                self._latest = None  # its sends fail: each subscriber is dropped and rejoins
                self._maybe_release(snap)
                if isinstance(exc, Exception):
                    raise StagingError(f"copying version {version} failed: {exc}") from exc
                raise
            finally:
                sending.copied(time.perf_counter() - began)
        return sending.publication

    def _track(self, snap: Snapshot) -> Sending:
        """The ``Sending`` of ``snap``, with the subscribers not waited for already decided."""
        assert self._tg is not None
        sending = Sending(
            snap.version, snap.seq, frozenset(self._peers), 0.0, snap.header.data_bytes
        )
        sending.staged = False
        for peer in self._peers.values():
            if peer.state != "live":  # not waited for: absent, dropped or closed
                sending.decide(Delivery(peer.rank, peer.state, error=peer.error))
        self._pending.append(sending)
        self._tg.start_soon(self._watchdog, sending)
        return sending

    # -- per subscriber

    async def _serve(self, peer: Peer) -> None:
        """Answer each note of one subscriber for the publisher's lifetime."""
        while True:
            try:
                note = await peer.mailbox.take()
            except ReplicationError as exc:
                self._drop(peer, exc)
                return
            peer.mailbox.post()
            if note.kind == LIMIT:
                peer.limit = max(note.a, 0)
                continue
            peer.heard = True
            if note.kind == BYE:
                await self._farewell(peer, BYE_ACK)
                peer.state = "closed"
                self._decide_all(peer, "closed")
                continue
            if note.kind != READY:
                continue
            if peer.state != "live":
                peer.state, peer.error = "live", None  # joined, or rejoined
            peer.have = note.a
            peer.shm = self._snaps.shared and note.b == self._host and not peer.unmappable
            if not await self._serve_ready(peer):
                return

    async def _serve_ready(self, peer: Peer) -> bool:
        """Send the next version the subscriber lacks; ``False`` once the publisher closes."""
        await wait_until(
            lambda: self._closing or self._newer(peer) or peer.mailbox.landed(),
            _POLL,
            woken=lambda: self._news,  # a new version or closing wakes it at once; notes are polled
        )
        if peer.mailbox.landed():
            return True  # a note came first (BYE): handle it
        if self._closing:
            await self._farewell(peer, CLOSED)
            peer.ended = True
            return False
        assert self._latest is not None
        await self._deliver(peer, self._latest)
        return True

    def _announce(self) -> None:
        """Wake every subscriber's task waiting for a version to send (``_serve_ready``)."""
        self._news.set()
        self._news = anyio.Event()

    def _newer(self, peer: Peer) -> bool:
        return self._latest is not None and self._latest.seq > peer.have

    async def _farewell(self, peer: Peer, kind: int) -> None:
        """Tell a subscriber its stream ended (best effort, bounded by the timeout)."""
        with anyio.move_on_after(self._timeout):
            try:
                await send_note(self._pg, peer.rank, OFFER_TAG, Note(kind, 0))
            except ReplicationError as exc:
                self._drop(peer, exc)

    async def _deliver(self, peer: Peer, snap: Snapshot) -> None:
        """Send ``snap`` to ``peer`` under the timeout; record the outcome."""
        snap.users += 1
        peer.sending = True
        began = time.perf_counter()
        try:
            with anyio.fail_after(self._timeout):
                await offer(self._pg, peer, snap, self._snaps.digests)
        except TimeoutError as exc:
            self._snaps.poison(snap)
            error = ReplicationTimeout(
                f"version {snap.version} was not received within {self._timeout} s; the "
                "subscriber is frozen or too slow: dropped until it asks again",
                peer=peer.rank,
                phase="send",
            )
            error.__cause__ = exc
            self._drop(peer, error)
        except ReplicationError as exc:
            self._drop(peer, exc)
        else:
            peer.have = snap.seq
            self._delivered(peer, snap, time.perf_counter() - began)
        finally:
            snap.users -= 1
            peer.sending = False
            self._maybe_release(snap)

    # -- outcomes and buffers

    def _delivered(self, peer: Peer, snap: Snapshot, seconds: float) -> None:
        shared = peer.shm and snap.region is not None  # a version staged in private memory
        for sending in self._pending:
            if sending.seq == snap.seq:
                sending.decide(Delivery(peer.rank, "delivered", seconds, shared_memory=shared))
            elif sending.seq < snap.seq:
                sending.decide(Delivery(peer.rank, "superseded"))
        self._prune()

    def _drop(self, peer: Peer, error: ReplicationError) -> None:
        peer.state, peer.error = "dropped", error
        self._decide_all(peer, "dropped")

    def _decide_all(self, peer: Peer, status: str) -> None:
        for sending in self._pending:
            if status == "dropped":
                sending.decide(Delivery(peer.rank, "dropped", error=peer.error))
            else:
                sending.decide(Delivery(peer.rank, "closed"))
        self._prune()

    def _prune(self) -> None:
        self._pending = [s for s in self._pending if not s.finished()]

    async def _watchdog(self, sending: Sending) -> None:
        """Drop the subscribers that did not ask for ``sending``'s version within the timeout."""
        while not sending.finished():
            with anyio.move_on_after(self._timeout):
                await sending.wait_finished()
            for rank in sending.undecided():
                peer = self._peers[rank]
                if peer.state == "live" and not peer.sending:
                    self._drop(peer, ReplicationTimeout(
                        f"did not ask for version {sending.version} within {self._timeout} s "
                        "(not started, frozen, or gone): dropped until it asks again",
                        peer=rank, phase="ready",
                    ))  # fmt: skip

    def _all_told(self) -> bool:
        """Whether every subscriber that asked and is still live was told the stream ended."""
        return all(p.ended or not p.heard or p.state != "live" for p in self._peers.values())

    def _maybe_release(self, snap: Snapshot) -> None:
        if snap is not self._latest and not snap.users:
            self._snaps.release(snap)

    async def _close(self, *, abandon: bool) -> None:
        if self._closed:
            await anyio.lowlevel.checkpoint()
            return
        self._closed = True
        tg, self._tg = self._tg, None
        try:
            if tg is not None and not abandon:
                for sending in list(self._pending):
                    await sending.wait_finished()
                self._closing = True
                self._announce()
                with anyio.move_on_after(self._timeout):
                    await wait_until(self._all_told, _POLL)
            if tg is not None:
                tg.cancel_scope.cancel()
                await tg.__aexit__(None, None, None)
        finally:
            self._latest = None
            await self._snaps.aclose()
