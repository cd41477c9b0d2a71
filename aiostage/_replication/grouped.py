"""A frame exchange as grouped send/receive steps: the replication path for NCCL groups.

NCCL queues all traffic between two ranks on one stream and ignores tags, so the two-thread
exchange of ``transport`` (each rank posting its sends apart from its receives) may leave both
ranks' sends waiting for receives queued behind them. Here one worker thread, on the link's
device, runs the frame of ``transport`` (head, header, data messages, digests) as steps of one
grouped send and one grouped receive each (``dist.grouped_exchange``), whose sizes both sides
know before the step. Off the CPU every message passes through two reused device buffers of at
most ``wire.BUCKET`` bytes (one out, one in), so the device holds no more than those, whatever
the state's size; every copy between host and device runs in the worker, never on the loop.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import anyio.from_thread
import anyio.to_thread
import torch

from .._core import cuda, dist
from .._format.codec import Header, Source, as_int64, as_uint64
from ..errors import ReplicationError
from .transport import Link, encoded
from .wire import (
    BUCKET,
    MAGIC,
    WIRE_VERSION,
    Hasher,
    Limits,
    check_head,
    decode_frame_header,
    messages,
    plan_messages,
    spans,
    tensor_bytes,
)

__all__ = ["exchange_grouped"]

Received = tuple[Header, torch.Tensor, tuple[int, ...]]


async def exchange_grouped(
    link: Link,
    send_to: int,
    header: Header,
    sources: Sequence[Source],
    recv_from: int,
    buffer: Callable[[int], Awaitable[torch.Tensor]],
    *,
    limits: Limits,
    check: bool,
) -> Received:
    """Send this rank's frame to ``send_to`` while receiving ``recv_from``'s (group ranks); return
    the received header, data and the sender's digests, as ``transport.recv_frame`` does.

    Blocks on nothing (one worker thread, abandoned on cancellation: bound it with a timeout).
    Raises ``ReplicationError`` naming ``recv_from`` and the phase (``"header"``, ``"data"``,
    ``"verify"``), or ``send_to`` for a failed send.
    """
    steps = _Steps(link, send_to, recv_from)
    try:
        return await anyio.to_thread.run_sync(
            cuda.bound(link.device, steps.run),
            header,
            sources,
            buffer,
            limits,
            check,
            abandon_on_cancel=True,
        )
    except RuntimeError as exc:  # the backend failed: a peer is gone, or the backstop passed
        raise ReplicationError(f"exchanging failed: {exc}", peer=recv_from, phase="data") from exc


class _Steps:
    """One exchange's steps in a worker thread: each sends one message and receives one."""

    def __init__(self, link: Link, send_to: int, recv_from: int) -> None:
        self.link, self.to, self.frm = link, send_to, recv_from
        self.out: torch.Tensor | None = None  # the device buffers, made on first use
        self.into: torch.Tensor | None = None

    def run(
        self,
        header: Header,
        sources: Sequence[Source],
        buffer: Callable[[int], Awaitable[torch.Tensor]],
        limits: Limits,
        check: bool,
    ) -> Received:
        theirs = self._header(header, limits)
        data: torch.Tensor = anyio.from_thread.run(_call, buffer, theirs.data_bytes)
        mine_ranges, their_ranges = plan_messages(spans(header)), plan_messages(spans(theirs))
        out = Hasher(header, mine_ranges) if self.link.verify else None
        into = Hasher(theirs, their_ranges) if check else None
        sent = messages(header, sources, mine_ranges)
        for i in range(max(len(mine_ranges), len(their_ranges))):
            message = next(sent) if i < len(mine_ranges) else None
            if message is not None and out is not None:
                out.take(i, tensor_bytes(message))
            landing = data[slice(*their_ranges[i])] if i < len(their_ranges) else None
            self.step(message, landing)
            if landing is not None and into is not None:
                into.take(i, tensor_bytes(landing))
        digests = out.digests() if out is not None else [0] * len(sources)
        sums = torch.empty(len(theirs.entries), dtype=torch.int64)
        self.step(torch.tensor([as_int64(d) for d in digests], dtype=torch.int64), sums)
        got = tuple(as_uint64(v) for v in sums.tolist())
        if into is not None:
            into.check(got, self.frm)
        return theirs, data, got

    def _header(self, header: Header, limits: Limits) -> Header:
        """Swap the heads, then the headers; the peer's header, validated within ``limits``."""
        raw = encoded(self.link, header)
        head = [MAGIC, WIRE_VERSION, len(raw), header.data_bytes, len(header.entries)]
        got = torch.zeros(5, dtype=torch.int64)
        self.step(torch.tensor(head, dtype=torch.int64), got)
        magic, version, header_len, data_len, n_entries = (int(v) for v in got.tolist())
        problem = check_head(magic, version, header_len, data_len, n_entries, limits)
        if problem:
            raise ReplicationError(problem, peer=self.frm, phase="header")
        body = torch.empty(header_len, dtype=torch.uint8)
        self.step(torch.frombuffer(bytearray(raw), dtype=torch.uint8), body)
        return decode_frame_header(
            body.numpy().tobytes(), data_len, n_entries, self.frm, limits.parse
        )

    def step(self, send: torch.Tensor | None, recv: torch.Tensor | None) -> None:
        """Send ``send`` and receive into ``recv`` (CPU tensors) as one group, through the
        device buffers off the CPU; return once both are done."""
        link = self.link
        out, into = _as_bytes(send), _as_bytes(recv)
        if link.device.type != "cpu":
            out = self._staged(out, "out")
            into = self._staged(into, "into")
        dist.grouped_exchange(
            link.pg,
            (out, self.to) if out is not None else None,
            (into, self.frm) if into is not None else None,
            link.tag,
            link.backstop,
        )
        if into is not None and recv is not None and into.data_ptr() != recv.data_ptr():
            _as_bytes(recv).copy_(into)  # type: ignore[union-attr]

    def _staged(self, t: torch.Tensor | None, which: str) -> torch.Tensor | None:
        """A slice of the reused device buffer ``which`` as long as ``t``; holding ``t``'s
        bytes when sending."""
        if t is None:
            return None
        have = getattr(self, which)
        if have is None or have.numel() < t.numel():
            have = torch.empty(_capacity(t.numel()), dtype=torch.uint8, device=self.link.device)
            setattr(self, which, have)
        room: torch.Tensor = have[: t.numel()]
        if which == "out":
            room.copy_(t)  # blocking: done before the send is queued after it
        return room


async def _call(buffer: Callable[[int], Awaitable[torch.Tensor]], n: int) -> torch.Tensor:
    """``await buffer(n)``, as a coroutine function ``anyio.from_thread.run`` takes."""
    return await buffer(n)


def _capacity(n: int) -> int:
    """The size to allocate for a message of ``n`` bytes: at least a bucket, so the buffer is
    made once per exchange (messages are at most a bucket, except one large header)."""
    return max(n, BUCKET)


def _as_bytes(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t``'s bytes as a flat uint8 tensor (``t`` is contiguous): every message is bytes, so
    both sides agree on its length whatever its dtype."""
    return None if t is None else t.reshape(-1).view(torch.uint8)
