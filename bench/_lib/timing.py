"""Timing: the loop-lag heartbeat (with its timeline), per-rep figures and round-robin reps."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiostage.testing import LoopLag


class Heartbeat(LoopLag):
    """``async with Heartbeat() as beat: await work()``: aiostage's own ``LoopLag`` (a task
    that sleeps 1 ms in a loop and records how late each wake-up came), with its timeline."""


def percentile_ms(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank) of ``samples`` in seconds, as ms."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return 1e3 * ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass
class Timing:
    """Per-rep wall times and loop lateness of one measured operation, and one rep's timeline."""

    seconds: list[float] = field(default_factory=list)
    max_lag_ms: list[float] = field(default_factory=list)  # per rep
    lateness: list[float] = field(default_factory=list)  # pooled over reps, seconds
    traces: list[list[list[float]]] = field(default_factory=list)  # per rep

    @property
    def min(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def lag_ms(self) -> float:
        """The median over reps of each rep's loop max lag."""
        return statistics.median(self.max_lag_ms) if self.max_lag_ms else 0.0

    @property
    def p99_ms(self) -> float:
        return percentile_ms(self.lateness, 99)

    def median_trace(self) -> list[list[float]]:
        """The timeline of the rep whose time is the median's (the upper one of an even count)."""
        if not self.traces:
            return []
        order = sorted(range(len(self.seconds)), key=self.seconds.__getitem__)
        return self.traces[order[len(order) // 2]]

    def as_dict(self) -> dict[str, Any]:
        """The raw figures (a report's JSON)."""
        return {
            "seconds": self.seconds,
            "max_lag_ms": self.max_lag_ms,
            "median_s": self.median if self.seconds else None,
            "min_s": self.min if self.seconds else None,
            "lag_ms": self.lag_ms,
            "p99_lag_ms": self.p99_ms,
        }


@dataclass
class Case:
    """One contender: ``await op()`` is timed under a ``Heartbeat``; ``before``/``after`` are not."""

    name: str
    op: Callable[[], Awaitable[Any]]
    before: Callable[[], Awaitable[None]] | None = None
    after: Callable[[Any], Awaitable[None]] | None = None
    timing: Timing = field(default_factory=Timing)


async def run_rounds(cases: Sequence[Case], reps: int) -> None:
    """``reps`` rounds, each case once per round, so drift on a shared machine hits all alike."""
    for _ in range(reps):
        for case in cases:
            if case.before is not None:
                await case.before()
            async with Heartbeat() as beat:
                began = time.perf_counter()
                result = await case.op()
                case.timing.seconds.append(time.perf_counter() - began)
            case.timing.max_lag_ms.append(beat.max_ms)
            case.timing.lateness.extend(beat.lateness)
            case.timing.traces.append(beat.trace())
            if case.after is not None:
                await case.after(result)
            del result


def timings(cases: Sequence[Case]) -> dict[str, Timing]:
    """Only the figures: a case's closures hold its buffers alive."""
    return {c.name: c.timing for c in cases}
