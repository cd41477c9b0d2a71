"""Durable writes: data files streamed in large aligned chunks, fsync, manifest last, rename.

``DurableWriter.write_file`` copies each entry's bytes into a small ring of page-aligned buffers
(``chunk_bytes`` x ``buffers``: the only memory it adds) and hashes them there (xxh3_64) in a
worker thread while the previous buffer is being written, ``O_DIRECT`` where the file system
allows it. The data goes first, the header (which holds the checksums) last, then the file is
fsynced. ``commit`` makes a finished temporary directory the checkpoint; ``sweep`` clears what
interrupted saves leave behind.
"""

from __future__ import annotations

import errno
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
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
    round_up,
)
from ..errors import CheckpointCorrupt
from . import localfs

if sys.version_info < (3, 11):  # pragma: no cover
    pass


__all__ = ["DurableWriter", "WriteHook", "WriterOptions", "WrittenFile"]

_MiB = 1 << 20


#: a process-wide fault-injection hook (``aiostage.testing.FaultyWrites``), called on the loop
#: before every write with (file, offset, bytes); it may raise (``OSError(ENOSPC)``), or return
#: ``write(fd, data) -> bytes written``, which replaces the first ``os.write`` of that write and
#: runs in a worker thread
WriteHook = Callable[[str, int, int], Callable[[int, memoryview], int] | None]


#: the hooks every ``DurableWriter`` consults (tests only)
write_hooks: list[WriteHook] = []


#: a chunk to write: its file offset and its pieces (segment, start in the segment, bytes)
_Job = tuple[int, list[tuple[int, int, int]]]


@dataclass(frozen=True, kw_only=True)
class WriterOptions:
    """How ``DurableWriter`` writes: ``buffers`` aligned buffers of ``chunk_bytes`` each.

    ``direct_io``: bypass the page cache (``O_DIRECT``) where the file system allows it; the
    data then goes to the device as it is written, and the final fsync has little left to do.
    """

    chunk_bytes: int = 16 * _MiB
    buffers: int = 2
    direct_io: bool = True

    def __post_init__(self) -> None:
        if self.chunk_bytes < localfs.ALIGN or self.chunk_bytes % localfs.ALIGN:
            raise ValueError(f"chunk_bytes must be a positive multiple of {localfs.ALIGN}")
        if self.buffers < 1:
            raise ValueError(f"buffers must be at least 1, got {self.buffers}")


@dataclass(frozen=True, slots=True)
class WrittenFile:
    """A data file on disk (fsynced) and how long writing and fsync took."""

    info: FileInfo
    write_seconds: float
    fsync_seconds: float


class DurableWriter:
    """Writes data files and manifests durably (``write_hooks`` inject faults in tests).

    Every method raises ``OSError`` as the file system reports it; callers turn it into
    ``CheckpointWriteError``.
    """

    def __init__(self, options: WriterOptions | None = None):
        self.options = options or WriterOptions()

    async def write_file(
        self,
        path: Path,
        header: Header,
        sources: Sequence[Source],
        expected: Sequence[int] | None = None,
    ) -> WrittenFile:
        """Write ``header`` and the bytes of ``sources`` to a new file ``path``, then fsync it.

        ``expected``: the entries' digests as their producer computed them (a received replica);
        the bytes are checked against them as they are written, and ``CheckpointCorrupt`` naming
        the entry is raised before the header goes out.
        """
        began = time.perf_counter()
        o = self.options
        hashes = [xxhash.xxh3_64() for _ in sources]
        start = len(await anyio.to_thread.run_sync(encode_header, header))  # same with sums
        segments = [n for data, pad in sources for n in (data.numel(), pad)]
        chunks = enumerate(localfs.cut(segments, o.chunk_bytes))
        jobs = [(start + k * o.chunk_bytes, pieces) for k, pieces in chunks]
        async with (
            localfs.ring(o.buffers, o.chunk_bytes) as ring,
            localfs.open_file(path, "xb", direct=o.direct_io) as f,
        ):

            async def fill(slot: int, job: _Job) -> None:
                await anyio.to_thread.run_sync(_fill, ring[slot], job[1], sources, hashes)

            async def write(slot: int, job: _Job) -> None:
                await self._write(f, ring[slot], job[0], sum(n for _, _, n in job[1]))

            await localfs.pipeline(len(ring), jobs, fill, write)
            digests = tuple(h.intdigest() for h in hashes)
            if expected is not None:
                _compare(path, header, digests, expected)
            final = replace(header, checksums=digests)
            blob = await anyio.to_thread.run_sync(encode_header, final)
            for begin in range(0, len(blob), o.chunk_bytes):
                piece = blob[begin : begin + o.chunk_bytes]
                ring[0][: len(piece)] = piece
                await self._write(f, ring[0], begin, len(piece))
            size = len(blob) + header.data_bytes
            await f.truncate(size)  # drops the alignment padding of the last chunk
            wrote = time.perf_counter()
            await localfs.fsync(f.fileno())
        info = FileInfo(path.name, size, xxhash.xxh3_64_intdigest(blob))
        return WrittenFile(info, wrote - began, time.perf_counter() - wrote)

    async def write_manifest(self, directory: Path, manifest: Manifest) -> int:
        """Write and fsync ``directory/manifest.json``, then fsync ``directory``; its size."""
        data = encode_manifest(manifest)
        async with localfs.open_file(directory / MANIFEST, "xb") as f:
            await self._write(f, memoryview(data), 0, len(data))
            await localfs.fsync(f.fileno())
        await localfs.fsync_dir(directory)
        return len(data)

    async def _write(self, f: Any, buf: memoryview, offset: int, n: int) -> None:
        """Write ``buf[:n]`` at ``offset``, padded with zeros to ``ALIGN`` (truncated later)."""
        padded = min(round_up(n, localfs.ALIGN), len(buf))
        if padded > n:
            buf[n:padded] = bytes(padded - n)
        replaced = _hooked(str(f.name), offset, n)
        await f.seek(offset)
        done = 0
        if replaced is not None:
            done = await anyio.to_thread.run_sync(replaced, f.fileno(), buf[:padded])
        while done < padded:
            wrote = await f.write(buf[done:padded])
            if not wrote:  # no progress: write(2) would spin here forever
                raise OSError(errno.EIO, f"a write to {f.name} stored nothing at {offset + done}")
            done += wrote


def _compare(path: Path, header: Header, got: Sequence[int], expected: Sequence[int]) -> None:
    for e, mine, theirs in zip(header.entries, got, expected, strict=True):
        if mine != theirs:
            raise CheckpointCorrupt(
                f"{path}: entry {e.name!r} does not match the checksum it was produced with; "
                "its bytes were damaged on the way or in memory",
                path=path,
                key=e.name,
            )


def _hooked(name: str, offset: int, n: int) -> Callable[[int, memoryview], int] | None:
    """Consult ``write_hooks``; the last replacement write offered wins."""
    replaced = None
    for hook in tuple(write_hooks):
        replaced = hook(name, offset, n) or replaced
    return replaced


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
