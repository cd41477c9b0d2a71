"""Processes of the object-store tests: ranks of a gloo world and a save to be SIGKILLed.

Top-level so spawned processes import them by name; the environment (endpoint, credentials)
comes in as an argument, since a spawned rank starts from a copy of the parent's.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import aiostage

#: the full tensor the ranks shard as a DTensor (Shard(0) over a 1-D mesh of 2)
FULL = torch.arange(128.0).reshape(16, 8)
#: bytes of each rank's own plain tensor: its data object is far larger than its DTensor shard
BIG = 16 << 20


def rank_state(rank: int) -> dict[str, Any]:
    """Rank ``rank``'s plain tensors and a value of its own (the DTensor is added in a world)."""
    gen = torch.Generator().manual_seed(rank)
    return {"big": torch.randn(BIG // 4, generator=gen), "rank": rank}


async def save_and_load(rank: int, world: int, url: str, env: dict[str, str]) -> dict[str, Any]:
    """Every rank saves its shard of a DTensor and its own tensors into one prefix, then loads
    its own part back, plainly and into a DTensor."""
    os.environ.update(env)
    mesh = init_device_mesh("cpu", (world,))
    sd = {**rank_state(rank), "d": distribute_tensor(FULL, mesh, [Shard(0)])}
    report = await aiostage.save(sd, url, pg=dist.group.WORLD)
    out = await aiostage.load(url, pg=dist.group.WORLD)
    target = {**rank_state(rank), "d": distribute_tensor(torch.zeros(16, 8), mesh, [Shard(0)])}
    into = await aiostage.load(url, pg=dist.group.WORLD, into=target)
    assert isinstance(into["d"], DTensor)
    return {
        "files": report.files,
        "big": torch.equal(out["big"], rank_state(rank)["big"]),
        "shard": torch.equal(out["d"], FULL[8 * rank : 8 * rank + 8]),
        "into": torch.equal(into["d"].full_tensor(), FULL),  # a collective: every rank
    }


def save_forever(url: str, env: dict[str, str]) -> None:
    """Save a state large enough for a multipart upload; the test SIGKILLs this process."""
    os.environ.update(env)
    state = {f"t{i}": torch.full((4 << 20,), float(i)) for i in range(16)}  # 256 MiB
    asyncio.run(aiostage.save(state, url))
    sys.exit("the save finished before it was killed")
