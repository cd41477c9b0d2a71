"""The memory tier: one staged copy shared by every tier of a save (a counted lease), and the
copies kept in memory until the next save replaces them (this rank's own, its partner's)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Kept", "MemoryTier", "Shared"]


class Shared:
    """One staged copy held by several tiers; ``release`` runs once the last holder drops it.

    Created held once (by the save that staged it); each tier that keeps it past the save
    calls ``hold`` and later ``drop``.
    """

    def __init__(self, staged: Any, release: Callable[[Any], None]) -> None:
        self.staged = staged
        self._release: Callable[[Any], None] | None = release
        self._holders = 1

    def hold(self) -> Shared:
        """One more holder."""
        self._holders += 1
        return self

    def drop(self) -> None:
        """One holder less; the last one releases the copy."""
        self._holders -= 1
        if self._holders == 0 and self._release is not None:
            release, self._release = self._release, None
            release(self.staged)


@dataclass(slots=True)
class Kept:
    """A state kept in memory: whose (group rank ``of``), which step, how to let it go, and
    its frame laid out to give in a restore (``None``: not yet)."""

    of: int
    step: int
    state: Any
    drop: Callable[[], None]
    planned: Any = None


class MemoryTier:
    """The newest save's copies in this process's memory: ``own`` (the staged copy itself) and
    ``replica`` (the partner's state received by replication)."""

    def __init__(self) -> None:
        self.own: Kept | None = None
        self.replica: Kept | None = None

    def keep_own(self, kept: Kept) -> None:
        """Keep ``kept`` as this rank's own copy, letting the previous one go."""
        old, self.own = self.own, kept
        if old is not None:
            old.drop()

    def keep_replica(self, kept: Kept) -> None:
        """Keep ``kept`` as the partner's replica, letting the previous one go."""
        old, self.replica = self.replica, kept
        if old is not None:
            old.drop()

    def orphan_replica(self) -> None:
        """The stager that leased the replica is gone (a new group): keep the state, which its
        tensors hold alive, without handing it back."""
        if self.replica is not None:
            self.replica.drop = _nothing

    def clear(self) -> None:
        """Let every kept copy go."""
        own, replica, self.own, self.replica = self.own, self.replica, None, None
        for old in (own, replica):
            if old is not None:
                old.drop()


def _nothing() -> None:
    """A drop with nothing to hand back."""
