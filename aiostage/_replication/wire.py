"""Replication's frame format: message ranges, the first message, header checks, digests, and
the limits a receiver holds a peer's frames to.

Pure code, no I/O: ``transport`` posts what this module lays out.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import xxhash

from .._core.buffers import copy_bytes
from .._format.codec import (
    DATA_ALIGN,
    MAX_DATA,
    MAX_HEADER,
    Header,
    Source,
    decode_header,
    decode_layout,
)
from .._format.records import Entry
from ..errors import ReplicationError

__all__ = [
    "BUCKET",
    "MAGIC",
    "PARSE_BUDGET",
    "SMALL",
    "Limits",
    "Packs",
    "RefusedAfterLanding",
    "check_digests",
    "check_head",
    "check_lengths",
    "decode_frame_header",
    "limits_like",
    "limits_of",
    "parse_cost",
    "plan_messages",
    "tensor_bytes",
    "too_long",
    "unknown_limits",
]

MAGIC = 0x41494F5354414745  # "AIOSTAGE"
WIRE_VERSION = 1


BUCKET = 32 << 20
SMALL = 1 << 20


MAX_ENTRIES = 10_000_000

#: what parsing a header may cost (bytes of Python objects, ``parse_cost``) when nothing is known
#: of the state it describes: a 100 MB header of real records costs ~1.1-2.0 GB, one of ``[[],...]``
#: 4.4 GB
PARSE_BUDGET = 2 << 30
#: slack on bounds taken from this rank's own state (uneven shards, padding, a few more entries)
_DATA_SLACK = 64 << 20
_HEADER_SLACK = 64 << 10
_PARSE_SLACK = 16 << 20


@dataclass(frozen=True, slots=True)
class Limits:
    """What a receiver agreed to take from a peer, checked before anything is allocated for it:
    the bytes of the data region, of the header as sent (length prefix and padding included),
    and what parsing that header may cost (``parse_cost``); ``why`` says where they come from."""

    data: int
    header: int
    parse: int
    why: str


def limits_like(raw: bytes, data_bytes: int, what: str = "this rank's own state") -> Limits:
    """Limits for a frame like one of ``data_bytes`` with the header ``raw`` (``encode_header``):
    twice as large, plus some slack (ranks of one job hold states of about the same size)."""
    return Limits(
        2 * data_bytes + _DATA_SLACK,
        2 * len(raw) + _HEADER_SLACK,
        2 * parse_cost(raw) + _PARSE_SLACK,
        f"twice {what}, plus slack",
    )


def limits_of(max_bytes: int) -> Limits:
    """Limits set by the caller: ``max_bytes`` of data, a header of as many bytes (at most the
    format's ``MAX_HEADER``), parsed within ``PARSE_BUDGET``."""
    header = min(MAX_HEADER + 8, max(max_bytes, DATA_ALIGN))
    return Limits(max_bytes, header, PARSE_BUDGET, f"max_bytes={max_bytes}")


def unknown_limits() -> Limits:
    """Limits when nothing is known of the state to come: this host's memory, the format's
    longest header, ``PARSE_BUDGET``."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # pragma: no cover - not a POSIX host
        memory = MAX_DATA
    return Limits(min(memory, MAX_DATA), MAX_HEADER + 8, PARSE_BUDGET, "this host's memory")


def parse_cost(raw: bytes) -> int:
    """An upper estimate of the memory ``json`` takes to parse ``raw`` (and the JSON string it
    nests): a dict costs ~200 bytes, a list or any value ~64, a string its bytes. Measured, real
    headers cost 7-13 times their size and this says 11-20; ``[[],[],...]`` costs 22 (says 45)."""
    values = raw.count(b"[") + raw.count(b",") + raw.count(b":")
    return 200 * raw.count(b"{") + 64 * values + 2 * len(raw)


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
    header: Header,
    sources: Sequence[Source],
    ranges: list[tuple[int, int]],
    pack: Callable[[int], torch.Tensor] | None = None,
) -> Iterator[torch.Tensor]:
    """One uint8 tensor per range: a slice of an entry's memory, or a copy packed into
    ``pack(n)`` (a uint8 tensor of ``n`` bytes; default: a new one)."""
    entries = header.entries
    k = 0
    for a, b in ranges:
        while entries[k].end <= a:
            k += 1
        e, (data, _pad) = entries[k], sources[k]
        if e.begin <= a and b <= e.begin + data.numel():
            yield data[a - e.begin : b - e.begin]
            continue
        buf = pack(b - a) if pack is not None else torch.empty(b - a, dtype=torch.uint8)
        j = k
        while j < len(entries) and entries[j].begin < b:
            _pack(buf, a, entries[j].begin, sources[j], b)
            j += 1
        yield buf


class Packs:
    """Packing buffers kept from one frame to the next: a repeated layout packs its runs of
    small entries into memory already faulted in (new buffers cost as much in page faults as
    the copy itself). Safe to share between threads: each frame takes its own buffers."""

    def __init__(self) -> None:
        self._free: dict[int, list[torch.Tensor]] = {}

    def take(self, n: int) -> torch.Tensor:
        """A uint8 tensor of ``n`` bytes, one a finished frame left if there is one."""
        try:
            return self._free[n].pop()
        except (KeyError, IndexError):
            return torch.empty(n, dtype=torch.uint8)

    def keep(self, done: Sequence[torch.Tensor]) -> None:
        """Keep the buffers of a frame whose sends are ``done`` for the next frame (those kept
        before are dropped: only the latest layout's are worth keeping)."""
        free: dict[int, list[torch.Tensor]] = {}
        for t in done:
            free.setdefault(t.numel(), []).append(t)
        self._free = free


def _pack(buf: torch.Tensor, a: int, begin: int, source: Source, b: int) -> None:
    """Copy the part of an entry (bytes, then zero padding) that falls in ``[a, b)`` into ``buf``."""
    data, pad = source
    lo, hi = max(a, begin), min(b, begin + data.numel() + pad)
    split = min(hi, begin + data.numel())
    if split > lo:
        copy_bytes(data[lo - begin : split - begin], buf[lo - a : split - a])
    if hi > max(lo, split):
        buf[max(lo, split) - a : hi - a].zero_()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(cast(Any, t.numpy()))


def check_head(
    magic: int, version: int, header_len: int, data_len: int, n_entries: int, limits: Limits
) -> str | None:
    """What is wrong with a frame's first message, or ``None``; checked before any allocation:
    the header and the data must fit ``limits``."""
    if magic != MAGIC:
        return f"not an aiostage frame (magic {magic:#x}); is the peer running aiostage?"
    if version != WIRE_VERSION:
        return f"wire version {version}, expected {WIRE_VERSION}; run one aiostage version"
    return check_lengths(header_len, data_len, n_entries, limits)


def check_lengths(header_len: int, data_len: int, n_entries: int, limits: Limits) -> str | None:
    """What is wrong with the lengths a frame (or a shared-memory description) announces, or
    ``None``: in range, and within ``limits``."""
    if header_len < DATA_ALIGN or header_len % DATA_ALIGN:
        return f"header length {header_len} is out of range"
    if header_len > limits.header:
        return too_long("a header", header_len, limits.header, limits)
    if data_len < 0:
        return f"data length {data_len} is out of range"
    if data_len > limits.data:
        return too_long("data", data_len, limits.data, limits)
    if not 0 <= n_entries <= MAX_ENTRIES:
        return f"{n_entries} entries is out of range"
    return None


def too_long(what: str, n: int, limit: int, limits: Limits) -> str:
    """The refusal of ``n`` bytes of ``what`` over ``limit``, saying where the limit comes from."""
    return (
        f"{what} of {n} bytes is more than this rank accepts ({limit} bytes: {limits.why}); "
        "pass max_bytes= if the peer's state is legitimately that large"
    )


def decode_frame_header(
    raw: bytes, data_len: int, n_entries: int, peer: int, budget: int = PARSE_BUDGET
) -> Header:
    """Validate the header bytes of a frame, refusing one whose ``parse_cost`` exceeds ``budget``
    before parsing it; any problem is ``ReplicationError(peer, "header")``."""
    (n,) = struct.unpack("<Q", raw[:8])
    if n != len(raw) - 8:
        raise ReplicationError(
            f"header says {n} bytes, got {len(raw) - 8}", peer=peer, phase="header"
        )
    cost = parse_cost(raw)
    if cost > budget:
        raise ReplicationError(
            f"parsing this header could take {cost} bytes of memory, more than the {budget} "
            "this rank allows for it",
            peer=peer,
            phase="header",
        )
    where = f"frame from rank {peer}"
    try:
        header = decode_header(raw[8:], data_len, where)
    except Exception as exc:  # CheckpointCorrupt, or anything a malformed header trips on
        try:
            layout = decode_layout(raw[8:], data_len, where)
        except Exception:
            raise ReplicationError(str(exc), peer=peer, phase="header") from exc
        if len(layout.entries) != n_entries:
            raise ReplicationError(str(exc), peer=peer, phase="header") from exc
        raise RefusedAfterLanding(str(exc), peer=peer, layout=layout) from exc
    if len(header.entries) != n_entries:
        raise ReplicationError(
            f"{len(header.entries)} entries, the frame said {n_entries}", peer=peer, phase="header"
        )
    return header


class RefusedAfterLanding(ReplicationError):
    """A frame whose records do not decode but whose data layout does (``layout``): the
    receiver takes the data it announced (within the limits already checked) before this is
    raised, so the next frame on the link starts in step, as after a checksum mismatch."""

    def __init__(self, message: str, *, peer: int, layout: Header) -> None:
        super().__init__(message, peer=peer, phase="header")
        self.layout = layout


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
        check_digests(self.entries, self.digests(), sums, peer)


def check_digests(
    entries: Sequence[Entry],
    got: Sequence[int],
    sums: Sequence[int],
    peer: int,
    sender: str = "the peer's stager",
) -> None:
    """Compare the digests of the landed ``entries`` with the ones ``sender`` sent;
    ``ReplicationError(peer, "verify")`` naming the first entry that differs."""
    for e, mine, want in zip(entries, got, sums, strict=True):
        if mine != want:
            raise ReplicationError(
                f"checksum mismatch in entry {e.name!r}: the bytes were damaged on the way "
                f"(or {sender} was built with verify=False)",
                peer=peer,
                phase="verify",
            )
