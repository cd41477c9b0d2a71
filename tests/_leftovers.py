"""What runs now, and what was left running: the check behind "nothing outlives close".

``Running.now()`` records the asyncio tasks, the threads outside the two worker pools and the
pool threads that are busy; ``left_since(before)`` says what runs now that did not before.
anyio keeps idle worker threads pooled for the next ``to_thread`` call, and the loop's default
executor (where ``aiofiles`` runs file calls) keeps its threads until the loop closes: those
are not leftovers, a pool thread still running something is. Used in-process
(``tests/test_ownership.py``) and inside spawned ranks (``tests/distributed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
from anyio._backends import _asyncio as anyio_asyncio  # the worker pool's own bookkeeping

from aiostage._core.completion import wait_until


def _executor() -> Any:
    """The loop's default executor (a ``ThreadPoolExecutor``), or ``None`` before its first use."""
    return getattr(asyncio.get_running_loop(), "_default_executor", None)


@dataclass(frozen=True)
class Running:
    """What runs now: asyncio tasks, threads outside the two pools, busy pool threads."""

    tasks: frozenset[asyncio.Task[Any]]
    threads: frozenset[threading.Thread]
    busy_workers: frozenset[threading.Thread]  # anyio's: taken out of the idle deque
    busy_executor: int  # the default executor's threads not counted idle by its semaphore

    @staticmethod
    def now() -> Running:
        workers = anyio_asyncio._threadpool_workers.get(set())
        idle = anyio_asyncio._threadpool_idle_workers.get(())
        executor = _executor()
        pooled = set(executor._threads) if executor is not None else set()
        busy = len(pooled) - executor._idle_semaphore._value if executor is not None else 0
        threads = {
            t
            for t in threading.enumerate()
            if t.is_alive() and not isinstance(t, anyio_asyncio.WorkerThread) and t not in pooled
        }
        return Running(
            frozenset(asyncio.all_tasks()),
            frozenset(threads),
            frozenset(set(workers) - set(idle)),
            busy,
        )

    def since(self, before: Running) -> list[str]:
        """What runs now that did not run ``before`` (empty: nothing was left)."""
        left = [f"task {t.get_name()}: {t.get_coro()!r}" for t in self.tasks - before.tasks]
        left += [f"thread {t.name}" for t in self.threads - before.threads]
        left += [f"busy anyio worker {t.name}" for t in self.busy_workers - before.busy_workers]
        if self.busy_executor > before.busy_executor:
            left.append(f"{self.busy_executor - before.busy_executor} busy executor threads")
        return left


async def settled_executor(before: Running) -> None:
    """Give the default executor's threads up to 1 s to count themselves idle: a thread marks
    itself idle only after its result reached the loop, so a caller can resume first."""
    with anyio.move_on_after(1):
        await wait_until(lambda: Running.now().busy_executor <= before.busy_executor)


@contextlib.asynccontextmanager
async def nothing_left() -> AsyncIterator[Running]:
    """Fail if a task or a thread started inside the block still runs when it ends."""
    before = Running.now()
    yield before
    assert await left_since(before) == []


async def left_since(before: Running) -> list[str]:
    """What runs now that did not run ``before``, once the executor's threads settled."""
    await settled_executor(before)
    return Running.now().since(before)
