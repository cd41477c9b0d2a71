"""Worlds whose ranks can die and come back: a rank SIGKILLed (for real) is started again as a
fresh process, and the ranks that survived join it in a new process group.

Each group generation meets under its own prefix of the parent's ``TCPStore``, so a new group
never reads the keys of the one it replaces. A rank's process records the generation it joined
in the store; a rank that died is started again one generation up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import multiprocessing
import os
import pickle
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from multiprocessing.context import SpawnContext
from typing import Any, NoReturn

import anyio.to_thread
import torch.distributed as dist
from torch._C._distributed_c10d import PrefixStore, TCPStore

from ._world import (
    _GRACE,
    _HOST,
    _POLL,
    _attempt,
    _die_with_parent,
    _outcome,
    _pickle_call,
    _Rank,
    _reap,
)
from ._world import _start as _spawn

__all__ = ["Life", "run_restarting_world"]


@dataclass(frozen=True)
class _LifeSetup:
    """What a spawned rank of a restarting world needs."""

    rank: int
    world_size: int
    generation: int
    payload: bytes
    port: int
    backend: str
    timeout: float
    parent: int


class Life:
    """One rank's process in a ``run_restarting_world`` world: which ``generation`` of the
    group it joined (0: the first; a restarted rank starts one above the rank it replaces),
    ``kill()`` to die by SIGKILL, ``await rejoin()`` to join the next generation's group."""

    def __init__(self, setup: _LifeSetup) -> None:
        self.rank, self.world_size = setup.rank, setup.world_size
        self.generation = self.born = setup.generation
        self._setup = setup

    @property
    def restarted(self) -> bool:
        """Whether this process replaces one of this rank that died."""
        return self.born > 0

    def kill(self) -> NoReturn:
        """SIGKILL this process at once (no clean-up runs): the parent starts a fresh one."""
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable: SIGKILL ends the process")  # pragma: no cover

    async def rejoin(self) -> None:
        """Leave the current default group (destroying every group made from it) and join the
        next generation's with the restarted ranks; blocks (in a worker thread) until every
        rank has joined or the world's timeout passes."""
        self.generation += 1
        await anyio.to_thread.run_sync(dist.destroy_process_group)
        await anyio.to_thread.run_sync(_join, self._setup, self.generation)


def run_restarting_world(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    restarts: int = 1,
    timeout: float = 60.0,
    backend: str = "gloo",
) -> list[Any]:
    """``run_world`` whose ranks may die and come back: run ``fn(rank, world_size, life,
    *args)`` (``life``: a ``Life``) on ``world_size`` spawned ranks; a rank killed by SIGKILL
    before returning is started again as a fresh process (at most ``restarts`` times in all),
    whose ``life.restarted`` is true and which joins a new group with the surviving ranks
    (they call ``await life.rejoin()``). Returns what each rank's last process returned.

    Blocks until every rank has returned, at most about ``timeout`` seconds. Raises
    ``WorldError``/``WorldTimeout`` as ``run_world`` does (a rank killed once the restarts
    are spent is a failure), ``TypeError`` for what cannot be pickled and ``ValueError`` for a
    bad ``world_size``, ``restarts`` or ``timeout``. Every child is reaped whatever happened.
    """
    if world_size < 1 or restarts < 0 or not timeout > 0:
        raise ValueError(f"bad world_size={world_size}, restarts={restarts}, timeout={timeout}")
    payload = _pickle_call(fn, args)
    ctx = multiprocessing.get_context("spawn")
    store = TCPStore(_HOST, 0, None, True, timedelta(seconds=timeout), wait_for_workers=False)
    ranks: list[_Rank] = []
    done: list[_Rank] = []
    try:
        first = _LifeSetup(0, world_size, 0, payload, store.port, backend, timeout, os.getpid())
        ranks += [_start(ctx, dataclasses.replace(first, rank=r)) for r in range(world_size)]
        _supervise(ctx, (store, first), ranks, done, restarts, time.monotonic() + timeout)
    finally:
        _reap(ranks)
        _reap(done)
    return _outcome(ranks, timeout)


def _start(ctx: SpawnContext, setup: _LifeSetup) -> _Rank:
    return _spawn(ctx, setup, _life_main, f"rank-{setup.rank}-gen-{setup.generation}")


def _supervise(
    ctx: SpawnContext,
    base: tuple[TCPStore, _LifeSetup],
    ranks: list[_Rank],
    done: list[_Rank],
    restarts: int,
    deadline: float,
) -> None:
    """``_world._supervise``, but a rank SIGKILLed before returning is started again."""
    limit, since = deadline, time.monotonic()
    while not all(r.exited for r in ranks) and time.monotonic() < limit:
        ready = wait([o for r in ranks for o in r.waitables()], timeout=_POLL)
        now = time.monotonic()
        for i, r in enumerate(ranks):
            r.update(ready, since)
            killed = r.failure is not None and r.failure.signal == "SIGKILL" and not r.message
            if r.exited and killed and restarts > 0:
                restarts -= 1
                done.append(r)
                ranks[i] = _start(ctx, _restart_setup(*base, r.rank))
        if any(r.failure for r in ranks):
            limit = min(limit, now + _GRACE)
        since = now


def _restart_setup(store: TCPStore, first: _LifeSetup, rank: int) -> _LifeSetup:
    """A fresh process of ``rank``, one generation above the one it last joined."""
    key = f"aiostage/generation/{rank}"
    generation = int(store.get(key)) + 1 if store.check([key]) else 1
    return dataclasses.replace(first, rank=rank, generation=generation)


# ---------------------------------------------------------------- a rank


def _life_main(setup: _LifeSetup, conn: Connection) -> None:
    """Entry point of a rank's process: join its generation's group, run, report, exit."""
    _die_with_parent(setup.parent)
    try:
        conn.send_bytes(_attempt(setup, _run_life))
    finally:
        conn.close()
        if dist.is_initialized():
            dist.destroy_process_group()
        os._exit(0)


def _run_life(setup: _LifeSetup) -> Any:
    fn, args = pickle.loads(setup.payload)
    _join(setup, setup.generation)
    out = fn(setup.rank, setup.world_size, Life(setup), *args)
    return asyncio.run(out) if inspect.iscoroutine(out) else out


def _join(setup: _LifeSetup, generation: int) -> None:
    """Join generation ``generation``'s group, under its own prefix of the parent's store."""
    span = timedelta(seconds=setup.timeout)
    store = TCPStore(_HOST, setup.port, setup.world_size, False, span)
    world = PrefixStore(f"aiostage/world/{generation}", store)
    dist.init_process_group(
        setup.backend, store=world, rank=setup.rank, world_size=setup.world_size, timeout=span
    )
    dist.barrier()
    store.set(f"aiostage/generation/{setup.rank}", str(generation))
