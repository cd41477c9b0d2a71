"""Rank functions for ``test_checkpointer_distributed.py``: Checkpointer in real gloo worlds.

Top-level so spawned ranks import them by name. Each returns what its rank observed, as plain
data (a state comparison as ``None`` when equal, else its first difference); the test asserts.
"""

from __future__ import annotations

from typing import Any

import anyio
import torch
import torch.distributed as dist
from _seen import differs, raised

import aiostage
from aiostage.errors import (
    CheckpointWriteError,
    PersistenceError,
    UnsupportedValueError,
    UsageError,
)
from aiostage.testing import FaultyWrites


def rank_state(rank: int, step: int) -> dict[str, Any]:
    """A per-rank, per-step state dict with an alias and a non-tensor leaf."""
    w = torch.full((64, 32), float(rank * 1000 + step))
    return {"model": {"w": w, "w_tied": w, "b": torch.arange(5) + rank}, "step": step}


async def replicated_saves(rank: int, world: int, root: str) -> dict[str, Any]:
    """Saves with pg and replication; a user collective on the default group runs between
    saves (the Checkpointer's collectives use private groups); then load and recover."""
    totals = []
    async with aiostage.Checkpointer(
        root, pg=dist.group.WORLD, replicate=True, keep_last=2, timeout=60
    ) as ckpt:
        for step in (1, 2, 3):
            handle = await ckpt.save(step, rank_state(rank, step))
            total = torch.ones(1)
            dist.all_reduce(total)  # the training loop's own collective, while saving
            totals.append(total.item())
            await handle.committed
        kept = ckpt.steps()
        loaded = differs(await ckpt.load(), rank_state(rank, 3))
        back = await ckpt.recover(lost=rank == 1, like=rank_state(rank, 0))
    return {
        "totals": totals,
        "kept": kept,
        "loaded": loaded,
        # rank 1 lost its state: how what came back differs from it; rank 0: what it got
        "recovered": differs(back, rank_state(rank, 3)) if rank == 1 else type(back).__name__,
        "steps": ckpt.steps(),
    }


async def skip_is_agreed(rank: int, world: int, root: str) -> dict[str, Any]:
    """Ranks that differ in how busy they are still skip (or save) the same steps."""
    skipped = []
    async with aiostage.Checkpointer(root, pg=dist.group.WORLD, on_busy="skip") as ckpt:
        for step in range(4):
            handle = await ckpt.save(step, rank_state(rank, step))
            skipped.append(handle.skipped)
            if rank == 1:  # rank 1 always waits for its save; rank 0 never does
                await handle.wait()
    return {"skipped": skipped, "steps": ckpt.steps()}


async def async_save_with_replication(rank: int, world: int, root: str) -> dict[str, Any]:
    """``async_save`` with a group of its own and a ReplicationStager: a shared checkpoint, and
    each rank holds its partner's state."""
    group = dist.new_group(backend="gloo")  # not the group the caller uses meanwhile
    async with (
        aiostage.ReplicationStager(dist.new_group(backend="gloo"), timeout=30) as repl,
        anyio.create_task_group() as tg,
    ):
        sd = rank_state(rank, 7)
        handle = await aiostage.async_save(
            sd, f"{root}/one", task_group=tg, pg=group, replication=repl
        )
        sd["model"]["w"].zero_()  # staged already: the checkpoint keeps the old values
        report = await handle.report
        back = await repl.recover(lost=rank == 0, like=rank_state(rank, 0))
    loaded = await aiostage.load(f"{root}/one", pg=group)
    seen: dict[str, Any] = {"replicated": report.replicate_seconds > 0}
    seen["loaded"] = differs(loaded, rank_state(rank, 7))
    if rank == 0:  # it lost its state: how what came back differs from it
        seen["recovered"] = differs(back, rank_state(rank, 7))
    return seen


async def saves_are_agreed(rank: int, world: int, root: str) -> dict[str, Any]:
    """Every way a save can be refused, with ranks that differ: all ranks raise at the same
    save (no rank is left waiting in a collective), and the next save works on all."""
    seen: dict[str, Any] = {}
    async with aiostage.Checkpointer(root, pg=dist.group.WORLD, timeout=30) as ckpt:
        await (await ckpt.save(1, rank_state(rank, 1))).committed
        seen["again"] = await raised(ckpt.save(1, rank_state(rank, 1)), UsageError)
        seen["older"] = await raised(ckpt.save(0, rank_state(rank, 0)), UsageError)
        seen["split"] = await raised(ckpt.save(2 + rank, rank_state(rank, 2)), UsageError)
        odd = {**rank_state(rank, 2), "opaque": object()} if rank == 1 else rank_state(rank, 2)
        seen["opaque"] = await raised(ckpt.save(2, odd), UnsupportedValueError)
        with FaultyWrites() as faults:
            if rank == 0:
                faults.fail(1, match="*.safetensors")  # step 2 fails (on every rank)
            failed = await ckpt.save(2, rank_state(rank, 2))
            await failed.wait()
        if rank == 0:  # rank 0 receives its failure; rank 1's is raised by its next save
            seen["received"] = await raised(failed.committed, CheckpointWriteError)
        seen["after"] = await raised(ckpt.save(2, rank_state(rank, 2)), PersistenceError)
        await (await ckpt.save(2, rank_state(rank, 2))).committed
        await (await ckpt.save(2, rank_state(rank, 20), overwrite=True)).committed
        seen["steps"] = ckpt.steps()
        seen["loaded"] = differs(await ckpt.load(2), rank_state(rank, 20))
    return seen
