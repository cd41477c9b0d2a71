"""Writing a version's data region while it is already on the wire: the writer (``Fill``) and
its entries as sources whose reads wait for it (``Filling``), both used in worker threads.

The publisher copies a CPU state dict into its buffer entry by entry and sends each message as
soon as the entries it covers are written, so the copy overlaps the transfer instead of
preceding it. When it verifies, each entry's digest is hashed in the same pass, chunk by chunk
right after the chunk is copied (its bytes still in the cache), so the version is read once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import overload

import torch
import xxhash

from .._core.buffers import copy_bytes
from .._format.codec import Entry, Header, Source
from .._replication.wire import tensor_bytes

__all__ = ["Fill", "Filling", "write_entry", "write_hashed"]

#: bytes copied then hashed at a time: small enough to be still in the cache when hashed
CHUNK = 4 << 20


def write_entry(data: torch.Tensor, begin: int, source: Source) -> None:
    """Write one entry (its bytes, then zero padding) into a data region at ``begin``."""
    src, pad = source
    end = begin + src.numel()
    if src.numel():
        copy_bytes(src.reshape(-1), data[begin:end])
    if pad:
        data[end : end + pad].zero_()


def write_hashed(
    data: torch.Tensor,
    entry: Entry,
    source: Source,
    chunk: int = CHUNK,
    written: Callable[[], None] | None = None,
) -> int:
    """``write_entry``, hashing the written bytes (``entry``'s span of ``data``: its bytes,
    then its zero padding) ``chunk`` bytes at a time right after copying them; their xxh3_64,
    the entry's digest on the wire. ``written`` is called once every byte is written, before
    the last chunk is hashed (a send of the entry need not wait for its hash)."""
    src, pad = source
    flat, n, begin = src.reshape(-1), src.numel(), entry.begin
    h = xxhash.xxh3_64()
    last = 0  # where the last chunk begins: hashed after ``written``
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        copy_bytes(flat[a:b], data[begin + a : begin + b])
        if b < n:
            h.update(tensor_bytes(data[begin + a : begin + b]))
        last = a
    if pad:
        data[begin + n : begin + n + pad].zero_()
    if written is not None:
        written()
    h.update(tensor_bytes(data[begin + last : begin + n + pad]))
    return h.intdigest()


class Fill:
    """The copy of ``sources`` (the caller's tensors) into ``data`` (a version's data region,
    laid out by ``header``), entry by entry; ``wait(k)`` blocks until entry ``k`` is written.

    ``run`` does the copy (a worker thread); a copy that fails or is abandoned (``abandon``)
    makes every waiter raise ``RuntimeError``, so a send never reads bytes not written. With
    ``hashing``, ``digests`` holds each entry's xxh3_64 once the copy finished.
    """

    def __init__(
        self, header: Header, sources: list[Source], data: torch.Tensor, hashing: bool = False
    ) -> None:
        self._header, self._sources, self._data = header, sources, data
        self._n = len(sources)
        self._cond = threading.Condition()
        self._done = 0
        self._error: str | None = None
        self._hashing = hashing
        self._found: list[int] = []

    @property
    def digests(self) -> list[int] | None:
        """Each entry's digest, hashed as it was written (``None`` without ``hashing`` or
        before the copy finished)."""
        return self._found if self._hashing and len(self._found) == self._n else None

    @property
    def finished(self) -> bool:
        """Whether every entry is written."""
        return self._done == self._n

    def run(self) -> None:
        """Write every entry in order, telling waiters after each (worker thread)."""
        try:
            for k, (entry, source) in enumerate(
                zip(self._header.entries, self._sources, strict=True)
            ):
                if self._hashing:
                    told = partial(self._written, k)
                    self._found.append(write_hashed(self._data, entry, source, written=told))
                else:
                    write_entry(self._data, entry.begin, source)
                    self._written(k)
        except BaseException as exc:
            self.abandon(f"the publisher's copy of this version failed: {exc!r}")
            raise
        finally:
            self._sources = []  # the caller's tensors: not kept past the copy

    def _written(self, k: int) -> None:
        """Entry ``k`` is written: wake its waiters."""
        with self._cond:
            self._done = k + 1
            self._cond.notify_all()

    def abandon(self, why: str) -> None:
        """Give up on the entries not written yet: their waiters raise ``RuntimeError(why)``."""
        with self._cond:
            if self._error is None and not self.finished:
                self._error = why
            self._cond.notify_all()

    def wait(self, k: int) -> None:
        """Block until entry ``k`` is written (worker thread). Raises ``RuntimeError`` when the
        copy failed or was abandoned first."""
        with self._cond:
            self._cond.wait_for(lambda: self._done > k or self._error is not None)
            if self._done <= k:
                raise RuntimeError(self._error)


class Filling(Sequence[Source]):
    """A version's entries as sources (``sources``, views of its data region) whose item ``k``
    is handed out once ``fill`` wrote it: what a frame is sent from while it is being written.
    Only for worker threads, since reading an item may block."""

    def __init__(self, fill: Fill, sources: list[Source]) -> None:
        self._fill, self._sources = fill, sources

    def __len__(self) -> int:
        return len(self._sources)

    @overload
    def __getitem__(self, k: int) -> Source: ...

    @overload
    def __getitem__(self, k: slice) -> Sequence[Source]: ...

    def __getitem__(self, k: int | slice) -> Source | Sequence[Source]:
        if isinstance(k, slice):
            picked = range(len(self._sources))[k]
            if picked:
                self._fill.wait(max(picked))
            return self._sources[k]
        self._fill.wait(range(len(self._sources))[k])
        return self._sources[k]

    def __iter__(self) -> Iterator[Source]:
        for k in range(len(self._sources)):
            yield self[k]
