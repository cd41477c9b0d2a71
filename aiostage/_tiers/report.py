"""What a restore reports: the step, where each rank's state came from, what was skipped."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .plan import Source

__all__ = ["RestoreReport", "RestoredRank", "SkippedSource"]


@dataclass(frozen=True, slots=True)
class RestoredRank:
    """Where group rank ``rank`` got its state: ``source`` (``"memory"``, ``"local"``,
    ``"peer_memory"``, ``"peer_local"`` or ``"durable"``) held by group rank ``holder``, its
    tensor ``bytes`` and the ``seconds`` its fetch took."""

    rank: int
    source: Source
    holder: int
    bytes: int
    seconds: float

    @property
    def gb_per_second(self) -> float:
        """Bytes restored per second, in GB/s (1e9 bytes)."""
        return self.bytes / self.seconds / 1e9 if self.seconds else 0.0


@dataclass(frozen=True, slots=True)
class SkippedSource:
    """A source tried for rank ``rank`` at ``step`` and skipped: ``reason`` (a checksum that
    did not match, a copy that could not be read)."""

    rank: int
    step: int
    source: Source
    holder: int
    reason: str


@dataclass(frozen=True, slots=True)
class RestoreReport:
    """What ``Checkpointer.restore`` did: the ``step`` every rank restored, ``ranks`` (one
    ``RestoredRank`` per group rank), the sources ``skipped`` on the way, the whole call's
    ``seconds`` on this rank, and ``state``: the restored state dict (``into``'s own tensors,
    the checkpoint's other values), as ``aiostage.load(into=...)`` returns it."""

    step: int
    rank: int
    ranks: tuple[RestoredRank, ...]
    skipped: tuple[SkippedSource, ...]
    seconds: float
    state: Any

    @property
    def mine(self) -> RestoredRank:
        """This rank's ``RestoredRank``."""
        return self.ranks[self.rank]
