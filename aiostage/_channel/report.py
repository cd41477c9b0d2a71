"""What a weight publication reports (a ``Delivery`` per subscriber, a ``PublishReport``), awaited."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from .._core.outcome import Outcome, Resolver
from ..errors import ReplicationError

__all__ = ["Delivery", "Publication", "PublishReport", "Sending", "Status"]

Status = Literal["delivered", "superseded", "dropped", "closed", "absent"]


@dataclass(frozen=True, slots=True)
class Delivery:
    """What became of one version for one subscriber (its group rank ``peer``).

    ``status``: ``"delivered"`` (it arrived, in ``seconds``), ``"superseded"`` (a newer version
    was sent to it instead: the subscriber skipped this one), ``"dropped"`` (the subscriber died,
    timed out or was already dropped: ``error`` says which and why; it rejoins by asking again),
    ``"closed"`` (the subscriber closed its end), ``"absent"`` (it had not asked for a version
    yet, not started: nothing waited for it, and it gets the latest version when it asks).
    ``shared_memory``: it went through shared memory (the same-host fast path) rather than the
    process group.
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


@dataclass(frozen=True, eq=False)
class Publication:
    """A version being sent in the background (what ``WeightPublisher.submit`` returns),
    read-only: the publisher settles it.

    ``await publication.report`` gives the ``PublishReport`` once every subscriber has an
    outcome; ``await publication.deliveries[rank]`` gives one subscriber's ``Delivery`` as soon
    as it has one. Each blocks at most about twice the publisher's ``timeout`` and raises
    nothing: failures are in the ``Delivery``.
    """

    version: int
    report: Outcome[PublishReport]
    deliveries: Mapping[int, Outcome[Delivery]]

    def done(self) -> bool:
        """Whether every subscriber has an outcome (``report`` is ready); never blocks."""
        return self.report.done()


class Sending:
    """The publisher's side of one ``Publication``: each subscriber's outcome, as it comes."""

    def __init__(
        self, version: int, seq: int, peers: frozenset[int], stage_seconds: float, nbytes: int
    ) -> None:
        self.version, self.seq, self.peers = version, seq, peers
        self.stage_seconds, self.nbytes = stage_seconds, nbytes
        self.began = time.perf_counter()
        self.staged = True  # ``False`` while its copy runs: the report waits for it
        self.outcomes: dict[int, Delivery] = {}
        what = f"version {version}"
        self._report = Resolver[PublishReport](what)
        self._each = {p: Resolver[Delivery](what) for p in sorted(peers)}
        each = MappingProxyType({p: Outcome(r) for p, r in self._each.items()})
        self.publication = Publication(version, Outcome(self._report), each)

    def undecided(self) -> list[int]:
        """The subscribers whose outcome is still open."""
        return sorted(self.peers - self.outcomes.keys())

    def finished(self) -> bool:
        """Whether every subscriber has an outcome."""
        return self._report.settled()

    async def wait_finished(self) -> None:
        """Block until every subscriber has an outcome; raise nothing."""
        await self._report.wait_settled()

    def decide(self, delivery: Delivery) -> None:
        """Record a subscriber's outcome (the first one counts); complete when all are in."""
        if delivery.peer in self.outcomes or delivery.peer not in self.peers:
            return
        self.outcomes[delivery.peer] = delivery
        self._each[delivery.peer].set(delivery)
        self.check()

    def copied(self, stage_seconds: float) -> None:
        """Its copy is done, in ``stage_seconds``: the report may complete."""
        self.stage_seconds, self.staged = stage_seconds, True
        self.check()

    def check(self) -> None:
        """Complete the publication once it is staged and every subscriber has an outcome."""
        if self.staged and not self.undecided() and not self.finished():
            took = time.perf_counter() - self.began
            deliveries = dict(sorted(self.outcomes.items()))
            self._report.set(
                PublishReport(self.version, self.stage_seconds, took, self.nbytes, deliveries)
            )
