"""The weight channel's same-host fast path: a frame's data region in named shared memory.

The publisher writes a version's data region into a ``Region`` (a CPU storage in shared memory
through torch's ``file_system`` sharing: ``torch_shm_manager`` removes it when its processes
end) and sends only a description over the group: ``int64[6] = [region bytes, name length,
header length, data length, entries, MARK]``, then the region's name and the frame header's
bytes. A subscriber on the same host reads the data out of the object by name into its receive
buffer, so no payload crosses a socket. The header is validated as a frame header is.

The subscriber never maps, grows, writes, registers or removes the object: it opens it read-only
and reads it with ``preadv``, after checking that the name is torch's for the one publisher
process it agreed on (the first region it accepted names it), that it is a regular file of its
own user, and that its real size is exactly the announced one; a region shorter than announced
is a short read, never a SIGBUS.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import zlib
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
import torch

from .._core import dist
from .._format.codec import Header, Source, encode_header
from .._replication.wire import Limits, check_lengths, decode_frame_header, tensor_bytes
from ..errors import ReplicationError
from .fill import write_entry
from .notes import BACKSTOP, MARK, OFFER_TAG, transfer

__all__ = [
    "Description",
    "PeerRegion",
    "Region",
    "fill_region",
    "host_token",
    "recv_description",
    "send_description",
]

_MAX_NAME = 255
#: where POSIX shared memory objects live on Linux (``shm_open`` names are paths below it)
_SHM_DIR = "/dev/shm"
#: torch's ``file_system`` regions start with a reference count: the data begins after it
_REFCOUNT = 64
#: the names torch gives them: ``/torch_<pid>_<random>_<counter>``; the pid is the token
_TORCH_NAME = re.compile(rb"/torch_([0-9]{1,10})_[0-9]{1,20}_[0-9]{1,20}")
#: bytes read per worker thread at once (several read a large region in parallel)
_READ_CHUNK = 64 << 20


def host_token() -> int:
    """A number naming this host (its hostname's crc32): equal tokens may share memory."""
    return zlib.crc32(socket.gethostname().encode())


@dataclass(eq=False)
class Region:
    """A shared-memory byte buffer the publisher made; ``name`` lets another process on this host
    read it."""

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
        _manager, handle, _ = storage._share_filename_cpu_()
        data = torch.empty(0, dtype=torch.uint8).set_(storage)
        return cls(data, bytes(handle))


def region_token(name: bytes) -> bytes:
    """The publisher process a region name belongs to (its pid, in torch's naming).

    Raises ``ValueError`` for a name torch would not have made (another object, a path).
    """
    found = _TORCH_NAME.fullmatch(name)
    if found is None:
        raise ValueError(f"{name[:80]!r} is not the name of a shared-memory region of aiostage")
    return found.group(1)


@dataclass(eq=False)
class PeerRegion:
    """A publisher's region opened read-only by a subscriber: ``nbytes`` of data after torch's
    reference count, read with ``preadv`` (never mapped, grown or written)."""

    fd: int
    name: bytes
    nbytes: int

    @classmethod
    def open(cls, name: bytes, nbytes: int) -> PeerRegion:
        """Open the region ``name`` of ``nbytes`` after checking it (worker thread).

        Raises ``OSError`` when there is no such object here (another host or IPC namespace:
        the honest case for plain frames), ``ValueError`` for an object this subscriber must not
        read: not a regular file of its own user, or not exactly the announced size.
        """
        region_token(name)
        fd = os.open(_SHM_DIR + name.decode(), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                raise ValueError(f"{name!r} is not a shared-memory region of this user")
            if st.st_size != _REFCOUNT + nbytes:
                raise ValueError(
                    f"{name!r} holds {st.st_size - _REFCOUNT} bytes, not the {nbytes} announced"
                )
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, name, nbytes)

    async def read_into(self, dst: torch.Tensor) -> None:
        """Read the first ``dst.numel()`` bytes of data into ``dst``, several worker threads
        at once. Raises ``ValueError`` when the object is shorter than that (it shrank) or
        cannot be read."""
        failed: list[ValueError] = []

        async def read(at: int) -> None:
            try:
                await anyio.to_thread.run_sync(self._read, dst[at : at + _READ_CHUNK], at)
            except (ValueError, OSError) as exc:
                failed.append(ValueError(f"reading {self.name!r} failed: {exc}"))

        async with anyio.create_task_group() as tg:
            for at in range(0, dst.numel(), _READ_CHUNK):
                tg.start_soon(read, at)
        if failed:
            raise failed[0]

    def _read(self, dst: torch.Tensor, at: int) -> None:
        view = tensor_bytes(dst)
        done = 0
        while done < len(view):
            got = os.preadv(self.fd, [view[done:]], _REFCOUNT + at + done)
            if got <= 0:
                raise ValueError(f"{self.name!r} ends before the {self.nbytes} bytes announced")
            done += got

    def close(self) -> None:
        """Close its file descriptor (once)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def fill_region(region: Region, header: Header, sources: list[Source]) -> None:
    """Write the frame's data region (entries at their offsets, zero padding) (worker thread)."""
    for entry, source in zip(header.entries, sources, strict=True):
        write_entry(region.data, entry.begin, source)


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


@dataclass(frozen=True, slots=True)
class Description:
    """Where a version is: the region's name and size, and the frame header's bytes (not yet
    decoded: ``decode``)."""

    name: bytes
    size: int
    raw: bytes
    data_len: int
    n_entries: int

    def decode(self, peer: int, limits: Limits) -> Header:
        """The validated header (worker thread); ``ReplicationError(peer, "header")``."""
        return decode_frame_header(self.raw, self.data_len, self.n_entries, peer, limits.parse)


async def recv_description(pg: Any, peer: int, limits: Limits) -> Description:
    """Receive a region's description; every length is bounded (by ``limits``) before anything
    is allocated. Raises ``ReplicationError(peer, "header")`` for a malformed one and
    ``ReplicationError(peer, "data")`` when the peer is gone."""
    head = torch.zeros(6, dtype=torch.int64)
    await _recv(pg, peer, head)
    size, name_len, header_len, data_len, n_entries, mark = (int(v) for v in head.tolist())
    problem = check_lengths(header_len, data_len, n_entries, limits)
    if mark != MARK or not 0 < name_len <= _MAX_NAME or not 0 <= data_len <= size:
        problem = f"malformed shared-memory description {head.tolist()}"
    if problem is not None:
        raise ReplicationError(problem, peer=peer, phase="header")
    body = torch.empty(name_len + header_len, dtype=torch.uint8)
    await _recv(pg, peer, body)
    raw = body.numpy().tobytes()
    return Description(raw[:name_len], size, raw[name_len:], data_len, n_entries)


async def _recv(pg: Any, peer: int, t: torch.Tensor) -> None:
    await transfer(pg, peer, OFFER_TAG, t, send=False, phase="data")
