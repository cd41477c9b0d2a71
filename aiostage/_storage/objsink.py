"""Moving bytes to and from one object: streamed multipart uploads, streamed and ranged downloads,
and client errors turned into ``OSError`` naming the URL and the HTTP status.

Every request is an ``obstore`` coroutine awaited on the caller's loop; copies between the
writer's buffers and Python objects run in worker threads, with ``ctypes.memmove``, which lets go
of the GIL (a slice assignment holds it for the whole copy: 17 ms per 16 MiB part here, which
the loop thread waited out).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import obstore
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from obstore.exceptions import AlreadyExistsError, BaseError

from ..errors import PersistenceError

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = [
    "PART_BYTES",
    "Incoming",
    "Landed",
    "ObjectStoreError",
    "Upload",
    "call",
    "download",
    "download_begun",
    "download_ranges",
    "spans_of",
]

_MiB = 1 << 20
#: bytes per multipart part (S3 wants parts of at least 5 MiB but the last)
PART_BYTES = 16 * _MiB
#: parts uploaded, or ranges downloaded, at once per object
_CONCURRENCY = 8
#: the longest ranged GET: longer runs of needed bytes are cut into ranges fetched at once
_RANGE_BYTES = 64 * _MiB
#: needed ranges closer than this are fetched as one (a request costs more than the gap)
_GAP = 1 * _MiB
#: the least bytes per chunk of a streamed GET: small enough that a read of a header waits for
#: little, and that the client's copy of a chunk into a Python object (made holding the GIL)
#: stalls the loop thread for a millisecond at most
_STREAM_CHUNK = 4 * _MiB
#: bytes landed per worker-thread call (the copies into place, and ``landed``)
_BATCH = 16 * _MiB
_T = TypeVar("_T")
_STATUS = re.compile(r"status(?: code)?: (\d{3})")
_CODE = re.compile(r"<Code>(\w+)</Code>")
_HINTS = {
    401: "check the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN)",
    403: "check the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) "
    "and the bucket's permissions",
}


class ObjectStoreError(PersistenceError, OSError):
    """A request to an object store failed: ``path`` is the URL, ``status`` the HTTP status
    (``None`` when no response came). An ``OSError`` too, as the storage seam's errors are."""

    def __init__(self, message: str, status: int | None, *, path: str) -> None:
        PersistenceError.__init__(self, message, path=path)
        self.errno, self.strerror, self.status = errno.EIO, message, status

    def __str__(self) -> str:
        return str(self.strerror)


def as_os_error(exc: BaseError | OSError, url: str, what: str) -> OSError:
    """``exc`` from the client as the ``OSError`` the storage seam raises, naming ``url``."""
    text = str(exc)
    m, code = _STATUS.search(text), _CODE.search(text)
    status = int(m[1]) if m else None
    if code is not None and code[1] == "NoSuchBucket":
        message = f"{url}: the bucket does not exist (HTTP 404 NoSuchBucket)"
        return ObjectStoreError(message, 404, path=url)
    if isinstance(exc, FileNotFoundError):
        return FileNotFoundError(errno.ENOENT, "no such object", url)
    if isinstance(exc, AlreadyExistsError):
        return FileExistsError(errno.EEXIST, "the object exists already", url)
    detail = f"HTTP {status} {code[1] if code else ''}".strip() if status else "no response"
    hint = _HINTS.get(status or 0, "")
    if status is None:
        hint = "is the endpoint (AWS_ENDPOINT_URL ...) reachable? " + text.split("\n", 1)[0]
    message = f"{url}: {what} failed ({detail}){'; ' + hint if hint else ''}"
    return ObjectStoreError(message, status, path=url)


async def call(url: str, what: str, request: Awaitable[_T]) -> _T:
    """Await one client request; its failure as ``as_os_error`` (cancellation passes through)."""
    try:
        return await request
    except (BaseError, OSError) as exc:
        raise as_os_error(exc, url, what) from exc


class Upload:
    """One object being written in order: parts go out while later ones are filled.

    Bytes are copied out of the caller's buffer (a worker thread) before ``write_at`` returns, so
    the writer may reuse it. Up to ``PART_BYTES`` the object is kept and sent in one PUT by
    ``finish``; past it a multipart upload starts, ``_CONCURRENCY`` parts in flight, in the task
    group ``tg``. With ``hold``, nothing is sent: ``finish`` hands the whole object to ``hold``
    (a manifest, which the storage's ``commit`` puts).
    """

    def __init__(
        self,
        store: Any,
        key: str,
        url: str,
        tg: anyio.abc.TaskGroup,
        *,
        hold: Callable[[bytes], None] | None = None,
    ) -> None:
        self.name = url.rsplit("/", 1)[-1]
        self._store, self._key, self._url, self._tg, self._hold = store, key, url, tg, hold
        self._held: list[memoryview] = []
        self._pos = 0
        self._send: MemoryObjectSendStream[memoryview] | None = None
        self._done = anyio.Event()
        self._error: BaseException | None = None

    async def write_at(self, offset: int, buf: memoryview, n: int) -> None:
        """Append ``buf[:n]``; ``offset`` must be where the previous write ended."""
        if offset != self._pos:
            raise ValueError(f"{self._url}: object stores take writes in order ({offset})")
        data = await anyio.to_thread.run_sync(_owned, buf, n)
        self._pos += n
        if self._send is None:
            self._held.append(data)
            if self._pos >= PART_BYTES and self._hold is None:
                self._start()
            return
        try:
            await self._send.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            await self._wait()

    async def finish(self, size: int) -> None:
        """The object holds exactly ``size`` bytes (the ``_pos`` written), stored."""
        if size != self._pos:
            raise ValueError(f"{self._url}: {self._pos} bytes written, {size} expected")
        if self._send is None:
            held, self._held = self._held, []
            if self._hold is not None:
                self._hold(await anyio.to_thread.run_sync(b"".join, held))
                return
            body = held[0] if len(held) == 1 else await anyio.to_thread.run_sync(b"".join, held)
            await call(self._url, "PUT", obstore.put_async(self._store, self._key, body))
            return
        await self._send.aclose()
        await self._wait()

    def close(self) -> None:
        """Stop feeding the upload (an abandoned write: its task is being cancelled)."""
        if self._send is not None:
            self._send.close()

    def _start(self) -> None:
        send, receive = anyio.create_memory_object_stream[memoryview](0)
        self._send = send
        self._tg.start_soon(self._stream, receive)

    async def _wait(self) -> None:
        await self._done.wait()
        if self._error is not None:
            raise self._error

    async def _stream(self, receive: MemoryObjectReceiveStream[memoryview]) -> None:
        held, self._held = self._held, []

        async def parts() -> AsyncIterator[memoryview]:
            for data in held:
                yield data
            held.clear()
            async for data in receive:
                yield data

        try:
            with receive:
                await call(
                    self._url,
                    "the multipart upload",
                    obstore.put_async(
                        self._store, self._key, parts(), chunk_size=PART_BYTES,
                        max_concurrency=_CONCURRENCY,
                    ),
                )  # fmt: skip
        except OSError as exc:
            self._error = exc
        finally:
            self._done.set()


def _memory(size: int) -> memoryview:
    """``size`` bytes of private anonymous memory: zero pages until written, so only the ranges
    downloaded into it take memory (worker thread: a large mapping takes a while to set up)."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    return memoryview(mmap.mmap(-1, max(size, 1), flags=flags))[:size]


def _address(view: memoryview) -> int:
    """Where the writable, non-empty, contiguous ``view`` starts in memory."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def _owned(buf: memoryview, n: int) -> memoryview:
    """A copy of ``buf[:n]`` in fresh private memory (worker thread; the GIL is let go)."""
    out = _memory(n)
    if n and buf.readonly:
        out[:] = buf[:n]
    elif n:
        ctypes.memmove(_address(out), _address(buf), n)
    return out


#: told, in a worker thread, that the object's bytes before an offset are in the buffer (in
#: order, from the first fetched); False stops the download there
Landed = Callable[[memoryview, int], bool]


class Incoming:
    """The body of one GET as it comes in: the chunks received and not yet landed.

    ``begin`` is the offset in the object of the first chunk held, ``received`` the offset after
    the last, ``end`` the offset after the body's last byte.
    """

    def __init__(self, got: Any, url: str, begin: int, end: int) -> None:
        self._stream: Any = got.stream(min_chunk_size=_STREAM_CHUNK)
        self.url, self.begin, self.received, self.end = url, begin, begin, end
        self._chunks: list[bytes] = []

    def close(self) -> None:
        """Drop the response (its connection closes) and the chunks held: nothing more comes."""
        self._stream, self._chunks = None, []
        self.received = self.begin

    async def read(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes of the body from ``offset`` (not before ``begin``), received if
        need be; the chunks stay held for ``land``."""
        stop = min(offset + n, self.end)
        await self.receive(stop)
        pieces, at = [], self.begin
        for chunk in self._chunks:
            if at >= stop:
                break
            lo, hi = max(offset - at, 0), min(stop - at, len(chunk))
            if lo < hi:
                pieces.append(memoryview(chunk)[lo:hi])
            at += len(chunk)
        return b"".join(pieces)

    async def receive(self, upto: int) -> None:
        """Wait until the bytes before ``upto`` are received; raises ``OSError`` naming the URL
        on an error or a body that ends short of ``upto``."""
        while self.received < upto:
            if self._stream is None:
                raise ObjectStoreError(f"{self.url}: the download was dropped", None, path=self.url)
            try:
                chunk = await call(self.url, "GET", self._stream.__anext__())
            except StopAsyncIteration:
                what = f"{self.received} bytes, {upto} expected"
                raise ObjectStoreError(f"{self.url}: {what}", None, path=self.url) from None
            self._chunks.append(chunk)
            self.received += len(chunk)

    async def land(self, out: memoryview, stop: int, landed: Landed | None = None) -> None:
        """Receive the body up to ``stop`` into ``out`` at its offsets in the object,
        ``_BATCH`` bytes per worker-thread call, which also tells ``landed``."""
        if self.end < stop:
            what = f"{self.end} bytes, {stop} expected"
            raise ObjectStoreError(f"{self.url}: {what}", None, path=self.url)
        pos = self.begin
        while pos < stop:
            await self.receive(min(pos + _BATCH, stop))
            chunks, self._chunks = self._chunks, []
            at, self.begin = self.begin, self.received
            done = await anyio.to_thread.run_sync(_land, out, at, chunks, stop, landed)
            if done is None:
                return
            pos = done
        await anyio.lowlevel.checkpoint()


def _land(
    out: memoryview, at: int, chunks: list[bytes], stop: int, landed: Landed | None
) -> int | None:
    """Copy ``chunks`` (the object's bytes from ``at``) into ``out`` up to ``stop`` and free
    them here, not on the loop thread; then tell ``landed`` (worker thread). Returns where the
    bytes landed end, or ``None`` when ``landed`` says stop."""
    base = _address(out) if stop > at else 0
    for chunk in chunks:
        n = min(len(chunk), stop - at)
        if n > 0:
            ctypes.memmove(base + at, chunk, n)
        at += len(chunk)
    chunks.clear()
    at = min(at, stop)
    if landed is not None and not landed(out, at):
        return None
    return at


async def download(
    store: Any, key: str, url: str, size: int, head: bytes = b"", landed: Landed | None = None
) -> memoryview:
    """The first ``size`` bytes of the object, in private writable memory.

    ``head`` (the object's first bytes, read already) is copied in, the rest comes by one
    streamed GET, chunks copied in place by worker threads as they arrive, each batch then handed
    to ``landed``: faster than parallel ranged GETs at every size measured (moto: 0.33 s against
    0.9 s for 256 MiB), and it holds no second copy of the object. Raises ``OSError`` naming
    ``url`` on a short object.
    """
    out = await anyio.to_thread.run_sync(_memory, size)
    have = min(len(head), size)
    if have and await anyio.to_thread.run_sync(_land, out, 0, [head], size, landed) is None:
        return out
    if have < size:
        got = await call(url, "GET", obstore.get_async(store, key, options={"range": (have, size)}))
        await Incoming(got, url, have, size).land(out, size, landed)
    else:
        await anyio.lowlevel.checkpoint()
    return out


async def download_begun(got: Incoming, size: int, landed: Landed | None = None) -> memoryview:
    """``download`` of the object whose streamed GET from its first byte ``got`` is (bytes read
    from it already held): the response is dropped afterwards, however that ends."""
    try:
        out = await anyio.to_thread.run_sync(_memory, size)
        await got.land(out, size, landed)
        return out
    finally:
        got.close()


async def download_ranges(
    store: Any,
    key: str,
    url: str,
    size: int,
    ranges: Sequence[tuple[int, int]],
    head: bytes = b"",
) -> memoryview:
    """``size`` bytes of private writable memory holding the object's bytes in each ``(begin,
    end)`` of ``ranges`` (zeros elsewhere), those in ``head`` (its first bytes, read already)
    taken from it: ranges closer than ``_GAP`` are fetched as one, runs longer than
    ``_RANGE_BYTES`` cut up, ``_CONCURRENCY`` streamed ranged GETs at once."""
    out = await anyio.to_thread.run_sync(_memory, size)
    have = min(len(head), size)
    if have:
        await anyio.to_thread.run_sync(_land, out, 0, [head], have, None)
    limit = anyio.Semaphore(_CONCURRENCY)

    async def fetch(begin: int, end: int) -> None:
        async with limit:
            request = obstore.get_async(store, key, options={"range": (begin, end)})
            got = await call(url, "a ranged GET", request)
            await Incoming(got, url, begin, end).land(out, end)

    spans = spans_of([(max(b, have), e) for b, e in ranges])
    await gather([lambda b=b, e=e: fetch(b, e) for b, e in spans])  # type: ignore[misc]
    return out


def spans_of(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The ranged GETs that fetch ``ranges``: merged where closer than ``_GAP``, cut into pieces
    of at most ``_RANGE_BYTES``; empty ranges dropped."""
    merged: list[list[int]] = []
    for begin, end in sorted(r for r in ranges if r[1] > r[0]):
        if merged and begin <= merged[-1][1] + _GAP:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([begin, end])
    return [
        (at, min(at + _RANGE_BYTES, end))
        for begin, end in merged
        for at in range(begin, end, _RANGE_BYTES)
    ]


async def gather(jobs: list[Callable[[], Coroutine[Any, Any, Any]]]) -> None:
    """Run ``jobs`` at once; the first ``OSError`` of any, alone (not in a group)."""
    try:
        async with anyio.create_task_group() as tg:
            for job in jobs:
                tg.start_soon(job)
    except BaseExceptionGroup as group:
        matched, _ = group.split(OSError)
        if matched is None:
            raise
        first: BaseException = matched
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from group
