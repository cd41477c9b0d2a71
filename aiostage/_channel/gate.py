"""What a subscriber takes from its publisher: versions that increase, frames within the size
it agreed to and whose whole structure decodes, regions it may read; the rest is refused.

A refusal drops that offer (the subscriber asks again and keeps what it has); refusals in a row
drop the publisher (the stream ends with the last one).
"""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import torch

from .._core.tree import KeyPath, flatten
from .._format.codec import Header, encode_header
from .._replication.frames import expected_header, frame_views
from .._replication.wire import Limits, limits_like, limits_of, unknown_limits
from ..errors import ReplicationError
from .shm import region_token

__all__ = ["MAX_REFUSED", "Gate", "target_limits"]

#: refused offers in a row after which the publisher is dropped
MAX_REFUSED = 3
#: refusals kept for ``WeightSubscriber.refused``
_KEEP = 16


async def target_limits(target: Any, max_bytes: int | None) -> Limits:
    """What a subscriber takes in one version: ``max_bytes``, else twice its target's frame (the
    published state must match it), else this host's memory. Raises what flattening the target
    raises (``UnsupportedValueError``)."""
    if max_bytes is not None:
        await anyio.lowlevel.checkpoint()
        return limits_of(max_bytes)
    if target is None:
        await anyio.lowlevel.checkpoint()
        return unknown_limits()
    return await anyio.to_thread.run_sync(_like_target, target)


def _like_target(target: Any) -> Limits:
    state = target.state_dict() if isinstance(target, torch.nn.Module) else target
    header = expected_header(flatten(state))
    return limits_like(encode_header(header), header.data_bytes, "the target's state")


class Gate:
    """The checks a subscriber holds the offers of group rank ``peer`` to, and its refusals."""

    def __init__(self, peer: int, limits: Limits) -> None:
        self.peer, self.limits = peer, limits
        self.last: tuple[int, int] | None = None  # (version, seq) last accepted
        self.token: bytes | None = None  # the publisher process its regions belong to
        self.refused: list[ReplicationError] = []
        self.in_a_row = 0

    def check_order(self, version: int, seq: int) -> None:
        """Refuse a version (or publish sequence number) that does not increase."""
        if self.last is not None and (version <= self.last[0] or seq <= self.last[1]):
            raise ReplicationError(
                f"offered version {version} (sequence {seq}) after version {self.last[0]} "
                f"(sequence {self.last[1]}): versions must increase",
                peer=self.peer,
                phase="offer",
            )

    async def views(self, header: Header, data: torch.Tensor) -> list[tuple[KeyPath, torch.Tensor]]:
        """The tensors of a landed frame by key path, its whole structure checked (a worker
        thread); ``ReplicationError(peer, "header")`` for one that does not decode."""
        return await anyio.to_thread.run_sync(frame_views, header, data, self.peer)

    def check_region(self, name: bytes) -> None:
        """Refuse a region name that is not torch's, or not of the publisher process the first
        accepted region came from (``ReplicationError(peer, "region")``)."""
        try:
            token = region_token(name)
        except ValueError as exc:
            raise ReplicationError(str(exc), peer=self.peer, phase="region") from exc
        if self.token is not None and token != self.token:
            raise ReplicationError(
                f"{name[:80]!r} belongs to another process than the publisher's earlier regions",
                peer=self.peer,
                phase="region",
            )

    def region_accepted(self, name: bytes) -> None:
        """A region passed every check: its process is the publisher's from now on."""
        if self.token is None:
            self.token = region_token(name)

    def accept(self, version: int, seq: int) -> None:
        """A version was taken: later ones must be newer; the refusals in a row end."""
        self.last = (version, seq)
        self.in_a_row = 0

    def refuse(self, error: ReplicationError) -> None:
        """Record a refused offer. Raises ``ReplicationError`` (dropping the publisher) once
        ``MAX_REFUSED`` offers in a row were refused."""
        self.refused = [*self.refused[-_KEEP + 1 :], error]
        self.in_a_row += 1
        if self.in_a_row >= MAX_REFUSED:
            raise ReplicationError(
                f"{self.in_a_row} offers in a row were refused, the publisher is dropped; "
                f"the last: {error}",
                peer=self.peer,
                phase=error.phase,
            ) from error
