"""The replica store: each received replica written as a one-rank checkpoint directory that
replaces the previous one atomically, in the background, one write at a time."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import torch

from .._format.codec import Header
from .._storage.commit import check_target, write_checkpoint
from .._storage.locate import locate
from .._storage.writer import DurableWriter
from ..errors import CheckpointCorrupt, ReplicationError
from .frames import Frame, frame_sources
from .receive import ReceiveBuffers

__all__ = ["ReplicaWrites", "write_replica"]


async def write_replica(
    target: Path,
    header: Header,
    data: torch.Tensor,
    meta: dict[str, Any],
    expected: Sequence[int] | None = None,
) -> None:
    """Write a received frame as a one-rank checkpoint at ``target``, replacing the previous one
    atomically (temporary sibling, fsyncs, exchange). ``expected``: the sender's digests, checked
    as the bytes are written. Raises ``CheckpointWriteError``, ``CheckpointCorrupt``."""
    storage, where = locate(target)
    await check_target(storage, where, overwrite=True)
    writer = DurableWriter(storage)
    sources = frame_sources(header, data)
    await write_checkpoint(writer, where, header, sources, meta, overwrite=True, expected=expected)


class ReplicaWrites:
    """Write each replica received from group rank ``peer`` to ``target`` in the background.

    ``start`` holds the frame's buffer (``"persisting"``) until its write ends; the caller waits
    for the write in flight before starting the next (``wait``: backpressure) and asks for the
    outcome of the latest with ``check``. ``meta`` goes into each replica's manifest.
    """

    def __init__(
        self, target: Path, peer: int, meta: dict[str, Any], buffers: ReceiveBuffers
    ) -> None:
        self.target, self.peer, self.meta = target, peer, meta
        self._buffers = buffers
        self._done: anyio.Event | None = None
        self._error: BaseException | None = None

    def start(self, tg: anyio.abc.TaskGroup, frame: Frame) -> None:
        """Write ``frame`` in ``tg`` (after ``wait``: one write at a time)."""
        self._buffers.hold(frame.data, "persisting")
        done = self._done = anyio.Event()
        tg.start_soon(self._write, frame, done)

    async def _write(self, frame: Frame, done: anyio.Event) -> None:
        """Write ``frame`` as a checkpoint directory and swap it in atomically, its bytes checked
        against the sender's digests on the way; keep the error for ``check``."""
        try:
            await write_replica(self.target, frame.header, frame.data, self.meta, frame.digests)
            self._error = None
        except Exception as exc:
            self._error = exc
        finally:
            self._buffers.drop(frame.data, "persisting")
            done.set()

    async def wait(self) -> None:
        """Wait for the write in flight, if any (it raises nothing: see ``check``)."""
        if self._done is not None:
            await self._done.wait()
        else:
            await anyio.lowlevel.checkpoint()

    async def check(self) -> None:
        """Wait for the latest write; raise ``ReplicationError`` naming the peer if it failed
        (phase ``"verify"`` for a digest mismatch, ``"persist"`` otherwise)."""
        await self.wait()
        error = self._error
        if error is not None:
            phase = "verify" if isinstance(error, CheckpointCorrupt) else "persist"
            raise ReplicationError(
                f"persisting the replica failed: {error}", peer=self.peer, phase=phase
            ) from error
