"""Rank functions for ``test_persist_distributed.py``: save and load from every rank of a world.

Top-level so spawned ranks import them by name. Each returns what its rank observed, as plain
data (a tensor comparison as ``None`` when equal, else its first difference); the test asserts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import anyio
import torch
import torch.distributed as dist
from _seen import differs
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import aiostage
from aiostage.errors import CheckpointWriteError, UnsupportedValueError


def _sd(rank: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(rank)
    w = torch.randn(64, 32, generator=gen)
    return {"w": w, "tied": w, "b": torch.randn(32, generator=gen), "rank": rank}


async def save_and_load(rank: int, world: int, root: str) -> dict[str, Any]:
    """Every rank saves its own state dict into one checkpoint, then reads its part back."""
    path = Path(root) / "ckpt"
    report = await aiostage.save(_sd(rank), path, pg=dist.group.WORLD, metadata={"step": 5})
    out = await aiostage.load(path, pg=dist.group.WORLD)
    storage = out["w"].untyped_storage().data_ptr()
    loaded = {
        "w": differs(out["w"], _sd(rank)["w"]),
        "tied_shares_w": out["tied"].untyped_storage().data_ptr() == storage,
        "rank": out["rank"],
    }
    dist.barrier()
    manifest = json.loads((path / "manifest.json").read_text())
    return {
        "loaded": loaded,
        "files": report.files,
        "world": (report.rank, report.world_size),
        "manifest": (manifest["world_size"], [f["name"] for f in manifest["files"]]),
        "listing": sorted(os.listdir(root)),
    }


async def one_rank_cannot_save(rank: int, world: int, root: str) -> tuple[str, str]:
    """Rank 1 holds a value the format cannot store: no rank may report success.

    The error's type name and message, or ``("saved", ...)`` when the save succeeded."""
    sd = _sd(rank)
    if rank == 1:
        sd["bad"] = {1, 2}
    try:
        await aiostage.save(sd, Path(root) / "ckpt", pg=dist.group.WORLD, timeout=60)
    except (CheckpointWriteError, UnsupportedValueError) as exc:
        return type(exc).__name__, str(exc)
    return "saved", "save reported success although rank 1 failed"


async def save_twice(rank: int, world: int, root: str) -> tuple[str, str | None]:
    """A second save to the same path fails on every rank unless it overwrites: what the second
    save raised (``"saved"`` if nothing), and how the overwritten checkpoint differs from the
    state saved last (``None``: it does not)."""
    path = Path(root) / "ckpt"
    await aiostage.save(_sd(rank), path, pg=dist.group.WORLD)
    try:
        await aiostage.save(_sd(rank + 10), path, pg=dist.group.WORLD)
    except FileExistsError as exc:
        outcome = type(exc).__name__
    else:
        outcome = "saved"
    await aiostage.save(_sd(rank + 10), path, pg=dist.group.WORLD, overwrite=True)
    out = await aiostage.load(path, pg=dist.group.WORLD)
    return outcome, differs(out["w"], _sd(rank + 10)["w"])


async def dtensors(rank: int, world: int, root: str) -> dict[str, Any]:
    """A sharded DTensor saves its local shard; it loads as that shard, or into a DTensor."""
    mesh = init_device_mesh("cpu", (world,))
    full = torch.arange(48.0).reshape(8, 6)
    sd = {"w": distribute_tensor(full, mesh, [Shard(0)])}
    path = Path(root) / "ckpt"
    await aiostage.save(sd, path, pg=dist.group.WORLD)
    plain = await aiostage.load(path, pg=dist.group.WORLD)
    target = {"w": distribute_tensor(torch.zeros(8, 6), mesh, [Shard(0)])}
    out = await aiostage.load(path, pg=dist.group.WORLD, into=target)
    local = plain["w"]
    return {
        "shape": tuple(local.shape),
        "shard": differs(local, full[4 * rank : 4 * rank + 4]),
        "into_type": type(out["w"]).__name__,
        "into_is_dtensor": isinstance(out["w"], DTensor),
        "into": differs(target["w"].full_tensor(), full),  # a collective: every rank
    }


async def slow_peer(rank: int, world: int, root: str) -> tuple[str, list[str]]:
    """Rank 1 comes late: rank 0 gives up after ``timeout``; nothing is committed.

    The save's error message (or a sentence saying it succeeded) and the listing of ``root``."""
    if rank == 1:
        await anyio.sleep(3.0)  # a peer that is slow to arrive (not a synchronisation)
    try:
        await aiostage.save(_sd(rank), Path(root) / "ckpt", pg=dist.group.WORLD, timeout=1.5)
    except CheckpointWriteError as exc:
        error = str(exc)
    else:
        error = "save reported success although a peer timed out"
    return error, sorted(n for n in os.listdir(root) if not n.startswith("."))
