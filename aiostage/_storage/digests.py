"""Checking stored bytes: per-entry xxh3_64 digests of a mapped data region, chunk by chunk.

Used by ``load`` (which also pages the data in this way) and by ``aiostage verify``; one place
computes the digests and names the tensors of an entry that does not match. Whatever scales
with the number of entries runs in worker threads: the loop thread only hands over chunks.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
import xxhash

from .._core import gc_pause
from .._core.tree import KeyPath, key_str
from .._format.codec import Header, Source
from .pipeline import cut

__all__ = [
    "ArrivalCheck",
    "entry_keys",
    "hash_entries",
    "mismatched_entries",
    "source_digests",
]

_CHUNK = 16 << 20


def source_digests(sources: Sequence[Source]) -> list[int]:
    """The xxh3_64 of each entry still to be written (its bytes, then its zero padding), read
    straight from its source by address, so any contiguous CPU tensor will do (worker thread):
    what the header lists, known before a byte is written."""
    out = []
    for data, pad in sources:
        h = xxhash.xxh3_64()
        if data.nbytes:
            h.update((ctypes.c_char * data.nbytes).from_address(data.data_ptr()))
        if pad:
            h.update(bytes(pad))
        out.append(h.intdigest())
    return out


async def hash_entries(
    data: memoryview,
    header: Header,
    only: Collection[int] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[int, int]:
    """The xxh3_64 of every entry of ``header`` (or each of ``only``) over ``data``, its data
    region, hashed in file order, ``_CHUNK`` bytes per worker-thread call (touching mapped pages
    brings them in on the kernel's readahead). ``progress`` hears of the bytes done."""
    hasher = await _hash(data, header, only, progress)
    return await anyio.to_thread.run_sync(hasher.digests)


async def mismatched_entries(
    data: memoryview, header: Header, only: Collection[int] | None = None
) -> list[int]:
    """The entries (of ``only``, or all) whose bytes in ``data`` differ from the checksums of
    ``header``, in file order; empty when all match. Compared in a worker thread."""
    hasher = await _hash(data, header, only, None)
    return await anyio.to_thread.run_sync(hasher.mismatches)


async def _hash(
    data: memoryview,
    header: Header,
    only: Collection[int] | None,
    progress: Callable[[int], None] | None,
) -> _Hasher:
    hasher = await anyio.to_thread.run_sync(_Hasher, header, only)
    for job in hasher.jobs:  # one per chunk of bytes, however many entries a chunk holds
        await anyio.to_thread.run_sync(hasher.feed, data, job)
        if progress is not None:
            progress(job.nbytes)
    return hasher


@dataclass(frozen=True, slots=True)
class _Job:
    """A chunk of the data to hash: its pieces (entry, start in the data, bytes)."""

    nbytes: int
    pieces: list[tuple[int, int, int]]


class _Hasher:
    """The digests of some entries of a data region, fed chunk by chunk (worker threads).

    An entry that lies whole in one chunk is hashed in one call; one cut by a chunk boundary is
    hashed piece by piece.
    """

    def __init__(self, header: Header, only: Collection[int] | None) -> None:
        entries = header.entries
        with gc_pause.paused():
            order = range(len(entries)) if only is None else only
            self.order = sorted(order, key=lambda i: entries[i].begin)
            self.header = header
            lengths = [entries[i].end - entries[i].begin for i in self.order]
            self.jobs = [_Job(sum(n for _, _, n in p), p) for p in cut(lengths, _CHUNK)]
            self.lengths = lengths
            self.found = [xxhash.xxh3_64_intdigest(b"")] * len(self.order)
            self.partial: dict[int, Any] = {}

    def feed(self, data: memoryview, job: _Job) -> None:
        """Hash ``job``'s pieces of ``data`` (worker thread)."""
        entries, order, lengths, found = self.header.entries, self.order, self.lengths, self.found
        for seg, at, n in job.pieces:
            begin = entries[order[seg]].begin + at
            if n == lengths[seg]:
                found[seg] = xxhash.xxh3_64_intdigest(data[begin : begin + n])
            else:
                self.partial.setdefault(seg, xxhash.xxh3_64()).update(data[begin : begin + n])

    def digests(self) -> dict[int, int]:
        """Entry index -> digest, for every entry hashed (worker thread, once: the per-entry
        state is dropped here, so that the loop thread never spends time freeing it)."""
        found, order = self.found, self.order
        for seg, h in self.partial.items():
            found[seg] = h.intdigest()
        self.found, self.order, self.lengths, self.jobs, self.partial = [], [], [], [], {}
        return dict(zip(order, found, strict=True))

    def mismatches(self) -> list[int]:
        """The entries whose digest is not their checksum (worker thread)."""
        sums = self.header.checksums
        return [i for i, got in self.digests().items() if sums[i] != got]


class ArrivalCheck:
    """The checksums of every entry of a data region, checked as its bytes land in file order.

    ``landed`` (a worker thread, called with the file's buffer and the offset its bytes are in
    up to) hashes what came since its last call, each entry whole when it came whole and piece
    by piece otherwise, and compares each entry's digest as soon as its last byte is in;
    ``start`` is where the data region begins in the file. It returns False once an entry does
    not match, which stops the download (the load fails on that entry).
    """

    def __init__(self, header: Header, start: int) -> None:
        with gc_pause.paused():
            entries = header.entries
            self._order = sorted(range(len(entries)), key=lambda i: entries[i].begin)
            self._spans = [(start + entries[i].begin, start + entries[i].end) for i in self._order]
        self._sums = header.checksums
        self._next = 0  # the first entry (of _order) not yet fully hashed
        self._partial: Any = None  # its digest so far, when part of it has landed
        self._done = 0  # the file offset its hashed bytes reach (within its span)
        self.bad: list[int] = []

    def landed(self, data: memoryview, upto: int) -> bool:
        """Hash and check the entries' bytes before ``upto`` not hashed yet (worker thread)."""
        spans = self._spans
        while self._next < len(spans):
            begin, end = spans[self._next]
            lo, hi = max(begin, self._done), min(end, upto)
            if hi < end and hi <= lo:
                break  # nothing new of this entry yet
            if self._partial is None and lo == begin and hi == end:
                digest = xxhash.xxh3_64_intdigest(data[begin:end])
            else:
                if self._partial is None:
                    self._partial = xxhash.xxh3_64()
                self._partial.update(data[lo:hi])
                if hi < end:
                    self._done = hi
                    break
                digest, self._partial = self._partial.intdigest(), None
            entry = self._order[self._next]
            if digest != self._sums[entry]:
                self.bad.append(entry)
            self._next, self._done = self._next + 1, end
        return not self.bad

    def mismatches(self) -> list[int]:
        """The entries that did not match (the first at most: checking stops there); every
        entry must have landed, or this raises ``RuntimeError``."""
        if not self.bad and self._next < len(self._spans):
            raise RuntimeError("checked before every entry landed")
        return self.bad


def entry_keys(header: Header, paths: Sequence[KeyPath], entry: int) -> list[str]:
    """The key paths of the tensors stored in ``entry`` (what a mismatch there damages)."""
    return [key_str(paths[t]) for t, r in enumerate(header.records) if r.entry == entry]
