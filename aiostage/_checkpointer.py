"""The front door for training loops: ``Checkpointer``.

A save returns once the state is staged; replication, persistence, commit and retention go on in
the background. A ``Checkpointer`` runs them one save at a time in a task it owns (so every rank
issues its collectives in the same order), on a private gloo group (so they never interleave with
the training loop's own collectives), and deletes old checkpoints only after a newer one is
committed. See ``docs/checkpointer.md``.
"""

from __future__ import annotations

import logging
import time
import uuid
import warnings
from datetime import timedelta
from pathlib import Path, PurePath
from types import TracebackType
from typing import Any, Literal

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._async_save import (
    CheckpointReport,
    Job,
    SaveHandle,
    Settler,
    persist_job,
    settled_handle,
    stage_job,
    unstorable,
)
from ._core import dist
from ._core.timeouts import DEFAULT_TIMEOUT, seconds
from ._format.codec import STEP_NAME, step_name
from ._replication.stager import ReplicationStager
from ._staging import AsyncStager, DefaultStager, StagingOptions
from ._storage.locate import PathLike, locate
from ._storage.reader import load
from ._train_state import as_state_dict
from .errors import (
    AiostageWarning,
    CheckpointNotFound,
    ClosedError,
    PersistenceError,
    UnsupportedValueError,
    UsageError,
)

__all__ = ["Checkpointer", "step_name"]


_log = logging.getLogger("aiostage")


class Checkpointer:
    """Checkpoint a training loop every few steps into ``root/step_NNNNNNNNN``.

    ``async with Checkpointer(root) as ckpt: handle = await ckpt.save(step, state)`` returns
    once ``state`` is staged (the training-visible stall); replication (``replicate=True``:
    a ``ReplicationStager`` keeps each rank's state in its partner's memory, see ``recover``),
    the durable write, the commit and retention (``keep_last`` newest committed checkpoints
    kept; older ones deleted only after a newer one is committed) run in a background task.
    At most ``max_in_flight`` saves are staged or persisting; beyond that ``save`` waits
    (``on_busy="wait"``) or returns a skipped handle (``"skip"``, agreed by every rank).

    On entry it clears what crashed saves left (``sweep``) and warns (``AiostageWarning``) about
    entries of ``root`` that are not checkpoints. A failed background save is raised at the next
    ``save`` and at ``aclose`` unless its handle already delivered it; ``aclose`` waits for saves
    in flight. With ``pg`` (gloo; every rank of the default group enters the Checkpointer, as it
    creates private groups), ``root`` must be shared by the ranks; group rank 0 deletes old steps.
    ``timeout`` (seconds or ``timedelta``, default 600) is the longest any one wait for another
    rank may take (a collective, a send or a receive); past it that save fails
    (``CheckpointWriteError``, or ``ReplicationTimeout`` from the replication). Raises
    ``ValueError`` for a bad ``keep_last``, ``max_in_flight``, ``on_busy`` or ``timeout``.
    """

    def __init__(
        self,
        root: PathLike,
        *,
        keep_last: int | None = 3,
        stager: AsyncStager | None = None,
        pg: Any = None,
        replicate: bool = False,
        max_in_flight: int = 1,
        on_busy: Literal["wait", "skip"] = "wait",
        timeout: float | timedelta = DEFAULT_TIMEOUT,
    ) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be at least 1 (or None: keep all), got {keep_last}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        if on_busy not in ("wait", "skip"):
            raise ValueError(f'on_busy must be "wait" or "skip", got {on_busy!r}')
        self._storage, self.root = locate(root)
        self.keep_last, self.max_in_flight, self.on_busy = keep_last, max_in_flight, on_busy
        self._pg, self._replicate, self._timeout = pg, replicate, seconds(timeout)
        self._own_stager = stager is None
        self._stager = stager or DefaultStager(StagingOptions(pool_size=max_in_flight))
        self._rank, self._world = dist.rank_and_size(pg) if pg is not None else (0, 1)
        self._bg: Any = None  # private groups: background saves, and each save's agreement
        self._fg: Any = None
        self._repl: ReplicationStager | None = None
        self._slots = anyio.Semaphore(max_in_flight)
        self._send: MemoryObjectSendStream[Job] | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._failed: list[Settler] = []
        self._steps: list[int] = []
        self._pending: list[int] = []  # steps accepted by save, not yet committed or failed
        self._state = "new"

    # ------------------------------------------------------------ lifetime

    async def __aenter__(self) -> Checkpointer:
        if self._state != "new":
            raise UsageError("a Checkpointer can be entered once; create a new one")
        self._state = "open"
        if self._pg is not None and self._world > 1:
            self._bg = await dist.private_group(self._pg)
            self._fg = await dist.private_group(self._pg)
        if self._replicate:
            self._repl = ReplicationStager(self._bg, timeout=self._timeout)
        if self._rank == 0:
            stuck: list[tuple[PurePath, OSError]] = []
            try:
                await self._storage.make_root(self.root)
                await self._storage.sweep(self.root, lambda path, e: stuck.append((path, e)))
            except OSError as exc:
                self._state = "closed"
                raise UsageError(
                    f"{self.root} cannot be a checkpoint root (a directory): {exc}"
                ) from exc
            for path, error in stuck:
                warnings.warn(
                    f"{path}: a leftover of an interrupted save or deletion could not be "
                    f"removed ({error}); it is hidden and ignored, remove it by hand",
                    AiostageWarning,
                    stacklevel=2,
                )
        self._steps = await self._scan(warn=True)
        send, receive = anyio.create_memory_object_stream[Job](self.max_in_flight)
        self._send, self._tg = send, anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._worker, receive)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._close(raise_failure=e is None)  # never mask the body's own exception

    async def aclose(self) -> None:
        """Wait for the saves in flight, stop the background task and free the buffers; then
        raise the first background failure nobody received. Idempotent."""
        await self._close(raise_failure=True)

    async def _close(self, *, raise_failure: bool) -> None:
        if self._state != "open":
            await anyio.lowlevel.checkpoint()
            return
        self._state = "closed"
        try:
            if self._send is not None:
                await self._send.aclose()
            if self._tg is not None:
                await self._tg.__aexit__(None, None, None)
        finally:
            if self._repl is not None:
                await self._repl.aclose()
            if self._own_stager:
                await self._stager.aclose()
        if raise_failure:
            self._raise_failure()

    # ------------------------------------------------------------ saving

    async def save(
        self,
        step: int,
        state_dict: Any,
        metadata: dict[str, Any] | None = None,
        *,
        overwrite: bool = False,
        overlap: bool = False,
    ) -> SaveHandle:
        """Stage ``state_dict`` as checkpoint ``step``; return once it is staged.

        ``overlap=True`` (zero-stall): return as soon as the copy is issued, so it overlaps the
        next forward and backward pass; ``await handle.staged`` before anything changes the
        state in place (``optimizer.step()``). A tensor changed before that fails the save with
        ``StagingError`` naming its key (at ``handle.staged`` and ``handle.committed``), as
        does any other staging error after the copy was issued.

        ``metadata`` (JSON) is stored with ``"step"`` added. ``step`` must be newer than every
        step committed or being saved (the newest again only with ``overwrite=True``, which
        replaces it); with ``pg`` the ranks agree first (a small all-gather) and all save or all
        raise. Blocks on a free slot (``on_busy="wait"``) and on staging. Raises an earlier
        background failure first (that save is lost; this one is not attempted),
        ``UnsupportedValueError`` naming the key of a value the format cannot store (before
        staging), ``UsageError`` for a step that exists or is older or outside ``async with``
        (``ClosedError`` after it), and what staging raises.
        """
        self._check_open()
        began = time.perf_counter()
        path = self.root / step_name(step)
        meta = {**(metadata or {}), "step": step}
        state_dict = await as_state_dict(state_dict)
        refused = await unstorable(state_dict, meta)
        if await self._agree(step, overwrite, refused):
            return _skipped(step, path, began)
        job = Job(Settler(step, path), None, self._stager, meta, began)
        self._pending.append(step)
        try:
            await self._queue(job, state_dict, overlap)
        except BaseException:
            self._pending.remove(step)
            raise
        return job.handle

    async def _queue(self, job: Job, state_dict: Any, overlap: bool) -> None:
        """Wait for a slot, stage ``state_dict`` into ``job`` and hand it to the worker; with
        ``overlap``, return once the copy is issued and stage in a background task."""
        await self._slots.acquire()
        job.wait = time.perf_counter() - job.began
        try:
            if overlap:  # the task's own clone keeps the worker's stream open until it sent
                assert self._tg is not None
                assert self._send is not None
                await self._tg.start(self._stage_behind, job, state_dict, self._send.clone())
                return
            await stage_job(job, state_dict)
            assert self._send is not None
            self._send.send_nowait(job)  # a free slot means room in the stream
        except BaseException:
            self._slots.release()
            raise

    async def _stage_behind(
        self,
        job: Job,
        state_dict: Any,
        send: MemoryObjectSendStream[Job],
        *,
        task_status: anyio.abc.TaskStatus[None],
    ) -> None:
        """Stage a zero-stall save (a background task); what fails before the copy is issued
        is raised by ``save`` (``start``), what fails after settles the handle."""
        issued = False

        def started() -> None:
            nonlocal issued
            issued = True
            task_status.started()

        try:
            with send:
                await stage_job(job, state_dict, issued=started)
                send.send_nowait(job)
        except BaseException as exc:
            if not issued:
                raise
            try:
                if isinstance(exc, Exception):
                    job.settler.staged.fail(exc)
                    self._failed_job(job, exc)
            finally:
                self._end_job(job)
            if not isinstance(exc, Exception):
                raise

    async def reserve(self, state_dict: Any) -> None:
        """Prepare the staging buffers for state dicts laid out like ``state_dict`` now (e.g.
        ``train_state(model, optimizer)`` right after building them), so the first ``save``
        stalls training no longer than the later ones. Blocks on nothing; a no-op with a
        ``stager`` that has no ``reserve``."""
        self._check_open()
        reserve = getattr(self._stager, "reserve", None)
        if reserve is not None:
            await reserve(await as_state_dict(state_dict), self.max_in_flight)

    def _check_open(self) -> None:
        """Saving needs the background task that ``async with`` runs (reading does not)."""
        if self._state == "new":
            raise UsageError(
                "this Checkpointer was not entered: save, reserve and recover need `async with "
                "Checkpointer(root) as ckpt:` (latest, load and steps work without)"
            )
        if self._state == "closed":
            raise ClosedError("this Checkpointer is closed; create a new one to save again")

    async def _agree(self, step: int, overwrite: bool, unstorable: Exception | None) -> bool:
        """Raise what stops this save, the same on every rank (one all-gather with ``pg``: no
        rank is left in a collective for a save the others refused); return whether every rank
        skips it (``on_busy="skip"`` and a rank busy)."""
        failure = self._unseen_failure()
        newest = max([*self._steps, *self._pending], default=-1)
        busy = self.on_busy == "skip" and self._slots.value == 0
        mine = [step, newest, overwrite, busy, unstorable is not None, failure is not None]
        rows = [[int(v) for v in mine]]
        if self._fg is not None:
            rows = await dist.all_gather_ints(
                self._fg, rows[0], pg_timeout=self._timeout, what="Checkpointer save agreement"
            )
        for error in (failure, unstorable, _refusal(rows, self.root, self.keep_last)):
            if error is not None:
                raise error
        return any(row[3] for row in rows)

    async def _worker(self, receive: MemoryObjectReceiveStream[Job]) -> None:
        """Persist the staged jobs one by one, in order (the background task)."""
        async with receive:
            async for job in receive:
                try:
                    report = await persist_job(
                        job, pg=self._bg, replication=self._repl, pg_timeout=self._timeout
                    )
                except Exception as exc:
                    self._failed_job(job, exc)
                else:
                    self._committed(job.handle.step)
                    await self._retain()
                    job.settler.finish(report)  # committed, whether retention worked or not
                finally:
                    self._end_job(job)

    def _failed_job(self, job: Job, error: Exception) -> None:
        """Settle ``job`` with ``error``; the next ``save`` raises it unless its handle did."""
        self._failed.append(job.settler)
        job.settler.finish(error)

    def _end_job(self, job: Job) -> None:
        """``job`` is over (committed, failed or cancelled): its slot and step come back, and a
        cancelled job's handle is settled for its other waiters."""
        self._slots.release()
        if job.handle.step is not None:
            self._pending.remove(job.handle.step)
        job.settler.abandon()

    def _raise_failure(self) -> None:
        """Raise the first background failure that no ``await handle.committed`` delivered."""
        error = self._unseen_failure()
        if error is not None:
            raise error

    def _unseen_failure(self) -> BaseException | None:
        """Take the first background failure that no ``await handle.committed`` delivered."""
        failed, self._failed = self._failed, []
        for settler in failed:
            error = settler.committed.unseen_error()
            if error is not None:
                return error
        return None

    # ------------------------------------------------------------ steps and retention

    def _committed(self, step: int | None) -> None:
        if step is not None and step not in self._steps:
            self._steps = sorted([*self._steps, step])

    async def _retain(self) -> None:
        """Delete the oldest committed steps beyond ``keep_last`` (group rank 0 only). A step
        that cannot be deleted is logged, never raised: the newer save is committed."""
        if self.keep_last is None or len(self._steps) <= self.keep_last:
            return
        old, self._steps = self._steps[: -self.keep_last], self._steps[-self.keep_last :]
        if self._rank == 0:
            for step in old:
                path = self.root / step_name(step)
                try:
                    await self._storage.delete(path, uuid.uuid4().hex)
                except OSError as exc:
                    _log.warning(
                        "retention could not delete %s (%s); the newer checkpoints are "
                        "committed; remove it by hand (`aiostage ls %s` shows what is left)",
                        path, exc, self.root,
                    )  # fmt: skip

    async def _scan(self, *, warn: bool = False) -> list[int]:
        """The committed steps in ``root``; warn about what is not a checkpoint."""
        steps = []
        for name, kind in await self._storage.scan(self.root):
            m = STEP_NAME.match(name)
            if m and kind == "checkpoint":
                steps.append(int(m["step"]))
            elif warn:
                what = "an incomplete checkpoint" if m and kind in ("other", "empty") else kind
                warnings.warn(
                    f"{self.root / name}: ignored by the Checkpointer ({what}, not a committed "
                    "step_NNNNNNNNN checkpoint)",
                    AiostageWarning,
                    stacklevel=3,
                )
        return sorted(steps)

    def steps(self) -> list[int]:
        """The committed steps this Checkpointer knows of: found on entry or saved since, less
        those its retention deleted (no file-system access; ``latest`` rescans)."""
        return list(self._steps)

    async def latest(self) -> int | None:
        """The newest committed step in ``root`` (rescanned: another process may have saved
        one), or ``None``."""
        found = await self._scan()
        return found[-1] if found else None

    async def load(self, step: int | None = None, *, into: Any = None) -> Any:
        """Load checkpoint ``step`` (default: the latest) through ``aiostage.load``.

        Raises ``CheckpointNotFound`` when there is none (or ``step`` was not committed), and
        whatever ``aiostage.load`` raises.
        """
        if step is None:
            step = await self.latest()
            if step is None:
                raise CheckpointNotFound(f"no committed checkpoint in {self.root}", path=self.root)
        return await load(self.root / step_name(step), into=into, pg=self._pg)

    async def recover(self, *, lost: bool, like: Any = None) -> Any:
        """``ReplicationStager.recover`` of the latest replicated save (``replicate=True``)."""
        self._check_open()
        if self._repl is None:
            raise UsageError("recover() needs Checkpointer(..., replicate=True)")
        return await self._repl.recover(lost=lost, like=like)


def _skipped(step: int, path: Path, began: float) -> SaveHandle:
    stall = time.perf_counter() - began
    return settled_handle(CheckpointReport(step, path, True, stall, 0, 0, 0, 0, stall, 0, None))


def _refusal(rows: list[list[int]], root: Path, keep_last: int | None) -> Exception | None:
    """Why no rank saves the step, from each rank's ``[step, newest, overwrite, busy,
    unstorable, failed]`` (a rank raises its own failure or unstorable value itself)."""
    step, newest = rows[0][0], max(row[1] for row in rows)
    if failed := [r for r, row in enumerate(rows) if row[5]]:
        return PersistenceError(
            f"step {step} is not saved: an earlier save failed, and rank(s) {failed} raise its "
            "error at this save; every rank skips the step", path=root,
        )  # fmt: skip
    if bad := [r for r, row in enumerate(rows) if row[4]]:
        return UnsupportedValueError(
            f"rank(s) {bad} hold a value the checkpoint format cannot store (their error names "
            f"the key); no rank saves step {step}"
        )
    if len({row[0] for row in rows}) > 1:
        saves = ", ".join(f"rank {r}: {row[0]}" for r, row in enumerate(rows))
        return UsageError(f"the ranks save different steps ({saves}); save the same on all")
    if step < newest:
        deleted = (
            f" and retention (keep_last={keep_last}) may delete it at once" if keep_last else ""
        )
        return UsageError(
            f"step {step} is older than step {newest}, the newest committed or being saved in "
            f"{root}: latest() would never return it{deleted}; save steps in increasing order "
            "(to go back, delete the newer steps first, or use another root)"
        )
    if step == newest and not all(row[2] for row in rows):
        return UsageError(
            f"{root / step_name(step)} exists (step {step} is committed or being saved); save "
            "a newer step, or pass overwrite=True to replace it"
        )
    return None
