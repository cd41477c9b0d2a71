"""The restore negotiation, pure: what each rank can supply, and the newest step every rank's
state is obtainable at, each rank from its fastest source not known to be bad."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ..errors import CheckpointNotFound

__all__ = ["SOURCES", "Choice", "Offer", "Source", "choose"]

Source = Literal["memory", "local", "peer_memory", "peer_local", "durable"]
#: fastest first: this process's memory, its node's disk, a partner's memory, a partner's disk,
#: the durable root
SOURCES: tuple[Source, ...] = ("memory", "local", "peer_memory", "peer_local", "durable")


@dataclass(frozen=True, slots=True)
class Offer:
    """The steps one rank can supply: of its own state (``memory``, ``local``), of other ranks'
    (``held``: in memory, ``stored``: on its node's disk, by rank) and in the durable root."""

    memory: list[int]
    local: list[int]
    held: dict[int, list[int]]
    stored: dict[int, list[int]]
    durable: list[int]

    def row(self) -> dict[str, Any]:
        """As JSON (the roll call's row)."""
        return {
            "memory": self.memory, "local": self.local, "durable": self.durable,
            "held": {str(k): v for k, v in self.held.items()},
            "stored": {str(k): v for k, v in self.stored.items()},
        }  # fmt: skip

    @classmethod
    def of_row(cls, row: Any) -> Offer:
        """Back from JSON; raises ``ValueError`` for a row that is not one."""

        def steps(v: Any) -> list[int]:
            if not isinstance(v, list) or not all(type(s) is int for s in v):
                raise ValueError(f"not a list of steps: {v!r}")
            return v

        def by_rank(v: Any) -> dict[int, list[int]]:
            if not isinstance(v, dict):
                raise ValueError(f"not a map of ranks: {v!r}")
            return {int(k): steps(s) for k, s in v.items()}

        if not isinstance(row, dict):
            raise ValueError(f"not an offer: {row!r}")
        return cls(
            steps(row.get("memory")), steps(row.get("local")), by_rank(row.get("held")),
            by_rank(row.get("stored")), steps(row.get("durable")),
        )  # fmt: skip

    def describe(self) -> str:
        """What this rank had, for an error message."""
        parts = [f"{k} {v}" for k, v in (("memory", self.memory), ("local", self.local)) if v]
        parts += [f"rank {r}'s in memory {s}" for r, s in self.held.items() if s]
        parts += [f"rank {r}'s on disk {s}" for r, s in self.stored.items() if s]
        parts += [f"durable {self.durable}"] if self.durable else []
        return ", ".join(parts) or "nothing"


@dataclass(frozen=True, slots=True)
class Choice:
    """Where rank ``rank`` gets its state at ``step``: ``source``, held by group rank
    ``holder`` (itself for its own memory, local disk and the durable root)."""

    rank: int
    step: int
    source: Source
    holder: int


def options(offers: list[Offer], rank: int, step: int) -> list[Choice]:
    """Every place ``rank``'s state at ``step`` can come from, fastest first."""
    me = offers[rank]
    out = [Choice(rank, step, s, rank) for s in ("memory", "local") if step in getattr(me, s)]
    for source, field in (("peer_memory", "held"), ("peer_local", "stored")):
        out += [
            Choice(rank, step, source, h)  # type: ignore[arg-type]
            for h, o in enumerate(offers)
            if h != rank and step in getattr(o, field).get(rank, ())
        ]
    if step in me.durable:
        out.append(Choice(rank, step, "durable", rank))
    return out


def choose(offers: list[Offer], bad: set[Choice]) -> list[Choice]:
    """Each rank's source at the newest step whose every rank's state is obtainable from a
    source not in ``bad``. Raises ``CheckpointNotFound`` naming what each rank had."""
    steps = {s for o in offers for s in (*o.memory, *o.local, *o.durable)}
    steps |= {s for o in offers for d in (o.held, o.stored) for v in d.values() for s in v}
    for step in sorted(steps, reverse=True):
        picks = []
        for rank in range(len(offers)):
            good = [c for c in options(offers, rank, step) if c not in bad]
            if not good:
                break
            picks.append(good[0])
        else:
            return picks
    had = "; ".join(f"rank {r}: {o.describe()}" for r, o in enumerate(offers))
    failed = f" ({len(bad)} source(s) failed verification)" if bad else ""
    raise CheckpointNotFound(
        f"no step can be restored on every rank{failed}: {had}; restore an older run's "
        "checkpoint with load(), or start afresh"
    )
