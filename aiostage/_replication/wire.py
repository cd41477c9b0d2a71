"""Replication's frame format: message ranges, the first message, header checks, digests.

Pure code, no I/O: ``transport`` posts what this module lays out.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from typing import Any, cast

import torch
import xxhash

from .._core.buffers import copy_bytes
from .._format.codec import DATA_ALIGN, MAX_HEADER, Header, Source, decode_header
from ..errors import CheckpointCorrupt, ReplicationError

__all__ = [
    "BUCKET",
    "MAGIC",
    "SMALL",
    "check_head",
    "decode_frame_header",
    "entry_digests",
    "plan_messages",
]

MAGIC = 0x41494F5354414745  # "AIOSTAGE"
WIRE_VERSION = 1


BUCKET = 32 << 20
SMALL = 1 << 20


MAX_ENTRIES = 10_000_000


def plan_messages(
    entries: Sequence[tuple[int, int]], bucket: int = BUCKET, small: int = SMALL
) -> list[tuple[int, int]]:
    """Cut the data region into message byte ranges ``[a, b)`` from the entries' ``(begin, end)``.

    Entries must tile the region in order (``decode_header`` checks it). A large entry gets
    ranges of its own (``bucket`` at most); runs of small entries share one range.
    """
    out: list[tuple[int, int]] = []
    start: int | None = None
    end = 0
    for begin, end in entries:
        if end - begin >= small:
            if start is not None and begin > start:
                out.append((start, begin))
            start = None
            out.extend((a, min(a + bucket, end)) for a in range(begin, end, bucket))
        elif start is None:
            start = begin
        elif end - start > bucket:
            out.append((start, begin))
            start = begin
    if start is not None and end > start:
        out.append((start, end))
    return out


def spans(header: Header) -> list[tuple[int, int]]:
    return [(e.begin, e.end) for e in header.entries]


def messages(
    header: Header, sources: Sequence[Source], ranges: list[tuple[int, int]]
) -> Iterator[torch.Tensor]:
    """One uint8 tensor per range: a slice of an entry's memory, or a packed copy."""
    entries = header.entries
    k = 0
    for a, b in ranges:
        while entries[k].end <= a:
            k += 1
        e, (data, _pad) = entries[k], sources[k]
        if e.begin <= a and b <= e.begin + data.numel():
            yield data[a - e.begin : b - e.begin]
            continue
        buf = torch.empty(b - a, dtype=torch.uint8)
        j = k
        while j < len(entries) and entries[j].begin < b:
            _pack(buf, a, entries[j].begin, sources[j], b)
            j += 1
        yield buf


def _pack(buf: torch.Tensor, a: int, begin: int, source: Source, b: int) -> None:
    """Copy the part of an entry (bytes, then zero padding) that falls in ``[a, b)`` into ``buf``."""
    data, pad = source
    lo, hi = max(a, begin), min(b, begin + data.numel() + pad)
    split = min(hi, begin + data.numel())
    if split > lo:
        copy_bytes(data[lo - begin : split - begin], buf[lo - a : split - a])
    if hi > max(lo, split):
        buf[max(lo, split) - a : hi - a].zero_()


def entry_digests(sources: Sequence[Source]) -> list[int]:
    """The xxh3_64 of each entry (its bytes, then its zero padding), as a frame carries them
    (worker thread): hashed once for a frame sent to many peers."""
    out = []
    for data, pad in sources:
        h = xxhash.xxh3_64(tensor_bytes(data))
        if pad:
            h.update(bytes(pad))
        out.append(h.intdigest())
    return out


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(cast(Any, t.numpy()))


def check_head(
    magic: int, version: int, header_len: int, data_len: int, n_entries: int, max_data: int
) -> str | None:
    """What is wrong with a frame's first message, or ``None``; checked before any allocation."""
    if magic != MAGIC:
        return f"not an aiostage frame (magic {magic:#x}); is the peer running aiostage?"
    if version != WIRE_VERSION:
        return f"wire version {version}, expected {WIRE_VERSION}; run one aiostage version"
    if not DATA_ALIGN <= header_len <= MAX_HEADER + 8 or header_len % DATA_ALIGN:
        return f"header length {header_len} is out of range"
    if not 0 <= data_len <= max_data:
        return f"data length {data_len} is out of range (limit {max_data} bytes)"
    if not 0 <= n_entries <= MAX_ENTRIES:
        return f"{n_entries} entries is out of range"
    return None


def decode_frame_header(raw: bytes, data_len: int, n_entries: int, peer: int) -> Header:
    """Validate the header bytes of a frame (``ReplicationError(peer, "header")``)."""
    (n,) = struct.unpack("<Q", raw[:8])
    if n != len(raw) - 8:
        raise ReplicationError(
            f"header says {n} bytes, got {len(raw) - 8}", peer=peer, phase="header"
        )
    try:
        header = decode_header(raw[8:], data_len, f"frame from rank {peer}")
    except CheckpointCorrupt as exc:
        raise ReplicationError(str(exc), peer=peer, phase="header") from exc
    if len(header.entries) != n_entries:
        raise ReplicationError(
            f"{len(header.entries)} entries, the frame said {n_entries}", peer=peer, phase="header"
        )
    return header


class Hasher:
    """The xxh3_64 of each entry, fed message by message (message ``i`` covers ``ranges[i]``)."""

    def __init__(self, header: Header, ranges: list[tuple[int, int]]) -> None:
        self.entries, self.ranges = header.entries, ranges
        self.hashes = [xxhash.xxh3_64() for _ in header.entries]
        self.k = 0

    def take(self, i: int, message: memoryview) -> None:
        """Hash the bytes of message ``i`` into the entries they belong to (in order)."""
        a, b = self.ranges[i]
        entries = self.entries
        while entries[self.k].end <= a:
            self.k += 1
        j = self.k
        while j < len(entries) and entries[j].begin < b:
            lo, hi = max(a, entries[j].begin), min(b, entries[j].end)
            if hi > lo:
                self.hashes[j].update(message[lo - a : hi - a])
            j += 1

    def digests(self) -> list[int]:
        """One digest per entry."""
        return [h.intdigest() for h in self.hashes]

    def check(self, sums: Sequence[int], peer: int) -> None:
        """Compare with the sender's checksums; ``ReplicationError(peer, "verify")`` on a mismatch."""
        for e, got, want in zip(self.entries, self.digests(), sums, strict=True):
            if got != want:
                raise ReplicationError(
                    f"checksum mismatch in entry {e.name!r}: the bytes were damaged on the way "
                    "(or the peer's stager was built with verify=False)",
                    peer=peer,
                    phase="verify",
                )
