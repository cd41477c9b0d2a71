"""Moving bytes to and from one object: streamed multipart uploads, streamed and ranged downloads,
and client errors turned into ``OSError`` naming the URL and the HTTP status.

Every request is an ``obstore`` coroutine awaited on the caller's loop; copies between the
writer's buffers and Python objects run in worker threads.
"""

from __future__ import annotations

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
    "ObjectStoreError",
    "Upload",
    "call",
    "download",
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
        self._held: list[bytes] = []
        self._pos = 0
        self._send: MemoryObjectSendStream[bytes] | None = None
        self._done = anyio.Event()
        self._error: BaseException | None = None

    async def write_at(self, offset: int, buf: memoryview, n: int) -> None:
        """Append ``buf[:n]``; ``offset`` must be where the previous write ended."""
        if offset != self._pos:
            raise ValueError(f"{self._url}: object stores take writes in order ({offset})")
        data = await anyio.to_thread.run_sync(bytes, buf[:n])
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
            body = held[0] if len(held) == 1 else await anyio.to_thread.run_sync(b"".join, held)
            if self._hold is not None:
                self._hold(body)
                await anyio.lowlevel.checkpoint()
                return
            await call(self._url, "PUT", obstore.put_async(self._store, self._key, body))
            return
        await self._send.aclose()
        await self._wait()

    def close(self) -> None:
        """Stop feeding the upload (an abandoned write: its task is being cancelled)."""
        if self._send is not None:
            self._send.close()

    def _start(self) -> None:
        send, receive = anyio.create_memory_object_stream[bytes](0)
        self._send = send
        self._tg.start_soon(self._stream, receive)

    async def _wait(self) -> None:
        await self._done.wait()
        if self._error is not None:
            raise self._error

    async def _stream(self, receive: MemoryObjectReceiveStream[bytes]) -> None:
        held, self._held = self._held, []

        async def parts() -> AsyncIterator[bytes]:
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


def _put(out: memoryview, at: int, got: Any, n: int) -> None:
    """Copy the first ``n`` bytes of ``got`` into ``out`` at ``at`` (worker thread)."""
    out[at : at + n] = memoryview(got)[:n]


async def download(store: Any, key: str, url: str, size: int) -> memoryview:
    """The first ``size`` bytes of the object, in private writable memory.

    One streamed GET, each chunk copied in place by a worker thread as it arrives: faster than
    parallel ranged GETs at every size measured (moto: 0.33 s against 0.9 s for 256 MiB), and it
    holds no second copy of the object. Raises ``OSError`` naming ``url`` on a short object.
    """
    out = await anyio.to_thread.run_sync(_memory, size)
    if not size:
        await anyio.lowlevel.checkpoint()
        return out
    got = await call(url, "GET", obstore.get_async(store, key, options={"range": (0, size)}))
    stream, pos = got.stream(min_chunk_size=PART_BYTES), 0
    while pos < size:
        try:
            chunk = await call(url, "GET", stream.__anext__())
        except StopAsyncIteration:
            raise ObjectStoreError(f"{url}: {pos} bytes, {size} expected", None, path=url) from None
        n = min(len(chunk), size - pos)
        await anyio.to_thread.run_sync(_put, out, pos, chunk, n)
        pos += n
    return out


async def download_ranges(
    store: Any, key: str, url: str, size: int, ranges: Sequence[tuple[int, int]]
) -> memoryview:
    """``size`` bytes of private writable memory holding the object's bytes in each ``(begin,
    end)`` of ``ranges`` (zeros elsewhere): ranges closer than ``_GAP`` are fetched as one, runs
    longer than ``_RANGE_BYTES`` cut up, ``_CONCURRENCY`` ranged GETs at once."""
    out = await anyio.to_thread.run_sync(_memory, size)
    limit = anyio.Semaphore(_CONCURRENCY)

    async def fetch(begin: int, end: int) -> None:
        async with limit:
            got = await call(
                url, "a ranged GET", obstore.get_range_async(store, key, start=begin, end=end)
            )
        await anyio.to_thread.run_sync(_put, out, begin, got, end - begin)

    spans = spans_of(ranges)
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
