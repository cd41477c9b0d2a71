"""One asynchronous save: stage in the caller, then replicate, write and commit behind it.

``async_save`` is the one-off form, its background work a task of the caller's task group; the
``Checkpointer`` runs the same two halves (``stage_job`` in ``save``, ``persist_job`` in its own
background task). Either way the caller gets a read-only ``SaveHandle``; the side doing the work
settles it through a ``Settler``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread

from ._core.outcome import Outcome, Resolver, wait_settled
from ._core.timeouts import DEFAULT_TIMEOUT, seconds
from ._format.codec import check_metadata
from ._format.storable import check_storable
from ._replication.stager import ReplicationStager
from ._staging import AsyncStager, DefaultStager, StagingOptions
from ._storage.locate import PathLike
from ._storage.save import SaveReport, save
from ._train_state import as_state_dict
from .errors import PersistenceError, UnsupportedValueError

__all__ = [
    "CheckpointReport",
    "Job",
    "SaveHandle",
    "Settler",
    "async_save",
    "persist_job",
    "settled_handle",
    "stage_job",
    "unstorable",
]


@dataclass(slots=True)
class Job:
    """A staged state dict on its way to disk, and what it cost so far."""

    settler: Settler
    staged: Any
    stager: AsyncStager
    metadata: dict[str, Any] | None
    began: float
    wait: float = 0.0
    stage: float = 0.0
    stage_bytes: int = 0
    stall: float = 0.0

    @property
    def handle(self) -> SaveHandle:
        """The caller's read-only view of this save."""
        return self.settler.handle


async def stage_job(job: Job, state_dict: Any, issued: Callable[[], object] | None = None) -> None:
    """Stage ``state_dict`` into ``job`` (the caller's part of a save). ``issued``: a zero-stall
    save, whose caller goes on once the copy is issued (``DefaultStager.stage``); with another
    stager, once staging starts."""
    stats = getattr(job.stager, "statistics", None)
    before = stats().bytes_staged if stats is not None else 0
    t = time.perf_counter()
    if issued is None:
        job.staged = await job.stager.stage(state_dict)
    else:

        def at_issue() -> None:
            job.stall = time.perf_counter() - job.began
            issued()

        if isinstance(job.stager, DefaultStager):
            job.staged = await job.stager.stage(state_dict, issued=at_issue)
        else:
            at_issue()
            job.staged = await job.stager.stage(state_dict)
    job.stage = time.perf_counter() - t
    job.stage_bytes = stats().bytes_staged - before if stats is not None else 0
    if issued is None:
        job.stall = time.perf_counter() - job.began
    job.settler.staged.set(None)


async def persist_job(
    job: Job, *, pg: Any, replication: ReplicationStager | None, pg_timeout: float
) -> CheckpointReport:
    """Replicate (optionally), write and commit ``job``; release its staged copy either way."""
    t0 = time.perf_counter()
    try:
        if replication is not None:
            replication.release(await replication.stage(job.staged))
        t1 = time.perf_counter()
        report = await save(
            job.staged, job.handle.path, pg=pg, overwrite=True,
            metadata=job.metadata, timeout=pg_timeout,
        )  # fmt: skip
    finally:
        job.stager.release(job.staged)
    now = time.perf_counter()
    return CheckpointReport(
        job.handle.step, job.handle.path, False, job.stall, job.wait, job.stage, t1 - t0,
        now - t1, now - job.began, job.stage_bytes, report,
    )  # fmt: skip


async def async_save(
    state_dict: Any,
    path: PathLike,
    *,
    task_group: anyio.abc.TaskGroup,
    stager: AsyncStager | None = None,
    pg: Any = None,
    replication: ReplicationStager | None = None,
    metadata: dict[str, Any] | None = None,
    timeout: float | timedelta = DEFAULT_TIMEOUT,  # noqa: ASYNC109 - ProcessGroup waits Python cannot cancel
) -> SaveHandle:
    """Stage ``state_dict``, then write it to ``path`` in a task of ``task_group``; return at once.

    Returns once the state is staged (by ``stager``, else into fresh memory; the state may change
    from then on). The rest is a task of ``task_group``, which bounds it: ``replication.stage`` of
    the staged copy (a ``ReplicationStager`` the caller owns), then ``aiostage.save`` (with ``pg``:
    on every rank, on a group the training loop leaves alone; ``timeout``, seconds or ``timedelta``,
    default 600: the longest any one wait for another rank may take, past it
    ``CheckpointWriteError``). Leaving the task group waits for the save; cancelling it cancels the
    save (nothing half-written is visible; ``handle.committed`` raises ``PersistenceError``). A
    failed save never fails the group: ``await handle.committed`` raises it (logged if unseen).

    Blocks on staging. Raises ``UnsupportedValueError`` naming the key of a value the format
    cannot store (before anything is staged), what staging raises (``StagingError``,
    ``LeaseTimeout``), and ``ValueError`` (bad ``timeout``) or ``RuntimeError`` (``task_group``
    not active) first.
    """
    limit, own = seconds(timeout), stager is None
    state_dict = await as_state_dict(state_dict)
    refused = await unstorable(state_dict, metadata)  # refused now, not when written
    if refused is not None:
        raise refused
    use = stager or DefaultStager(StagingOptions(pool_size=1))
    job = Job(Settler(None, Path(path)), None, use, metadata, time.perf_counter())
    try:
        await stage_job(job, state_dict)
        args = (job, pg, replication, limit, use if own else None)
        task_group.start_soon(_background, *args, name=f"aiostage.async_save to {path}")
    except BaseException:
        with anyio.CancelScope(shield=True):
            if job.staged is not None:
                use.release(job.staged)
            if own:
                await use.aclose()
        raise
    return job.handle


async def unstorable(state_dict: Any, metadata: dict[str, Any] | None) -> Exception | None:
    """What ``aiostage.save`` would refuse in ``metadata`` or ``state_dict`` (the
    ``UnsupportedValueError``), or ``None``: asked before staging, so a save staged now and
    written later is refused while its caller still waits (the walk runs in a worker thread)."""
    try:
        check_metadata(metadata)
        await anyio.to_thread.run_sync(check_storable, state_dict)
    except UnsupportedValueError as exc:
        return exc
    return None


async def _background(
    job: Job,
    pg: Any,
    replication: ReplicationStager | None,
    pg_timeout: float,
    closing: AsyncStager | None,
) -> None:
    """``async_save``'s task: persist ``job``, settle its handle, close a stager it made."""
    try:
        report = await persist_job(job, pg=pg, replication=replication, pg_timeout=pg_timeout)
        job.settler.finish(report)
    except Exception as exc:
        job.settler.finish(exc)
    finally:
        job.settler.abandon()  # cancelled: settle what is still open, for other waiters
        if closing is not None:
            with anyio.CancelScope(shield=True):
                await closing.aclose()


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


@dataclass(frozen=True, eq=False)
class SaveHandle:
    """One asynchronous save, read-only: ``await handle.staged`` (the state may be changed
    after it), ``await handle.committed`` (durable and visible; returns the ``SaveReport``) and
    ``await handle.report`` (a ``CheckpointReport``). The last two block until the save ends and
    raise its error; ``staged``, ``committed`` and ``report`` are ``Outcome``s, which the save
    itself settles.

    ``skipped`` is true when a ``Checkpointer`` with ``on_busy="skip"`` did not save this step;
    ``committed`` then returns ``None``. ``step`` is ``None`` for ``async_save``.
    """

    step: int | None
    path: Path
    staged: Outcome[None]
    committed: Outcome[SaveReport | None]
    report: Outcome[CheckpointReport]
    skipped: bool = False

    def done(self) -> bool:
        """Whether the save finished (committed or failed); never blocks."""
        return self.committed.done()

    async def wait(self) -> None:
        """Block until the save finished, committed or failed; raise nothing (its error stays
        unreceived: a ``Checkpointer`` raises it at the next ``save``)."""
        await wait_settled(self.committed)

    def __repr__(self) -> str:
        state = "skipped" if self.skipped else "done" if self.done() else "in flight"
        return f"<SaveHandle step={self.step} path={str(self.path)!r} {state}>"


class Settler:
    """The working side of one ``SaveHandle``: settles its outcomes (the handle cannot)."""

    def __init__(self, step: int | None, path: Path, *, skipped: bool = False) -> None:
        what = f"the save of {path}"
        self.staged = Resolver[None](what)
        self.committed = Resolver[SaveReport | None](what)
        self.report = Resolver[CheckpointReport](what, report_unseen=False)  # once: committed
        self.handle = SaveHandle(
            step, path, Outcome(self.staged), Outcome(self.committed), Outcome(self.report),
            skipped,
        )  # fmt: skip

    def finish(self, outcome: CheckpointReport | BaseException) -> None:
        """Settle ``committed`` and ``report`` with the save's report or its error."""
        if isinstance(outcome, BaseException):
            self.committed.fail(outcome)
            self.report.fail(outcome)
        else:
            self.committed.set(outcome.save)
            self.report.set(outcome)

    def abandon(self) -> None:
        """Settle what is still open after the save was cancelled (logged nowhere: the
        cancellation was the owner's doing); a no-op once settled."""
        error = PersistenceError(
            f"the save of {self.handle.path} was cancelled (with the task group running it) "
            "before it was reported committed; nothing half-written is visible",
            path=self.handle.path,
        )
        self.staged.fail(error, seen=True)
        self.committed.fail(error, seen=True)
        self.report.fail(error, seen=True)


def settled_handle(report: CheckpointReport) -> SaveHandle:
    """A handle settled already with ``report`` (a ``Checkpointer``'s skipped step)."""
    settler = Settler(report.step, report.path, skipped=report.skipped)
    settler.staged.set(None)
    settler.finish(report)
    return settler.handle
