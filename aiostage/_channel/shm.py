"""The weight channel's same-host fast path: a frame's data region in named shared memory.

The publisher writes a version's data region into a ``Region`` (a CPU storage in shared memory
through torch's ``file_system`` sharing: ``torch_shm_manager`` removes it when its processes
end) and sends only a description over the group: ``int64[6] = [region bytes, name length,
header length, data length, entries, MARK]``, then the name and the frame header's bytes. A
subscriber on the same host maps the region by name (once; regions are reused) and copies the
data out, so no payload crosses a socket. The header is validated as a frame header is.
"""

from __future__ import annotations

import socket
import zlib
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
import torch

from .._core import dist
from .._core.buffers import copy_bytes
from .._format.codec import MAX_HEADER, Header, Source, encode_header
from .._replication.wire import decode_frame_header
from ..errors import ReplicationError
from .notes import BACKSTOP, MARK, OFFER_TAG, transfer

__all__ = ["Region", "fill_region", "host_token", "recv_description", "send_description"]

_MAX_NAME = 4096


def host_token() -> int:
    """A number naming this host (its hostname's crc32): equal tokens may share memory."""
    return zlib.crc32(socket.gethostname().encode())


@dataclass(eq=False)
class Region:
    """A shared-memory byte buffer; ``name`` lets another process on this host map it."""

    data: torch.Tensor
    name: bytes
    busy: bool = True

    @property
    def nbytes(self) -> int:
        """Its size in bytes."""
        return self.data.numel()

    @classmethod
    def create(cls, nbytes: int) -> Region:
        """A new region (blocking: call it from a worker thread)."""
        storage: Any = torch.UntypedStorage._new_using_filename_cpu(max(nbytes, 1))
        manager, handle, _ = storage._share_filename_cpu_()
        data = torch.empty(0, dtype=torch.uint8).set_(storage)
        return cls(data, bytes(manager) + b"\n" + bytes(handle))

    @classmethod
    def open(cls, name: bytes, nbytes: int) -> Region:
        """Map the region ``name`` of ``nbytes`` made by another process (worker thread).

        Raises ``RuntimeError`` when it cannot be mapped (another host or IPC namespace).
        """
        manager, _, handle = name.partition(b"\n")
        storage = torch.UntypedStorage._new_shared_filename_cpu(manager, handle, nbytes)
        return cls(torch.empty(0, dtype=torch.uint8).set_(storage), name, busy=False)


def fill_region(region: Region, header: Header, sources: list[Source]) -> None:
    """Write the frame's data region (entries at their offsets, zero padding) (worker thread)."""
    for entry, (data, pad) in zip(header.entries, sources, strict=True):
        end = entry.begin + data.numel()
        if data.numel():
            copy_bytes(data.reshape(-1), region.data[entry.begin : end])
        if pad:
            region.data[end : end + pad].zero_()


async def send_description(pg: Any, peer: int, region: Region, header: Header) -> None:
    """Send where a version is and its header (a worker thread; bound it with a scope).

    Raises ``ReplicationError(peer, "send")`` when the peer is gone.
    """
    raw = encode_header(header)
    head = [region.nbytes, len(region.name), len(raw), header.data_bytes, len(header.entries), MARK]
    msgs = [
        torch.tensor(head, dtype=torch.int64),
        torch.frombuffer(bytearray(region.name + raw), dtype=torch.uint8),
    ]

    def send() -> None:
        for work in [dist.post_send(m, peer, pg, OFFER_TAG) for m in msgs]:
            dist.wait_work(work, BACKSTOP)

    try:
        await anyio.to_thread.run_sync(send, abandon_on_cancel=True)
    except RuntimeError as exc:
        raise ReplicationError(f"sending failed: {exc}", peer=peer, phase="send") from exc


async def recv_description(pg: Any, peer: int, max_data: int) -> tuple[bytes, int, Header]:
    """Receive ``(region name, region bytes, header)``; every length is bounded before anything
    is allocated. Raises ``ReplicationError(peer, "header")`` for a malformed description and
    ``ReplicationError(peer, "data")`` when the peer is gone."""
    head = torch.zeros(6, dtype=torch.int64)
    await _recv(pg, peer, head)
    size, name_len, header_len, data_len, n_entries, mark = (int(v) for v in head.tolist())
    if (
        mark != MARK
        or not 0 < name_len <= _MAX_NAME
        or not 0 < header_len <= MAX_HEADER
        or not 0 <= data_len <= min(size, max_data)
        or n_entries < 0
    ):
        raise ReplicationError(
            f"malformed shared-memory description {head.tolist()}", peer=peer, phase="header"
        )
    body = torch.empty(name_len + header_len, dtype=torch.uint8)
    await _recv(pg, peer, body)
    raw = body.numpy().tobytes()
    header = await anyio.to_thread.run_sync(
        decode_frame_header, raw[name_len:], data_len, n_entries, peer
    )
    return raw[:name_len], size, header


async def _recv(pg: Any, peer: int, t: torch.Tensor) -> None:
    await transfer(pg, peer, OFFER_TAG, t, send=False, phase="data")
