"""The Checkpointer's saves in flight: a slot per save (``max_in_flight``), the staging of a
zero-stall save behind its caller, the one task that persists the staged saves in order, and
the failures that no handle has delivered yet."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .._async_save import CheckpointReport, Job, Settler, stage_job

__all__ = ["Background"]

#: persist a staged job to its tiers: its report, and whether it reached the durable root
Persist = Callable[[Job], Awaitable[tuple[CheckpointReport, bool]]]


class Background:
    """At most ``max_in_flight`` saves staged or persisting; ``persist`` runs for each in
    order, ``committed`` after each that reached the root, ``ended`` once each is over."""

    def __init__(
        self,
        max_in_flight: int,
        persist: Persist,
        committed: Callable[[int | None], Awaitable[None]],
        ended: Callable[[Job], None],
    ) -> None:
        self.max_in_flight = max_in_flight
        self._persist, self._committed, self._ended = persist, committed, ended
        self._slots = anyio.Semaphore(max_in_flight)
        self._send: MemoryObjectSendStream[Job] | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._failed: list[Settler] = []

    async def start(self) -> None:
        """Start the task that persists the staged saves (it lives until ``close``)."""
        send, receive = anyio.create_memory_object_stream[Job](self.max_in_flight)
        self._send, self._tg = send, anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._worker, receive)

    async def close(self) -> None:
        """Wait for the saves in flight and stop the task."""
        if self._send is not None:
            await self._send.aclose()
        if self._tg is not None:
            await self._tg.__aexit__(None, None, None)

    def busy(self) -> bool:
        """Whether every slot is taken (a save now would wait)."""
        return self._slots.value == 0

    async def wait_idle(self) -> None:
        """Take every slot: no save is in flight until ``resume``."""
        for _ in range(self.max_in_flight):
            await self._slots.acquire()

    def resume(self) -> None:
        """Give back the slots ``wait_idle`` took."""
        for _ in range(self.max_in_flight):
            self._slots.release()

    async def queue(self, job: Job, state_dict: Any, overlap: bool) -> None:
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

    async def _worker(self, receive: MemoryObjectReceiveStream[Job]) -> None:
        """Persist the staged jobs one by one, in order (the background task)."""
        async with receive:
            async for job in receive:
                try:
                    report, durable = await self._persist(job)
                except Exception as exc:
                    self._failed_job(job, exc)
                else:
                    if durable:
                        await self._committed(job.handle.step)
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
        self._ended(job)
        job.settler.abandon()

    def unseen_failure(self) -> BaseException | None:
        """Take the first background failure that no ``await handle.committed`` delivered."""
        failed, self._failed = self._failed, []
        for settler in failed:
            error = settler.committed.unseen_error()
            if error is not None:
                return error
        return None
