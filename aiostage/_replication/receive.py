"""Receive buffers for replicas, reused across rounds and held while any reason needs them."""

from __future__ import annotations

from typing import Literal

import anyio.lowlevel
import anyio.to_thread
import torch

from .._core.buffers import allocate, let_go

__all__ = ["Hold", "ReceiveBuffers"]

_KEEP = 2  # idle receive buffers kept for reuse

#: Why a receive buffer is busy. ``receiving``: a frame is landing in it (or being rebuilt);
#: ``latest``: the newest frame received, kept (the stager's replica to give back on recovery,
#: the subscriber's latest version); ``leased``: the stager returned a replica viewing it;
#: ``persisting``: the stager's background write of it; ``applying`` and ``installed``: the
#: subscriber's install of it into the caller's tensors.
Hold = Literal["receiving", "latest", "leased", "persisting", "applying", "installed"]


class ReceiveBuffers:
    """Receive buffers by size; a buffer is busy while any reason (a ``Hold``) holds it.

    ``get`` reuses an idle buffer of the same size or allocates one (worker thread); at most
    ``_KEEP`` buffers are kept once idle.
    """

    def __init__(self) -> None:
        self.held: list[tuple[torch.Tensor, set[Hold]]] = []
        self.allocations = 0

    async def get(self, n: int, reason: Hold) -> torch.Tensor:
        """An idle ``n``-byte CPU uint8 buffer, now held for ``reason``."""
        for data, why in self.held:
            if not why and data.numel() == n:
                why.add(reason)
                await anyio.lowlevel.checkpoint()
                return data
        idle = [i for i, (_, why) in enumerate(self.held) if not why]
        if len(self.held) >= _KEEP and idle:  # another size: its memory goes, off the loop
            await let_go([self.held.pop(idle[0])[0]])
        flats = (await anyio.to_thread.run_sync(allocate, (("cpu", n),), False, False, True)).flats
        self.allocations += 1
        self.held.append((flats[0], {reason}))
        return flats[0]

    def hold(self, data: torch.Tensor, reason: Hold) -> None:
        """Mark ``data`` busy for ``reason`` too."""
        for held, why in self.held:
            if held is data:
                why.add(reason)

    def drop(self, data: torch.Tensor, reason: Hold) -> None:
        """``reason`` no longer holds ``data``."""
        for held, why in self.held:
            if held is data:
                why.discard(reason)

    def clear(self) -> None:
        """Forget every buffer (replicas still referenced keep their memory)."""
        self.held.clear()
