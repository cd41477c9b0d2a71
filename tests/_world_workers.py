"""Rank functions for ``test_testing_world.py``: top-level, so spawned ranks import them by name.

pytest puts ``tests/`` on ``sys.path`` (rootdir-based "prepend" import of a directory without
``__init__.py``) and spawned ranks receive the parent's ``sys.path``, so ``_world_workers`` is
importable in every rank.
"""

from __future__ import annotations

import os
import signal
import time

import anyio
import torch
import torch.distributed as dist


def identify(rank: int, world_size: int, tag: str) -> tuple[int, int, int, int, str, float]:
    """Return what the rank knows about itself plus an all-reduce over the group."""
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return (rank, world_size, dist.get_rank(), dist.get_world_size(), tag, t.item())


async def identify_async(rank: int, world_size: int) -> tuple[int, str, float]:
    """An ``async def`` rank function: await something, then all-reduce."""
    await anyio.sleep(0.01)
    t = torch.ones(2) * rank
    dist.all_reduce(t)
    return (rank, dist.get_backend(), t.sum().item())


def raise_on_rank_one(rank: int, world_size: int) -> int:
    """Rank 1 raises; the others wait in a barrier that rank 1 never reaches."""
    if rank == 1:
        raise ValueError("boom from rank 1")
    dist.barrier()
    return rank


def raise_on_one_while_zero_sleeps(rank: int, world_size: int) -> int:
    """Rank 1 raises; rank 0 sleeps without touching the group, so only a SIGKILL ends it."""
    if rank == 1:
        raise KeyError("missing from rank 1")
    time.sleep(3600)
    return rank


def hang_on_rank_one(rank: int, world_size: int) -> int:
    """Rank 1 sleeps for an hour; rank 0 returns at once."""
    if rank == 1:
        time.sleep(3600)
    return rank


def sigkill_rank_one(rank: int, world_size: int) -> int:
    """Rank 1 SIGKILLs itself; rank 0 waits in a barrier it never completes."""
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()
    return rank


def exit_quietly(rank: int, world_size: int) -> int:
    """Rank 0 leaves with ``os._exit(3)`` before returning anything."""
    if rank == 0:
        os._exit(3)
    return rank


def unpicklable_result(rank: int, world_size: int) -> object:
    """Return something pickle refuses (a lambda)."""
    return lambda: rank
