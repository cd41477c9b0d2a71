"""What the stager holds of received frames: the one landing, the latest replica, the leased ones."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UsageError
from .frames import Frame
from .receive import ReceiveBuffers

__all__ = ["HeldReplicas"]


class HeldReplicas:
    """The stager's receive buffers and why each is held (``receive.Hold``).

    A frame lands in a buffer held ``"receiving"``; once rebuilt, the caller gets a state dict
    viewing it (``"leased"`` until ``release``), and the newest replica of the protected rank is
    also kept (``"latest"``) to give back on recovery. ``buffers`` is shared with the background
    writer (``"persisting"``). A buffer no reason holds is reused for a later frame.
    """

    def __init__(self) -> None:
        self.buffers = ReceiveBuffers()
        self.latest: Frame | None = None
        self._leases: dict[int, tuple[Any, torch.Tensor]] = {}

    async def receive_into(self, n: int) -> torch.Tensor:
        """An idle ``n``-byte buffer for a frame about to land (``recv_frame``'s ``buffer``)."""
        return await self.buffers.get(n, "receiving")

    def unused(self, frame: Frame) -> None:
        """``frame`` landed but will not be returned (its rebuild failed): free its buffer."""
        self.buffers.drop(frame.data, "receiving")

    def lease(self, out: Any, frame: Frame) -> None:
        """``out`` (the state dict rebuilt from ``frame``) now belongs to the caller."""
        self.buffers.hold(frame.data, "leased")
        self.buffers.drop(frame.data, "receiving")
        self._leases[id(out)] = (out, frame.data)

    def keep_latest(self, frame: Frame) -> None:
        """Keep ``frame`` as the replica of the protected rank, instead of the previous one."""
        if self.latest is not None:
            self.buffers.drop(self.latest.data, "latest")
        self.latest = frame
        self.buffers.hold(frame.data, "latest")

    def release(self, out: Any) -> None:
        """The caller hands ``out`` back. Raises ``UsageError`` for anything not leased."""
        entry = self._leases.pop(id(out), None)
        if entry is None or entry[0] is not out:
            raise UsageError("release() got an object this ReplicationStager did not return")
        self.buffers.drop(entry[1], "leased")

    def clear(self) -> None:
        """Forget every buffer (replicas still referenced keep their memory)."""
        self.latest = None
        self._leases.clear()
        self.buffers.clear()
