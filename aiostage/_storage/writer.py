"""Durable writes of data files and manifests through the storage seam.

``DurableWriter.write_file`` copies each entry's bytes into a small ring of page-aligned buffers
(``chunk_bytes`` x ``buffers``: the only memory it adds) and hashes them there (xxh3_64) in a
worker thread while the previous buffer is being written (``O_DIRECT`` where the storage allows
it). The data goes first, the header (which holds the checksums) last, then the file is made
durable. Which files make a checkpoint visible, and when, is ``commit``'s business.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import PurePath
from typing import Any

import anyio
import anyio.to_thread
import torch
import xxhash

from .._core.buffers import copy_bytes
from .._format.codec import (
    MANIFEST,
    FileInfo,
    Header,
    Manifest,
    Source,
    encode_header,
    encode_manifest,
)
from ..errors import CheckpointCorrupt
from .backend import WRITE_ALIGN, Storage
from .pipeline import cut, pipeline, ring

__all__ = ["DurableWriter", "WriteOptions", "WrittenFile"]

_MiB = 1 << 20
#: a chunk to write: its file offset and its pieces (segment, start in the segment, bytes)
_Job = tuple[int, list[tuple[int, int, int]]]


@dataclass(frozen=True, kw_only=True)
class WriteOptions:
    """How ``save`` writes its data files: ``buffers`` aligned buffers of ``chunk_bytes`` each
    (the only memory writing adds), filled (copy + checksum) while the previous one is written.

    ``direct_io``: bypass the page cache (``O_DIRECT``) where the file system allows it; the
    data then goes to the device as it is written, and the final fsync has little left to do.
    Raises ``ValueError`` unless ``chunk_bytes`` is a positive multiple of 4096 and ``buffers``
    at least 1.
    """

    chunk_bytes: int = 16 * _MiB
    buffers: int = 2
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
        the entry is raised before the header goes out.
        """
        began = time.perf_counter()
        o = self.options
        hashes = [xxhash.xxh3_64() for _ in sources]
        start = len(await anyio.to_thread.run_sync(encode_header, header))  # same with sums
        segments = [n for data, pad in sources for n in (data.numel(), pad)]
        jobs = [(start + k * o.chunk_bytes, p) for k, p in enumerate(cut(segments, o.chunk_bytes))]
        async with (
            ring(o.buffers, o.chunk_bytes) as bufs,
            self.storage.create(path, direct=o.direct_io) as sink,
        ):

            async def fill(slot: int, job: _Job) -> None:
                await anyio.to_thread.run_sync(_fill, bufs[slot], job[1], sources, hashes)

            async def write(slot: int, job: _Job) -> None:
                await sink.write_at(job[0], bufs[slot], sum(n for _, _, n in job[1]))

            await pipeline(len(bufs), jobs, fill, write)
            digests = tuple(h.intdigest() for h in hashes)
            if expected is not None:
                _compare(path, header, digests, expected)
            blob = await anyio.to_thread.run_sync(encode_header, replace(header, checksums=digests))
            for begin in range(0, len(blob), o.chunk_bytes):
                piece = blob[begin : begin + o.chunk_bytes]
                bufs[0][: len(piece)] = piece
                await sink.write_at(begin, bufs[0], len(piece))
            wrote = time.perf_counter()
            await sink.finish(len(blob) + header.data_bytes)
        info = FileInfo(path.name, len(blob) + header.data_bytes, xxhash.xxh3_64_intdigest(blob))
        return WrittenFile(info, wrote - began, time.perf_counter() - wrote)

    async def write_manifest(self, directory: PurePath, manifest: Manifest) -> int:
        """Write ``directory/manifest.json`` durably, then seal ``directory``; its size."""
        data = encode_manifest(manifest)
        async with self.storage.create(directory / MANIFEST, direct=False) as sink:
            await sink.write_at(0, memoryview(bytearray(data)), len(data))
            await sink.finish(len(data))
        await self.storage.seal(directory)
        return len(data)


def _compare(path: PurePath, header: Header, got: Sequence[int], expected: Sequence[int]) -> None:
    for e, mine, theirs in zip(header.entries, got, expected, strict=True):
        if mine != theirs:
            raise CheckpointCorrupt(
                f"{path}: entry {e.name!r} does not match the checksum it was produced with; "
                "its bytes were damaged on the way or in memory",
                path=path,
                key=e.name,
            )


def _fill(
    buf: memoryview,
    pieces: list[tuple[int, int, int]],
    sources: Sequence[Source],
    hashes: list[Any],
) -> None:
    """Copy ``pieces`` into ``buf`` and feed each to its entry's hash (worker thread).

    Segment ``2k`` is the bytes of entry ``k``, segment ``2k + 1`` its zero padding.
    """
    dst = torch.frombuffer(buf, dtype=torch.uint8)
    pos = 0
    for segment, at, n in pieces:
        entry, is_pad = divmod(segment, 2)
        if is_pad:
            dst[pos : pos + n].zero_()
        else:
            copy_bytes(sources[entry][0][at : at + n], dst[pos : pos + n])
        hashes[entry].update(buf[pos : pos + n])
        pos += n
