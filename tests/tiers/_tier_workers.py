"""Ranks of the tiered-checkpoint worlds: save steps 1..5 to memory and local disk (every 3rd to
the durable root), lose ranks for real, restore."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio.to_thread
import torch
import torch.distributed as dist

from aiostage import Checkpointer, RestoreReport
from aiostage.errors import ReplicationTimeout
from aiostage.testing import Life

STEPS = 5
TIMEOUT = 20.0


def state(rank: int, step: int) -> dict[str, Any]:
    """Rank ``rank``'s state at ``step``: distinct bytes per rank and step, plus a plain value."""
    w = torch.arange(256, dtype=torch.float32) + 1000 * rank + step
    return {"w": w, "b": torch.full((3, 5), rank * 10 + step, dtype=torch.int64), "step": step}


def fresh() -> dict[str, Any]:
    """What a restarted rank builds before restoring into it."""
    return {"w": torch.zeros(256), "b": torch.zeros(3, 5, dtype=torch.int64), "step": -1}


def checkpointer(base: str, node: str) -> Checkpointer:
    """The tiers of every test: memory and local disk each step, durable every 3rd."""
    return Checkpointer(
        Path(base) / "durable", pg=dist.group.WORLD, replicate=True, keep_last=2,
        local_dir=Path(base) / node, durable_every=3, keep_local=3, timeout=TIMEOUT,
    )  # fmt: skip


async def save_steps(ckpt: Checkpointer, rank: int) -> None:
    """Steps 1..5, each committed to its tiers on this rank, then every rank done."""
    for step in range(1, STEPS + 1):
        await (await ckpt.save(step, state(rank, step))).committed
    await anyio.to_thread.run_sync(dist.barrier)


def summary(report: RestoreReport, into: dict[str, Any], rank: int) -> dict[str, Any]:
    """What the test checks: the report, and whether ``into`` holds the step bit-exactly."""
    want = state(rank, report.step)
    return {
        "step": report.step,
        "state_step": report.state["step"],
        "exact": all(torch.equal(into[k], want[k]) for k in ("w", "b")),
        "same_objects": report.state["w"] is into["w"],
        "sources": [(r.rank, r.source, r.holder, r.bytes) for r in report.ranks],
        "skipped": [(s.rank, s.step, s.source, s.holder, s.reason) for s in report.skipped],
    }


async def lose_ranks(
    rank: int, world: int, life: Life, base: str, victims: list[int], wiped: list[int]
) -> dict[str, Any]:
    """Save 1..5; SIGKILL ``victims``; bring them back (``wiped``: on a node with an empty local
    directory) while the others keep their memory; restore, then save step 6 on the new group."""
    node = f"node{rank}-new" if life.restarted and rank in wiped else f"node{rank}"
    if not life.restarted:
        async with checkpointer(base, node) as ckpt:
            await save_steps(ckpt, rank)
            if rank in victims:
                life.kill()
            await life.rejoin()
            await ckpt.rejoin(dist.group.WORLD)
            return await _restore_and_go_on(ckpt, rank)
    async with checkpointer(base, node) as ckpt:
        return await _restore_and_go_on(ckpt, rank)


async def _restore_and_go_on(ckpt: Checkpointer, rank: int) -> dict[str, Any]:
    into = fresh()
    report = await ckpt.restore(into=into)
    out = summary(report, into, rank)
    handle = await ckpt.save(6, state(rank, 6))  # a durable step, replicated on the new group
    out["saved_6"] = str((await handle.report).path)
    return out


async def save_all(rank: int, world: int, base: str) -> None:
    """The first job: steps 1..5, then every process exits."""
    async with checkpointer(base, f"node{rank}") as ckpt:
        await save_steps(ckpt, rank)


async def restore_all(rank: int, world: int, base: str) -> dict[str, Any]:
    """The restarted job: every process new, every node's local directory kept."""
    async with checkpointer(base, f"node{rank}") as ckpt:
        into = fresh()
        return summary(await ckpt.restore(into=into), into, rank)


async def one_rank_silent(
    rank: int, world: int, base: str, silent: int, seconds: float
) -> dict[str, Any]:
    """Save step 1 to the local tier; every rank but ``silent`` restores while ``silent`` waits
    at a barrier of the default group, which the others reach once their restore is over."""
    async with Checkpointer(
        Path(base) / "durable", pg=dist.group.WORLD, local_dir=Path(base) / f"node{rank}",
        durable_every=2, timeout=seconds,
    ) as ckpt:  # fmt: skip
        await (await ckpt.save(1, state(rank, 1))).committed
        out: dict[str, Any] = {"error": None}
        if rank != silent:
            began = time.perf_counter()
            try:
                await ckpt.restore(into=fresh())
            except ReplicationTimeout as exc:
                out = {"error": type(exc).__name__, "peer": exc.peer, "message": str(exc)}
            out["seconds"] = time.perf_counter() - began
        await anyio.to_thread.run_sync(dist.barrier)
        return out


def large_state(rank: int) -> dict[str, Any]:
    """Tensors of a MiB and more as views of one flat storage (a frame's span), beside a small
    one, a tied one, a non-contiguous one, a bfloat16 one of its own and a plain value."""
    g = torch.Generator().manual_seed(rank)
    flat = torch.randn(1_200_000, generator=g)
    w1 = flat[:300_000].view(600, 500)
    return {
        "w1": w1, "w2": flat[300_000:600_000], "small": flat[600_000:600_100], "tied": w1,
        "t": torch.randn(300_000, generator=g).view(500, 600).t(),
        "bf": torch.randn(800_000, generator=g).to(torch.bfloat16), "step": 100 + rank,
    }  # fmt: skip


def large_into() -> dict[str, Any]:
    """A restarted rank's fresh tensors for ``large_state`` (the tied pair tied again)."""
    like = large_state(0)
    out: dict[str, Any] = {
        k: torch.zeros_like(v) for k, v in like.items() if isinstance(v, torch.Tensor)
    }
    out["tied"], out["step"] = out["w1"], -1
    return out


async def restore_large_from_memory(rank: int, world: int, base: str) -> dict[str, Any]:
    """Save ``large_state`` once; rank 1 comes back with nothing (a new Checkpointer, an empty
    local directory), rank 0 keeps its memory; both restore."""
    ckpt = Checkpointer(
        Path(base) / "durable", pg=dist.group.WORLD, replicate=True, durable_every=10,
        local_dir=Path(base) / f"node{rank}", timeout=TIMEOUT,
    )  # fmt: skip
    await ckpt.__aenter__()
    try:
        await (await ckpt.save(1, large_state(rank))).committed
        if rank == 0:
            await ckpt.rejoin(dist.group.WORLD)
        else:
            await ckpt.aclose()
            ckpt = Checkpointer(
                Path(base) / "durable", pg=dist.group.WORLD, replicate=True, durable_every=10,
                local_dir=Path(base) / "empty", timeout=TIMEOUT,
            )  # fmt: skip
            await ckpt.__aenter__()
        into = large_into()
        report = await ckpt.restore(into=into)
    finally:
        await ckpt.aclose()
    want = large_state(rank)
    return {
        "sources": [(r.rank, r.source, r.holder) for r in report.ranks],
        "exact": [k for k, v in want.items() if isinstance(v, torch.Tensor)
                  and not torch.equal(into[k], v)],
        "step": report.state["step"],
        "ours": all(report.state[k] is into[k] for k in ("w1", "w2", "t", "bf")),
        "tied": into["tied"] is into["w1"],
    }  # fmt: skip
