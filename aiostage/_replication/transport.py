"""Safe metadata and bucketed payloads over a ProcessGroup: one frame per state dict, no pickle.

A frame is what a data file holds, sent as point-to-point messages on one tag (gloo and NCCL keep
per-pair FIFO order):

0. ``int64[5]``: ``MAGIC, WIRE_VERSION, header_len, data_len, n_entries``;
1. the header bytes of the persistence format (``_format.codec.encode_header``: JSON, validated by
   ``decode_header`` on arrival), checksums left at zero;
2. the data region (entries back to back, exactly as in a file) in messages of at most
   ``BUCKET`` bytes: an entry of ``SMALL`` bytes or more is sent straight from its memory,
   consecutive smaller entries packed into one message;
3. ``int64[n_entries]``: the xxh3_64 of each entry (zeros when the link does not verify), hashed
   by the sender while the data is on the wire, or given by the caller: a replica sent back on
   recovery carries the digests its owner computed, so the check is end to end; a publisher
   hashes a version once for all its subscribers, as it copies it in.

Each side waits for all its messages with one waiter thread (``dist.wait_works``), not one per
message.

The message ranges depend only on the entries, so both sides derive them from the header. The
receiver bounds every length by what it agreed to take (``wire.Limits``: its own state's size, or
the caller's ``max_bytes``) before allocating, and lands each message in the matching slice of one
buffer; when asked to check, it hashes each message while the next one arrives and compares. It
returns the sender's digests either way, so a later reader (the replica's writer, a recovery) can
check the bytes against them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread
import torch

from .._core import cuda, dist
from .._format.codec import Header, Source, as_int64, as_uint64, encode_header
from ..errors import ReplicationError
from .wire import (
    MAGIC,
    WIRE_VERSION,
    Hasher,
    Limits,
    Packs,
    RefusedAfterLanding,
    check_head,
    decode_frame_header,
    messages,
    plan_messages,
    spans,
    tensor_bytes,
)

__all__ = ["Link", "encoded", "partners", "recv_frame", "send_frame", "send_nothing"]

TAG = 0x5A57


@dataclass(slots=True)
class Link:
    """Where frames go: the group, the device its backend sends from, the per-wait backstop,
    the tag, the last header validated per peer (a byte-identical header is not decoded
    again), and the packing buffers of the last frame sent (reused by the next)."""

    pg: Any
    device: torch.device
    backstop: float
    known: dict[int, tuple[bytes, int, Header]] = field(default_factory=dict)
    sent: tuple[Header, bytes] | None = None  # the last header sent, encoded
    verify: bool = True  # hash entries on both sides (all ranks must agree)
    tag: int = TAG  # one per kind of stream, so two streams between two ranks never mix
    packs: Packs = field(default_factory=Packs)


def partners(rank: int, world: int, partner: int | None = None) -> tuple[int, int]:
    """``(send_to, receive_from)`` for ``rank`` of ``world`` (group ranks).

    Even world: the pair ``(rank + world // 2) % world``; odd: a ring (send to ``rank + 1``,
    receive from ``rank - 1``); one rank: itself. ``partner`` overrides with a symmetric pair.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a group of {world}")
    if partner is not None:
        if not 0 <= partner < world or (partner == rank and world > 1):
            raise ValueError(f"partner {partner} is not another rank of a group of {world}")
        return partner, partner
    if world % 2 == 0:
        p = (rank + world // 2) % world
        return p, p
    return (rank + 1) % world, (rank - 1) % world


# ---------------------------------------------------------------- sending


#: digests known only later: awaited once the data is posted, so hashing overlaps the transfer
LateDigests = Callable[[], Awaitable[Sequence[int] | None]]


async def send_frame(
    link: Link,
    peer: int,
    header: Header,
    sources: Sequence[Source],
    digests: Sequence[int] | LateDigests | None = None,
) -> int:
    """Send ``header`` and the bytes of ``sources`` (one per entry) to group rank ``peer``, with
    ``digests`` as the entries' checksums: given, hashed here as the data is posted (``None``
    and ``link.verify``), or awaited from a callable once the data is on the wire (the digests
    go last, so hashing them elsewhere overlaps the transfer; its ``None``: no digests).

    Blocks on nothing: worker threads (abandoned on cancellation) encode, pack, post and wait,
    since posting a large gloo send writes to the socket in the caller. Returns the bytes
    sent. Raises ``ReplicationError(peer, "send")`` when the backend fails (the peer is gone,
    the backstop expired); bound it with ``anyio.fail_after``.
    """
    try:
        if not callable(digests):
            return await anyio.to_thread.run_sync(
                cuda.bound(link.device, _send), link, peer, header, sources, digests,
                abandon_on_cancel=True,
            )  # fmt: skip
        posted = await anyio.to_thread.run_sync(
            cuda.bound(link.device, _post_data), link, peer, header, sources,
            abandon_on_cancel=True,
        )  # fmt: skip
        posted.digests = await digests()
        return await anyio.to_thread.run_sync(
            cuda.bound(link.device, _post_sums), link, peer, posted, abandon_on_cancel=True
        )
    except RuntimeError as exc:
        raise ReplicationError(f"sending failed: {exc}", peer=peer, phase="send") from exc


async def send_nothing(link: Link, peer: int) -> None:
    """Tell ``peer`` there is no frame for it (a recovery with no replica to give)."""
    head = torch.tensor([MAGIC, WIRE_VERSION, 0, 0, 0], dtype=torch.int64)
    try:
        await anyio.to_thread.run_sync(
            cuda.bound(link.device, _exchange_one), link, peer, head, True,
            abandon_on_cancel=True,
        )  # fmt: skip
    except RuntimeError as exc:
        raise ReplicationError(f"sending failed: {exc}", peer=peer, phase="send") from exc


def _exchange_one(link: Link, peer: int, t: torch.Tensor, send: bool) -> torch.Tensor:
    """Send or receive one message and wait for it; return it on the CPU (worker thread, on
    ``link.device``: copies to and from the GPU never run on the loop)."""
    t = t.to(link.device)
    post = dist.post_send if send else dist.post_recv
    dist.wait_work(post(t, peer, link.pg, link.tag), link.backstop)
    return t.cpu()


@dataclass(slots=True)
class _Posted:
    """A frame being sent: its messages (kept alive until sent), their works, its data
    messages on the CPU with their ranges, its packing buffers, its entries and bytes, and the
    digests to send last (``None``: zeros)."""

    msgs: list[torch.Tensor]
    works: list[Any]
    data: list[torch.Tensor]
    ranges: list[tuple[int, int]]
    packed: list[torch.Tensor]
    entries: int
    nbytes: int
    digests: Sequence[int] | None = None


def _send(
    link: Link,
    peer: int,
    header: Header,
    sources: Sequence[Source],
    digests: Sequence[int] | None,
) -> int:
    """Post the frame, then hash its messages while they are on the wire unless ``digests``
    are given, then the checksums; wait for every send (worker thread). Hashing after the
    posts, not before each one, lets the data start at once and keeps it flowing (a 256 MiB
    exchange on a 2-core host: ~5-10% more throughput in an alternated A/B)."""
    posted = _post_data(link, peer, header, sources)
    if digests is None and link.verify:
        hasher = Hasher(header, posted.ranges)
        for i, m in enumerate(posted.data):
            hasher.take(i, tensor_bytes(m))
        digests = hasher.digests()
    posted.digests = digests
    return _post_sums(link, peer, posted)


def _post_data(link: Link, peer: int, header: Header, sources: Sequence[Source]) -> _Posted:
    """Post the head, the header and the data message by message, runs of small entries packed
    into the link's reused buffers (worker thread)."""
    raw = encoded(link, header)
    head = [MAGIC, WIRE_VERSION, len(raw), header.data_bytes, len(header.entries)]
    first = [
        torch.tensor(head, dtype=torch.int64),
        torch.frombuffer(bytearray(raw), dtype=torch.uint8),
    ]
    msgs = [m.to(link.device) for m in first]
    works = [dist.post_send(m, peer, link.pg, link.tag) for m in msgs]
    ranges = plan_messages(spans(header))
    data: list[torch.Tensor] = []
    packed: list[torch.Tensor] = []

    def pack(n: int) -> torch.Tensor:
        packed.append(link.packs.take(n))
        return packed[-1]

    for m in messages(header, sources, ranges, pack):
        data.append(m)
        msgs.append(m.to(link.device))
        works.append(dist.post_send(msgs[-1], peer, link.pg, link.tag))
    nbytes = len(raw) + header.data_bytes
    return _Posted(msgs, works, data, ranges, packed, len(header.entries), nbytes)


def _post_sums(link: Link, peer: int, posted: _Posted) -> int:
    """Post the checksums after the data, then wait for every send; the bytes sent (worker
    thread)."""
    digests = posted.digests if posted.digests is not None else [0] * posted.entries
    sums = torch.tensor([as_int64(s) for s in digests], dtype=torch.int64)
    posted.msgs.append(sums.to(link.device))
    posted.works.append(dist.post_send(posted.msgs[-1], peer, link.pg, link.tag))
    dist.wait_works(_last_first(posted.works), link.backstop)
    link.packs.keep(posted.packed)
    return posted.nbytes


def _last_first(works: list[Any]) -> list[Any]:
    """``works`` with the last one first: a pair's messages complete in order, so once it is
    done the others are, and the waiter sleeps once, not once per message (each wake-up of a
    thread that then takes the GIL back costs CPU an exchange is short of)."""
    return works[-1:] + works[:-1]


def encoded(link: Link, header: Header) -> bytes:
    """``encode_header(header)``, kept in ``link.sent`` and reused while the layout is the same
    (worker thread)."""
    if link.sent is None or link.sent[0] != header:  # same layout as last round: reuse
        link.sent = (header, encode_header(header))
    return link.sent[1]


# ---------------------------------------------------------------- receiving

#: where a frame's messages land instead of the buffer: one CPU uint8 tensor of each range's
#: length, or ``None`` for its slice of the buffer (``recv_frame``'s ``direct``)
Direct = Callable[[Header, list[tuple[int, int]]], Awaitable[Sequence[torch.Tensor | None]]]


async def recv_frame(
    link: Link,
    peer: int,
    buffer: Callable[[int], Awaitable[torch.Tensor]],
    *,
    limits: Limits,
    check: bool | None = None,
    direct: Direct | None = None,
) -> tuple[Header, torch.Tensor, tuple[int, ...]] | None:
    """Receive one frame from group rank ``peer``: its validated header, its data bytes and the
    sender's per-entry digests (``None`` when the peer sent ``send_nothing``).

    ``buffer(n)`` supplies a CPU uint8 tensor of ``n`` bytes (reused between rounds by the
    caller). ``limits``: what this rank agreed to take. ``check`` (default ``link.verify``):
    hash the bytes as they land and compare them with the digests. Blocks on nothing. Raises
    ``ReplicationError`` naming ``peer`` and the phase: ``"header"`` for a malformed frame or one
    over ``limits`` (checked before anything is allocated, never unpickled; a frame whose
    layout is sound but whose records are not lands first: ``RefusedAfterLanding``),
    ``"allocate"`` when its buffer cannot be allocated, ``"data"`` when the backend fails,
    ``"verify"`` on a checksum mismatch (the whole frame has landed then). ``direct`` (CPU
    links): given the header and the message ranges, a tensor per message to land it in
    instead of its slice of the buffer (``None``: the slice), e.g. the caller's own tensors.
    """
    try:
        header = await _recv_header(link, peer, limits)
    except RefusedAfterLanding as exc:  # take its data, within the limits, to stay in step
        await _land(link, peer, exc.layout, buffer, False)
        raise
    if header is None:
        return None
    data, digests = await _land(link, peer, header, buffer, check, direct)
    return header, data, digests


async def _land(
    link: Link,
    peer: int,
    header: Header,
    buffer: Callable[[int], Awaitable[torch.Tensor]],
    check: bool | None,
    direct: Direct | None = None,
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Receive the data and digests of a frame of ``header`` into ``buffer``; check them."""
    try:
        data = await buffer(header.data_bytes)
    except (OSError, MemoryError, RuntimeError) as exc:  # ENOMEM from mmap, a failed pin
        raise ReplicationError(
            f"cannot allocate {header.data_bytes} bytes for its frame: {exc}",
            peer=peer,
            phase="allocate",
        ) from exc
    ranges = plan_messages(spans(header))
    sums = torch.empty(len(header.entries), dtype=torch.int64, device=link.device)
    on_cpu = link.device.type == "cpu"
    targets = [
        data[a:b] if on_cpu else torch.empty(b - a, dtype=torch.uint8, device=link.device)
        for a, b in ranges
    ]
    if direct is not None and on_cpu:
        mine = await direct(header, ranges)
        targets = [t if m is None else m for t, m in zip(targets, mine, strict=True)]
    check = link.verify if check is None else check
    landing = _Landing(Hasher(header, ranges) if check else None, data, ranges, on_cpu)
    try:
        sums = await anyio.to_thread.run_sync(
            cuda.bound(link.device, _receive), link, peer, targets, sums, landing,
            abandon_on_cancel=True,
        )  # fmt: skip
    except RuntimeError as exc:
        raise ReplicationError(f"receiving failed: {exc}", peer=peer, phase="data") from exc
    digests = tuple(as_uint64(v) for v in sums.tolist())
    if landing.hasher is not None:
        landing.hasher.check(digests, peer)
    return data, digests


async def _recv_header(link: Link, peer: int, limits: Limits) -> Header | None:
    try:
        got = await anyio.to_thread.run_sync(
            cuda.bound(link.device, _head_and_header), link, peer, limits,
            abandon_on_cancel=True,
        )  # fmt: skip
    except RuntimeError as exc:
        raise ReplicationError(f"receiving failed: {exc}", peer=peer, phase="header") from exc
    if isinstance(got, str):
        raise ReplicationError(got, peer=peer, phase="header")
    if got is None:
        return None
    body, data_len, n_entries = got
    known = link.known.get(peer)
    if known is not None and known[:2] == (body, data_len):
        return known[2]
    header = await anyio.to_thread.run_sync(
        decode_frame_header, body, data_len, n_entries, peer, limits.parse
    )
    link.known[peer] = (body, data_len, header)
    return header


def _receive(
    link: Link, peer: int, targets: list[torch.Tensor], sums: torch.Tensor, landing: _Landing
) -> torch.Tensor:
    """Post every receive, then wait for each and hash it while the next lands; the digests
    on the CPU (worker thread, on ``link.device``)."""
    works = [dist.post_recv(t, peer, link.pg, link.tag) for t in targets]
    works.append(dist.post_recv(sums, peer, link.pg, link.tag))
    if landing.on_cpu and landing.hasher is None:  # nothing to do as each message lands
        dist.wait_works(_last_first(works), link.backstop)
        return sums

    def landed(i: int) -> None:
        if i < len(targets):
            landing.take(i, targets[i])

    dist.wait_works(works, link.backstop, cuda.bound(link.device, landed))
    return sums.cpu()


def _head_and_header(link: Link, peer: int, limits: Limits) -> tuple[bytes, int, int] | str | None:
    """A frame's first message and, if it is sound and within ``limits``, its header bytes,
    received in one worker-thread call (no trip through the loop between them; the peer's data
    waits for this rank's receives): ``(header bytes, data length, entries)``, what is wrong
    with the first message, or ``None`` for ``send_nothing`` (worker thread)."""
    head = _exchange_one(link, peer, torch.zeros(5, dtype=torch.int64), False)
    magic, version, header_len, data_len, n_entries = (int(v) for v in head.tolist())
    if (magic, version, header_len, data_len, n_entries) == (MAGIC, WIRE_VERSION, 0, 0, 0):
        return None
    problem = check_head(magic, version, header_len, data_len, n_entries, limits)
    if problem:
        return problem
    raw = _exchange_one(link, peer, torch.empty(header_len, dtype=torch.uint8), False)
    return raw.numpy().tobytes(), data_len, n_entries


@dataclass(slots=True)
class _Landing:
    """Where received messages go: off-CPU messages copied into the CPU buffer, then hashed."""

    hasher: Hasher | None
    data: torch.Tensor
    ranges: list[tuple[int, int]]
    on_cpu: bool

    def take(self, i: int, message: torch.Tensor) -> None:
        """Message ``i`` has landed (worker thread)."""
        a, b = self.ranges[i]
        if not self.on_cpu:
            self.data[a:b].copy_(message)
        if self.hasher is not None:
            self.hasher.take(i, tensor_bytes(message if self.on_cpu else self.data[a:b]))
