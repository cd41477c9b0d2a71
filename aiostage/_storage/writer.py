"""Durable writes of data files and manifests through the storage seam.

``DurableWriter.write_file`` copies each entry's bytes into a small ring of page-aligned buffers
(``chunk_bytes`` x ``buffers``: the only memory it adds) and hashes them there (xxh3_64) in a
worker thread while the earlier buffers are being written (``O_DIRECT`` where the storage allows
it; several writes in flight where it takes writes in any order, so the device always has the
next one queued). The data goes first, the header (which holds the checksums) last, then the
file is made durable. Which files make a checkpoint visible, and when, is ``commit``'s business.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

import anyio
import anyio.to_thread
import xxhash

from .._core import gc_pause
from .._format.codec import (
    MANIFEST,
    EncodedHeader,
    FileInfo,
    Header,
    LayoutMemo,
    Manifest,
    Source,
    encode_layout,
    encode_manifest,
)
from ..errors import CheckpointCorrupt
from .backend import WRITE_ALIGN, Storage
from .digests import source_digests
from .pipeline import cut, pipeline, ring

__all__ = ["DurableWriter", "WriteOptions", "WrittenFile"]

_MiB = 1 << 20


@dataclass(frozen=True, kw_only=True)
class WriteOptions:
    """How ``save`` writes its data files: ``buffers`` aligned buffers of ``chunk_bytes`` each
    (the only memory writing adds); one is filled (copy + checksum) while the others are written,
    up to ``buffers - 1`` writes in flight at once (one at a time to an object store, which takes
    a file in order).

    ``direct_io``: bypass the page cache (``O_DIRECT``) where the file system allows it; the
    data then goes to the device as it is written, and the final fsync has little left to do.
    Raises ``ValueError`` unless ``chunk_bytes`` is a positive multiple of 4096 and ``buffers``
    at least 1.
    """

    chunk_bytes: int = 8 * _MiB
    buffers: int = 4
    direct_io: bool = True

    def __post_init__(self) -> None:
        if self.chunk_bytes < WRITE_ALIGN or self.chunk_bytes % WRITE_ALIGN:
            raise ValueError(f"chunk_bytes must be a positive multiple of {WRITE_ALIGN}")
        if self.buffers < 1:
            raise ValueError(f"buffers must be at least 1, got {self.buffers}")


@dataclass(frozen=True, slots=True)
class WrittenFile:
    """A data file made durable, and how long writing and making it durable took."""

    info: FileInfo
    write_seconds: float
    fsync_seconds: float


class DurableWriter:
    """Writes data files and manifests durably into a ``Storage``.

    Every method raises ``OSError`` as the storage reports it; callers turn it into
    ``CheckpointWriteError``.
    """

    def __init__(self, storage: Storage, options: WriteOptions | None = None):
        self.storage = storage
        self.options = options or WriteOptions()

    async def write_file(
        self,
        path: PurePath,
        header: Header,
        sources: Sequence[Source],
        expected: Sequence[int] | None = None,
    ) -> WrittenFile:
        """Write ``header`` and the bytes of ``sources`` to a new file ``path``, durably.

        ``expected``: the entries' digests as their producer computed them (a received replica);
        the bytes are checked against them as they are written, and ``CheckpointCorrupt`` naming
        the entry is raised before the header goes out. Whatever scales with the number of
        entries (the header, the chunk plan, the checksums) runs in worker threads.
        """
        began = time.perf_counter()
        o = self.options
        filler = await anyio.to_thread.run_sync(_Filler, header, sources, o.chunk_bytes)
        ordered = getattr(self.storage, "ordered", False)
        async with (
            ring(o.buffers, o.chunk_bytes) as bufs,
            self.storage.create(path, direct=o.direct_io) as sink,
        ):

            async def fill(slot: int, job: _Job) -> None:
                await anyio.to_thread.run_sync(filler.fill, bufs[slot], job)

            async def write(slot: int, job: _Job) -> None:
                await sink.write_at(job.offset, bufs[slot], job.nbytes)

            async def put_header(size: int) -> None:
                for begin in range(0, size, o.chunk_bytes):
                    n = await anyio.to_thread.run_sync(filler.put, bufs[0], begin)
                    await sink.write_at(begin, bufs[0], n)

            jobs = filler.jobs
            if ordered:  # the storage takes bytes in order (an object store): the header first
                size, digest = await anyio.to_thread.run_sync(filler.hash_first, path, expected)
                await put_header(size)
            depth = 1 if ordered else max(1, len(bufs) - 1)  # one buffer fills meanwhile
            await pipeline(len(bufs), jobs, fill, write, depth=depth)
            if not ordered:
                size, digest = await anyio.to_thread.run_sync(filler.finish, path, expected)
                await put_header(size)
            wrote = time.perf_counter()
            await sink.finish(size + header.data_bytes)
        info = FileInfo(path.name, size + header.data_bytes, digest)
        return WrittenFile(info, wrote - began, time.perf_counter() - wrote)

    async def write_manifest(self, directory: PurePath, manifest: Manifest) -> int:
        """Write ``directory/manifest.json`` durably, then seal ``directory``; its size."""
        data = encode_manifest(manifest)
        async with self.storage.create(directory / MANIFEST, direct=False) as sink:
            await sink.write_at(0, memoryview(bytearray(data)), len(data))
            await sink.finish(len(data))
        await self.storage.seal(directory)
        return len(data)


@dataclass(frozen=True, slots=True)
class _Job:
    """A chunk to write: its file offset, its bytes, and its pieces (segment, start, bytes)."""

    offset: int
    nbytes: int
    pieces: list[tuple[int, int, int]]


#: the xxh3_64 of no bytes: the checksum of an empty entry, which no piece feeds
_EMPTY = xxhash.xxh3_64_intdigest(b"")
_NO_HEADER = EncodedHeader(b"", 0, 0)
#: the headers this process encoded last: the next save of a state dict laid out the same way
#: (same keys, shapes, dtypes, aliasing, values) reuses their text
_LAYOUTS = LayoutMemo()


class _Filler:
    """One file's bytes on their way out: its header (encoded once, checksums filled in last),
    the chunks to write, and each entry's checksum as the chunks are filled.

    Segment ``2k`` is the bytes of entry ``k``, segment ``2k + 1`` its zero padding. An entry
    whose bytes land whole in one chunk is hashed in one call; one cut by a chunk boundary (or
    padded) is hashed piece by piece. Built and used in worker threads, one chunk at a time.
    """

    def __init__(self, header: Header, sources: Sequence[Source], chunk: int) -> None:
        with gc_pause.paused():
            if not all(data.is_cpu and data.is_contiguous() for data, _ in sources):
                raise ValueError("the writer takes contiguous CPU tensors only")
            self.header, self.sources = header, sources
            self.encoded = encode_layout(header, _LAYOUTS)
            self.lengths = [n for data, pad in sources for n in (data.nbytes, pad)]
            start = len(self.encoded.blob)
            self.jobs = [
                _Job(start + k * chunk, sum(n for _, _, n in p), p)
                for k, p in enumerate(cut(self.lengths, chunk))
            ]
            self.digests = [_EMPTY] * len(sources)
            self.partial: dict[int, Any] = {}
            self.blob = b""
            self.hashed = False

    def fill(self, buf: memoryview, job: _Job) -> None:
        """Copy ``job``'s pieces into ``buf`` and hash them (worker thread).

        ``ctypes.memmove`` releases the GIL and, unlike a torch copy, never waits for torch's
        intra-op threads (which a busy host leaves waiting for a core).
        """
        base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        lengths, sources, digests, partial = self.lengths, self.sources, self.digests, self.partial
        pos = 0
        for segment, at, n in job.pieces:
            entry, is_pad = divmod(segment, 2)
            if is_pad:
                ctypes.memset(base + pos, 0, n)
            else:
                ctypes.memmove(base + pos, sources[entry][0].data_ptr() + at, n)
            if not self.hashed:  # else hash_first has every checksum already
                if n == lengths[segment] and not lengths[segment ^ 1]:  # the whole entry
                    digests[entry] = xxhash.xxh3_64_intdigest(buf[pos : pos + n])
                else:
                    partial.setdefault(entry, xxhash.xxh3_64()).update(buf[pos : pos + n])
            pos += n

    def finish(self, path: PurePath, expected: Sequence[int] | None) -> tuple[int, int]:
        """Put the checksums into the header (``put`` then copies it out); its length and its
        own xxh3_64 (worker thread).

        Raises ``CheckpointCorrupt`` naming the entry whose bytes differ from ``expected``.
        Drops the per-entry state here, so that the loop thread never spends time freeing it.
        """
        digests, self.digests, self.jobs, self.lengths = self.digests, [], [], []
        for entry, h in self.partial.items():
            digests[entry] = h.intdigest()
        self.partial.clear()
        if expected is not None:
            _compare(path, self.header, digests, expected)
        self.blob = self.encoded.with_checksums(digests)
        return len(self.blob), xxhash.xxh3_64_intdigest(self.blob)

    def hash_first(self, path: PurePath, expected: Sequence[int] | None) -> tuple[int, int]:
        """Hash every entry straight from its source, then ``finish``: the header is complete
        before any byte is written, for storages that take a file in order (worker thread)."""
        self.digests = source_digests(self.sources)
        self.hashed = True
        return self.finish(path, expected)

    def put(self, buf: memoryview, begin: int) -> int:
        """Copy what fits of the header from byte ``begin`` into ``buf``; how many bytes (worker
        thread). After the last piece the header bytes are dropped, here rather than on the loop."""
        piece = memoryview(self.blob)[begin : begin + len(buf)]
        buf[: len(piece)] = piece
        n = len(piece)
        piece.release()
        if begin + n >= len(self.blob):
            self.blob, self.encoded = b"", _NO_HEADER
        return n


def _compare(path: PurePath, header: Header, got: Sequence[int], expected: Sequence[int]) -> None:
    for e, mine, theirs in zip(header.entries, got, expected, strict=True):
        if mine != theirs:
            raise CheckpointCorrupt(
                f"{path}: entry {e.name!r} does not match the checksum it was produced with; "
                "its bytes were damaged on the way or in memory",
                path=path,
                key=e.name,
            )
