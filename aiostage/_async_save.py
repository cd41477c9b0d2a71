"""One asynchronous save: stage in the caller, then replicate, write and commit behind it.

``async_save`` is the one-off form; the ``Checkpointer`` runs the same two halves (``stage_job``
in ``save``, ``persist_job`` in its background task).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import anyio

from ._replication.stager import ReplicationStager
from ._staging import AsyncStager, DefaultStager, StagingOptions
from ._storage.save import PathLike, SaveReport, save

__all__ = [
    "CheckpointReport",
    "Job",
    "Outcome",
    "SaveHandle",
    "async_save",
    "finish_job",
    "persist_job",
    "stage_job",
]

_RUNNING: set[asyncio.Task[None]] = set()  # async_save's background tasks, until they finish


@dataclass(slots=True)
class Job:
    """A staged state dict on its way to disk, and what it cost so far."""

    handle: SaveHandle
    staged: Any
    stager: AsyncStager
    metadata: dict[str, Any] | None
    began: float
    wait: float = 0.0
    stage: float = 0.0
    stage_bytes: int = 0
    stall: float = 0.0
    times: dict[str, float] = field(default_factory=dict)


async def stage_job(job: Job, state_dict: Any) -> None:
    """Stage ``state_dict`` into ``job`` (the caller's part of a save)."""
    stats = getattr(job.stager, "statistics", None)
    before = stats().bytes_staged if stats is not None else 0
    t = time.perf_counter()
    job.staged = await job.stager.stage(state_dict)
    job.stage = time.perf_counter() - t
    job.stage_bytes = stats().bytes_staged - before if stats is not None else 0
    job.stall = time.perf_counter() - job.began
    job.handle.staged.set(None)


async def persist_job(
    job: Job, *, pg: Any, replicate: ReplicationStager | None, pg_timeout: float
) -> CheckpointReport:
    """Replicate (optionally), write and commit ``job``; release its staged copy either way."""
    t0 = time.perf_counter()
    try:
        if replicate is not None:
            replicate.release(await replicate.stage(job.staged))
        t1 = time.perf_counter()
        report = await save(
            job.staged, job.handle.path, pg=pg, overwrite=True,
            metadata=job.metadata, pg_timeout=pg_timeout,
        )  # fmt: skip
    finally:
        job.stager.release(job.staged)
    now = time.perf_counter()
    return CheckpointReport(
        job.handle.step, job.handle.path, False, job.stall, job.wait, job.stage, t1 - t0,
        now - t1, now - job.began, job.stage_bytes, report,
    )  # fmt: skip


def finish_job(job: Job, outcome: CheckpointReport | BaseException) -> None:
    if isinstance(outcome, BaseException):
        job.handle.committed.fail(outcome)
        job.handle.report.fail(outcome)
    else:
        job.handle.committed.set(outcome.save)
        job.handle.report.set(outcome)


async def async_save(
    state_dict: Any,
    path: PathLike,
    *,
    stager: AsyncStager | None = None,
    pg: Any = None,
    replicate: ReplicationStager | None = None,
    metadata: dict[str, Any] | None = None,
    pg_timeout: float = 600.0,
) -> SaveHandle:
    """Stage ``state_dict``, then write it to ``path`` in the background; return at once.

    Returns after staging (``handle.staged`` is already done): the caller may change the state
    from then on. The rest runs in an asyncio task the handle owns: ``replicate.stage`` of the
    staged copy when given, then ``aiostage.save`` (with ``pg``: every rank calls it; give it a
    group the training loop does not use concurrently). ``await handle.committed`` raises the
    save's error; one nobody awaits is logged. Without ``stager`` the copy goes to fresh memory
    (a ``Checkpointer`` reuses buffers across saves). Blocks on nothing; raises what staging
    raises (``StagingError``, ``LeaseTimeout``) before returning.
    """
    own = stager is None
    use = stager or DefaultStager(StagingOptions(pool_size=1))
    job = Job(SaveHandle(None, Path(path)), None, use, metadata, time.perf_counter())
    try:
        await stage_job(job, state_dict)
    except BaseException:
        if own:
            await use.aclose()
        raise

    closing = use if own else None
    task = asyncio.get_running_loop().create_task(
        _background(job, pg, replicate, pg_timeout, closing)
    )
    _RUNNING.add(task)
    task.add_done_callback(_RUNNING.discard)
    return job.handle


async def _background(
    job: Job, pg: Any, replicate: ReplicationStager | None, pg_timeout: float, closing: Any
) -> None:
    """``async_save``'s task: persist ``job``, settle its handle, close a stager it made."""
    try:
        finish_job(job, await persist_job(job, pg=pg, replicate=replicate, pg_timeout=pg_timeout))
    except Exception as exc:
        finish_job(job, exc)
    finally:
        if closing is not None:
            await closing.aclose()


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
