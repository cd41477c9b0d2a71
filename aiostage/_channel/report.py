"""What a weight publication reports: one ``Delivery`` per subscriber, gathered by ``Publication``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import anyio

from ..errors import ReplicationError

__all__ = ["Delivery", "Publication", "PublishReport", "Status"]

Status = Literal["delivered", "superseded", "dropped", "closed"]


@dataclass(frozen=True, slots=True)
class Delivery:
    """What became of one version for one subscriber (its group rank ``peer``).

    ``status``: ``"delivered"`` (it arrived, in ``seconds``), ``"superseded"`` (a newer version
    was sent to it instead: the subscriber skipped this one), ``"dropped"`` (the subscriber died,
    timed out or was already dropped: ``error`` says which and why; it rejoins by asking again),
    ``"closed"`` (the subscriber closed its end). ``shared_memory``: it went through shared
    memory (the same-host fast path) rather than the process group.
    """

    peer: int
    status: Status
    seconds: float = 0.0
    error: ReplicationError | None = None
    shared_memory: bool = False


@dataclass(frozen=True, slots=True)
class PublishReport:
    """A version's fate: staging time, time until every subscriber's outcome, one ``Delivery``
    per subscriber (by group rank), and the bytes of one frame."""

    version: int
    stage_seconds: float
    seconds: float
    nbytes: int
    deliveries: dict[int, Delivery]

    @property
    def delivered(self) -> list[int]:
        """The subscribers that received this version."""
        return sorted(p for p, d in self.deliveries.items() if d.status == "delivered")

    @property
    def dropped(self) -> list[int]:
        """The subscribers dropped (dead, timed out, or already dropped) by this version."""
        return sorted(p for p, d in self.deliveries.items() if d.status == "dropped")


@dataclass(eq=False)
class Publication:
    """A version being sent in the background; ``await publication.wait()`` for its report."""

    version: int
    seq: int
    peers: frozenset[int]
    stage_seconds: float
    nbytes: int
    began: float = field(default_factory=time.perf_counter)
    outcomes: dict[int, Delivery] = field(default_factory=dict)
    done: anyio.Event = field(default_factory=anyio.Event)
    _report: PublishReport | None = None

    def undecided(self) -> list[int]:
        """The subscribers whose outcome is still open."""
        return sorted(self.peers - self.outcomes.keys())

    def decide(self, delivery: Delivery) -> None:
        """Record a subscriber's outcome (the first one counts); complete when all are in."""
        if delivery.peer in self.outcomes or delivery.peer not in self.peers:
            return
        self.outcomes[delivery.peer] = delivery
        self.check()

    def check(self) -> None:
        """Complete the publication once every subscriber has an outcome."""
        if not self.undecided() and not self.done.is_set():
            took = time.perf_counter() - self.began
            deliveries = dict(sorted(self.outcomes.items()))
            self._report = PublishReport(
                self.version, self.stage_seconds, took, self.nbytes, deliveries
            )
            self.done.set()

    async def wait(self) -> PublishReport:
        """Wait until every subscriber has an outcome (each bounded by the publisher's timeout,
        about twice it at worst) and return the report. Raises nothing: failures are in it."""
        await self.done.wait()
        assert self._report is not None
        return self._report
