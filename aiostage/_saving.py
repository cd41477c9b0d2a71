"""One asynchronous save: stage in the caller, then replicate, write and commit behind it.

``async_save`` is the one-off form; the ``Checkpointer`` runs the same two halves (``stage_job``
in ``save``, ``persist_job`` in its background task).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._handle import CheckpointReport, SaveHandle
from ._replication import ReplicationStager
from ._save import PathLike, save
from ._staging import AsyncStager, DefaultStager, StagingOptions

__all__ = ["Job", "async_save", "finish_job", "persist_job", "stage_job"]

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
