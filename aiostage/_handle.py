"""``SaveHandle`` and ``CheckpointReport``: what an asynchronous save hands back to its caller.

A save goes through phases (stage, replicate, persist, commit); the handle exposes one awaitable
per milestone, each of which any number of tasks may await, and each re-raises the save's error.
"""

from __future__ import annotations

import logging
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import anyio

from ._save import SaveReport

__all__ = ["CheckpointReport", "Outcome", "SaveHandle"]

_T = TypeVar("_T")
_log = logging.getLogger("aiostage")


class Outcome(Generic[_T]):
    """A result set once and awaited by any number of tasks (``await outcome``)."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._event = anyio.Event()
        self._value: _T | None = None
        self._error: BaseException | None = None
        self.seen = False  # someone received the error

    def done(self) -> bool:
        """Whether the result (or the error) is set."""
        return self._event.is_set()

    def set(self, value: _T) -> None:
        """Set the result (once)."""
        self._value = value
        self._event.set()

    def fail(self, error: BaseException) -> None:
        """Set the error that every ``await`` raises (once)."""
        self._error = error
        self._event.set()

    async def wait_set(self) -> None:
        """Block until the result or the error is set; raise nothing."""
        await self._event.wait()

    async def wait(self) -> _T:
        """The result; raises the error. Blocks until it is set."""
        await self._event.wait()
        if self._error is not None:
            self.seen = True
            raise self._error
        return self._value  # type: ignore[return-value]

    def unseen_error(self) -> BaseException | None:
        """The error if no ``await`` received it yet (it counts as received now)."""
        if self._error is None or self.seen:
            return None
        self.seen = True
        return self._error

    def __await__(self) -> Generator[Any, None, _T]:
        return self.wait().__await__()

    def __del__(self) -> None:
        if self._error is not None and not self.seen:
            _log.error("aiostage: %s failed and nobody awaited it: %r", self._what, self._error)


@dataclass(frozen=True, slots=True)
class CheckpointReport:
    """What one asynchronous save cost, phase by phase (seconds) and in bytes.

    ``stall_seconds`` is what training saw: the time ``save``/``async_save`` took to return,
    ``wait_seconds`` of it spent waiting for an earlier save to finish (``on_busy="wait"``).
    ``stage_bytes`` are the unique tensor bytes staged; ``save`` is the persistence layer's own
    ``SaveReport`` (``None`` when skipped).
    """

    step: int | None
    path: Path
    skipped: bool
    stall_seconds: float
    wait_seconds: float
    stage_seconds: float
    replicate_seconds: float
    persist_seconds: float
    total_seconds: float
    stage_bytes: int
    save: SaveReport | None

    @property
    def stage_gb_per_second(self) -> float:
        """Staged bytes per second of staging, in GB/s (1e9 bytes)."""
        return self.stage_bytes / self.stage_seconds / 1e9 if self.stage_seconds else 0.0

    @property
    def persist_gb_per_second(self) -> float:
        """Bytes written per second of persisting (write, fsync, commit), in GB/s."""
        n = self.save.bytes_written if self.save is not None else 0
        return n / self.persist_seconds / 1e9 if self.persist_seconds else 0.0


class SaveHandle:
    """One asynchronous save: ``await handle.staged`` (the state may be changed after it),
    ``await handle.committed`` (durable and visible; returns the ``SaveReport``) and
    ``await handle.report`` (a ``CheckpointReport``). The last two raise the save's error.

    ``skipped`` is true when a ``Checkpointer`` with ``on_busy="skip"`` did not save this step;
    ``committed`` then returns ``None``.
    """

    def __init__(self, step: int | None, path: Path, *, skipped: bool = False) -> None:
        self.step, self.path, self.skipped = step, path, skipped
        what = f"the save of {path}"
        self._staged: Outcome[None] = Outcome(what)
        self._committed: Outcome[SaveReport | None] = Outcome(what)
        self._report: Outcome[CheckpointReport] = Outcome(what)
        self._report.seen = True  # an error is reported once, through `committed`

    @property
    def staged(self) -> Outcome[None]:
        """Awaitable: the state is copied; the caller may change it from now on."""
        return self._staged

    @property
    def committed(self) -> Outcome[SaveReport | None]:
        """Awaitable: the checkpoint is durable and visible (``None`` when skipped)."""
        return self._committed

    @property
    def report(self) -> Outcome[CheckpointReport]:
        """Awaitable: the ``CheckpointReport`` once the save finished."""
        return self._report

    def done(self) -> bool:
        """Whether the save finished (committed or failed)."""
        return self._committed.done()

    async def wait(self) -> None:
        """Wait until the save finished, committed or failed, without raising its error."""
        await self._committed.wait_set()

    def __repr__(self) -> str:
        state = "skipped" if self.skipped else "done" if self.done() else "in flight"
        return f"<SaveHandle step={self.step} path={str(self.path)!r} {state}>"
