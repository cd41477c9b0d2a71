"""Which saves reach which tier, and where the node-local tier keeps each rank's copies."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .._format.codec import step_name
from ..errors import UsageError

__all__ = ["TierPolicy", "local_holder"]

#: a subdirectory of a local directory: a rank's own copies, or the replicas of a rank
_LOCAL_NAME = re.compile(r"(?P<what>rank|replica_of_rank)_(?P<rank>[0-9]{5,})")


def local_holder(name: str) -> tuple[str, int] | None:
    """What subdirectory ``name`` of a local directory holds: ``("local", rank)`` for a rank's
    own copies, ``("replica", rank)`` for the replicas of ``rank``; ``None`` for anything else."""
    m = _LOCAL_NAME.fullmatch(name)
    if m is None:
        return None
    return ("local" if m["what"] == "rank" else "replica"), int(m["rank"])


@dataclass(frozen=True, slots=True)
class TierPolicy:
    """Every save goes to the fast tiers (``local_dir``, and peer memory with ``replicate``);
    a step that is a multiple of ``durable_every`` (or one saved with ``durable=True``) also
    goes to the durable root. ``keep_local``: steps kept per local directory (``None``: all)."""

    local_dir: Path | None
    durable_every: int
    keep_local: int | None
    replicate: bool

    def __post_init__(self) -> None:
        if type(self.durable_every) is not int or self.durable_every < 1:
            raise ValueError(f"durable_every must be a positive int, got {self.durable_every!r}")
        if self.keep_local is not None and self.keep_local < 1:
            raise ValueError(f"keep_local must be at least 1 (or None), got {self.keep_local}")
        if self.durable_every > 1 and self.local_dir is None and not self.replicate:
            raise UsageError(
                f"durable_every={self.durable_every} leaves the other saves nowhere: give a "
                "fast tier too (local_dir=... or replicate=True)"
            )

    def durable(self, step: int, asked: bool | None) -> bool:
        """Whether the save of ``step`` goes to the durable root."""
        if asked is False and self.local_dir is None and not self.replicate:
            raise UsageError("save(durable=False) needs a fast tier (local_dir= or replicate=)")
        return asked if asked is not None else step % self.durable_every == 0

    def own_dir(self, rank: int) -> Path | None:
        """Where ``rank`` keeps its own copies on its node (``local_dir/rank_NNNNN``)."""
        return self.local_dir / f"rank_{rank:05d}" if self.local_dir is not None else None

    def replica_dir(self, of: int) -> Path | None:
        """Where a node keeps the replicas of rank ``of`` it received
        (``local_dir/replica_of_rank_NNNNN``)."""
        return self.local_dir / f"replica_of_rank_{of:05d}" if self.local_dir is not None else None

    def own_path(self, rank: int, step: int) -> Path | None:
        """The local copy of ``rank``'s state at ``step``."""
        where = self.own_dir(rank)
        return where / step_name(step) if where is not None else None
