"""``WeightSubscriber``: receive versioned weights in the background, install them between requests.

A background task (owned by the subscriber's task group) runs its ``Receiver``: it tells the
publisher how large a version it takes, says ``READY`` (with the publish sequence number it
holds) and lands the frame that follows in a reused receive buffer, so serving never waits on
the network; what lands passes the ``gate`` or is refused. The newest received version is kept;
``WeightUpdate.apply`` installs it (``install``: double-buffered by default, or by copy) while
no ``reading()`` section is open.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import torch

from .._core.cuda import current_streams
from .._core.timeouts import DEFAULT_TIMEOUT, seconds
from .._replication.receive import ReceiveBuffers
from ..errors import ClosedError, ReplicationError, UsageError
from .gate import Gate, target_limits
from .install import Installer, Received
from .notes import BYE, BYE_ACK, CLOSED, READY_TAG, Note, cpu_group, send_note
from .receiver import Receiver

__all__ = ["WeightSubscriber", "WeightUpdate"]


class WeightUpdate:
    """A version that arrived: ``version``, its transfer ``seconds`` and ``nbytes``.

    ``await update.apply()`` installs the newest version received so far (this one or a later
    one, never an older one) and returns its version.
    """

    def __init__(self, subscriber: WeightSubscriber, received: Received) -> None:
        self._subscriber = subscriber
        self.version = received.version
        self.seconds = received.seconds
        self.nbytes = received.header.data_bytes

    async def apply(self) -> int:
        """Install the newest received version into the subscriber's target: re-point its
        tensors at the version (``swap=True``, the default) or copy it into them in place
        (``swap=False``). The change happens once no ``sub.reading()`` section is open (new ones
        wait for it), so a request inside one sees one version; call it outside any such section
        (between requests). CUDA copies follow the caller's current streams' queued work.

        Blocks on GPU targets' copies into their second buffers (requests go on meanwhile), on
        the open reading sections, then on the change (shielded from cancellation so the target
        is never left half changed; by copy, that is a copy of the whole state). Raises
        ``UsageError`` without a target and ``StateDictMismatch`` when the published state
        differs from the target in keys, shapes or dtypes.
        """
        return await self._subscriber._apply()

    def __repr__(self) -> str:
        return f"WeightUpdate(version={self.version}, nbytes={self.nbytes})"


class WeightSubscriber:
    """Receive the versions a ``WeightPublisher`` on group rank ``publisher`` sends.

    ``async with WeightSubscriber(pg, publisher=0, target=model) as sub:`` then ``async for
    update in sub: await update.apply()`` (each update is the newest version; ones that arrived
    while the loop was busy are skipped and counted in ``skipped``; a version is yielded once,
    and never one ``wait_for`` returned or ``apply`` installed), ``await sub.wait_for(version)``,
    or poll ``sub.pending`` between requests. ``target``: an ``nn.Module`` or a state dict whose
    tensors ``apply`` changes. Install is double-buffered by default (``swap=True``): requests
    read the installed version while the next one lands in a second buffer, and ``apply``
    re-points the target's tensors at it (CPU tensors: at the buffer it landed in, no copy; GPU
    tensors: at a second device tensor each, filled first); ``swap=False`` copies into the
    target's own memory instead (no second copy of the state; requests wait for the whole copy).
    Requests that run while ``apply`` may (other tasks, worker threads) read the target inside
    ``async with sub.reading():``. ``version`` is the installed version. Iteration ends when the publisher closes; a polling
    loop sees the end in ``ended`` (and what broke the stream, if anything, in ``error``).
    ``timeout`` (seconds or ``timedelta``, default 600) is the longest any one wait for another
    rank may take once a transfer has begun (a send or a receive; waiting for the next version
    is not bounded); past it ``ReplicationTimeout``.

    A version larger than this subscriber takes is never allocated for: by default twice its
    target's state plus slack (the publisher must send a state like it), ``max_bytes`` instead;
    the publisher is told, and a publisher that sends one anyway ends the stream. An offer that
    lands but is wrong (a version that does not increase, a structure that does not decode,
    damaged bytes, a shared-memory region it may not read) is refused: this subscriber keeps
    what it has, asks again, and counts it in ``refused``; ``MAX_REFUSED`` (3) refusals in a row
    end the stream.

    Blocks on nothing. Raises ``ValueError`` for a bad ``timeout`` or ``max_bytes``. Iteration
    and ``wait_for`` raise the ``ReplicationError`` that ended the stream (the publisher died, a
    frame was malformed or too large, offers were refused in a row) or ``ReplicationTimeout``
    when a started frame did not arrive within ``timeout``.
    """

    def __init__(
        self,
        pg: Any = None,
        publisher: int = 0,
        *,
        target: Any = None,
        timeout: float | timedelta = DEFAULT_TIMEOUT,
        verify: bool = True,
        swap: bool = True,
        max_bytes: int | None = None,
    ) -> None:
        self._timeout = seconds(timeout)
        if max_bytes is not None and (type(max_bytes) is not int or max_bytes < 1):
            raise ValueError(f"max_bytes must be a positive number of bytes, got {max_bytes!r}")
        self._max_bytes = max_bytes
        self._pg, rank, world = cpu_group(pg)
        if not 0 <= publisher < world or publisher == rank:
            raise UsageError(
                f"publisher must be another rank of a group of {world}, got {publisher}"
            )
        self._pub = publisher
        self._target = target
        self._installer = Installer(target, swap=swap)
        self._installed: torch.Tensor | None = None
        self._verify = verify
        self._arenas = ReceiveBuffers()
        self._rx: Receiver | None = None  # made on entry, once the target's size is known
        self._latest: Received | None = None
        self._applied = self._yielded = self._skipped = self._received = 0
        self._version: int | None = None
        self._changed = anyio.Event()
        self._apply_lock = anyio.Lock()
        self._error: ReplicationError | None = None
        self._ended = self._closed = False
        self._tg: anyio.abc.TaskGroup | None = None

    @property
    def version(self) -> int | None:
        """The version installed by the last ``apply`` (``None`` before the first)."""
        return self._version

    @property
    def pending(self) -> WeightUpdate | None:
        """The newest received version not installed yet, or ``None``: a serving loop checks it
        between requests without waiting (``if (u := sub.pending) is not None: await u.apply()``)."""
        latest = self._latest
        if latest is None or latest.seq == self._applied:
            return None
        return WeightUpdate(self, latest)

    @contextlib.asynccontextmanager
    async def reading(self) -> AsyncIterator[int | None]:
        """``async with sub.reading() as version:`` a section (a request) in which the target
        does not change: ``apply`` waits for open sections to end before it changes the target,
        and new sections wait while it does (the change itself: microseconds per tensor by swap,
        the whole copy with ``swap=False``). Yields the installed version (``None`` before the
        first). The section may hand the target to worker threads; do not call ``apply`` inside
        one (it would wait for itself). Blocks only while a change is due or under way.
        """
        async with self._installer.reading():
            yield self._version

    @property
    def received_version(self) -> int | None:
        """The newest version received (installed or not)."""
        return self._latest.version if self._latest is not None else None

    @property
    def receiving(self) -> bool:
        """Whether a version is landing right now (its frame has begun to arrive)."""
        return self._rx is not None and self._rx.receiving

    @property
    def ended(self) -> bool:
        """Whether the stream is over: the publisher closed it, it broke (``error``), or this
        subscriber was closed; no version arrives after it. The last version received may still
        be ``pending``: a polling loop stops once ``sub.ended and sub.pending is None``."""
        return self._ended or self._closed or self._error is not None

    @property
    def error(self) -> ReplicationError | None:
        """What broke the stream (the error iteration and ``wait_for`` raise), or ``None``."""
        return self._error

    @property
    def skipped(self) -> int:
        """Published versions never installed because a newer one was installed instead."""
        return self._skipped

    @property
    def received(self) -> int:
        """How many versions arrived."""
        return self._received

    @property
    def refused(self) -> list[ReplicationError]:
        """The offers refused so far, oldest first (the last 16): why each was not taken."""
        return list(self._rx.gate.refused) if self._rx is not None else []

    async def __aenter__(self) -> WeightSubscriber:
        """Work out how large a version this subscriber takes (its target's size, in a worker
        thread) and start receiving. Raises ``UsageError`` when entered twice and what
        flattening the target raises."""
        if self._closed or self._tg is not None:
            raise UsageError("a WeightSubscriber is entered once; create a new one")
        gate = Gate(self._pub, await target_limits(self._target, self._max_bytes))
        self._rx = Receiver(
            self._pg, self._pub, timeout=self._timeout, verify=self._verify, gate=gate,
            arenas=self._arenas, land=self._land,
        )  # fmt: skip
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._receive_loop, self._rx)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop receiving and tell the publisher (bounded by ``timeout``); idempotent."""
        if self._closed:
            await anyio.lowlevel.checkpoint()
            return
        self._closed = True
        tg, self._tg = self._tg, None
        if tg is not None:
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)
            if not self._ended and self._error is None and self._rx is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(self._timeout):
                    await self._goodbye(self._rx)
        self._latest = None
        if self._rx is not None:
            self._rx.close()
        self._arenas.clear()
        self._notify()

    async def _goodbye(self, rx: Receiver) -> None:
        """Say BYE and take the publisher's BYE_ACK, so no receive of ours stays posted."""
        try:
            rx.offers.post()
            await send_note(self._pg, self._pub, READY_TAG, Note(BYE, rx.have))
            while (await rx.offers.take()).kind not in (BYE_ACK, CLOSED):
                pass
        except ReplicationError:
            pass  # the publisher is gone: nothing is left to tell

    # -- waiting for versions

    def __aiter__(self) -> AsyncIterator[WeightUpdate]:
        return self

    async def __anext__(self) -> WeightUpdate:
        """The newest version not yet handed out (yielded, returned by ``wait_for`` or installed
        by ``apply``); waits for one. Ends when the publisher closes."""
        received = await self._wait(lambda r: r.seq > max(self._yielded, self._applied))
        if received is None:
            raise StopAsyncIteration
        self._yielded = received.seq
        return WeightUpdate(self, received)

    async def wait_for(self, version: int) -> WeightUpdate:
        """Wait until a version >= ``version`` has arrived and return the newest (bound it with
        ``anyio.fail_after``). Raises ``ClosedError`` when the stream ends first."""
        received = await self._wait(lambda r: r.version >= version)
        if received is None:
            raise ClosedError(f"the weight stream ended before version {version}")
        self._yielded = max(self._yielded, received.seq)  # handed out: iteration skips it
        return WeightUpdate(self, received)

    async def _wait(self, ready: Any) -> Received | None:
        while True:
            latest = self._latest
            if latest is not None and ready(latest):
                await anyio.lowlevel.checkpoint()
                return latest
            if self._error is not None:
                raise self._error
            if self._ended or self._closed:
                await anyio.lowlevel.checkpoint()
                return None
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    # -- the background receiver

    async def _receive_loop(self, rx: Receiver) -> None:
        try:
            await rx.announce()
            while await rx.next_version():
                pass
            self._ended = True
        except ReplicationError as exc:
            self._error = exc
        finally:
            self._notify()

    def _land(self, received: Received) -> None:
        """``received`` passed the gate: it is the newest version now."""
        old, self._latest = self._latest, received
        self._arenas.hold(received.data, "latest")
        self._arenas.drop(received.data, "receiving")
        if old is not None:
            self._arenas.drop(old.data, "latest")
        self._received += 1
        self._notify()

    # -- installing

    async def _apply(self) -> int:
        if self._target is None:
            raise UsageError("this WeightSubscriber has no target= to apply updates to")
        streams = current_streams()  # the caller's, on its own thread, before any await
        async with self._apply_lock:
            received = self._latest
            if received is None:
                raise ClosedError("this WeightSubscriber is closed; its updates are gone")
            if received.seq == self._applied:
                await anyio.lowlevel.checkpoint()
                return received.version
            self._arenas.hold(received.data, "applying")
            try:
                viewed = await self._installer.install(received, streams)
            finally:
                self._arenas.drop(received.data, "applying")
            if self._installed is not None:  # no reading section views it any more
                self._arenas.drop(self._installed, "installed")
                self._installed = None
            if viewed:  # the target now lives in this buffer: keep it until the next one
                self._arenas.hold(received.data, "installed")
                self._installed = received.data
            self._skipped += max(0, received.seq - self._applied - 1)
            self._applied, self._version = received.seq, received.version
            return received.version
