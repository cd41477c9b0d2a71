"""Rank functions for ``test_export_sharded.py``: sharded checkpoints saved on gloo worlds.

Top-level so spawned ranks import them by name. ``save_fsdp`` shards a small model with FSDP2
(``fully_shard`` on a 1-D CPU mesh of 4: even, uneven and empty shards) and saves it twice;
``save_big`` saves DTensors on a 2-D (replicate x shard) mesh, sharded by rows and by columns,
as HSDP lays them out.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import aiostage


class Model(torch.nn.Module):
    """Hugging Face-style names (``layers.0.weight``); 10, 7 and 5 rows cut 4 ways, and a
    bfloat16 layer (its own FSDP group: a group holds one dtype)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        sizes = [(8, 10), (10, 7), (7, 5)]
        self.layers = torch.nn.ModuleList(torch.nn.Linear(i, o) for i, o in sizes)
        self.head = torch.nn.Linear(5, 3, dtype=torch.bfloat16)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        out: torch.Tensor = self.head(x.to(torch.bfloat16))
        return out.float()


def full(obj: Any) -> Any:
    """A copy of a state with every DTensor gathered whole (a collective per DTensor), its
    containers of the same types."""
    if isinstance(obj, DTensor):
        return obj.full_tensor().detach().clone()
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return type(obj)((k, full(v)) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return type(obj)(full(v) for v in obj)
    return obj


async def save_fsdp(rank: int, world: int, root: str) -> dict[str, Any]:
    """FSDP2 over all ranks: save the model as sharded (``init``), train a step, save model and
    AdamW state (``trained``); then a checkpoint in which rank 1 saved a key no other rank has,
    as a pipeline stage does (``ragged``). Rank 0 returns the trained state, every tensor whole."""
    model = Model()
    mesh = init_device_mesh("cpu", (world,))
    for layer in [*model.layers, model.head]:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    await aiostage.save({"model": model.state_dict()}, Path(root) / "init", pg=dist.group.WORLD)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(rank)
    model(torch.randn(4, 8, generator=gen)).square().mean().backward()
    opt.step()
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    await aiostage.save(state, Path(root) / "trained", pg=dist.group.WORLD)
    whole = full(state)
    stage1 = {"stage1": {"w": torch.zeros(3)}} if rank == 1 else {}
    ragged = {"model": {"w": torch.ones(2)}, **stage1}
    await aiostage.save(ragged, Path(root) / "ragged", pg=dist.group.WORLD)
    return whole if rank == 0 else {}


def big_tensors(count: int, rows: int, cols: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The whole tensors ``save_big`` shards, one at a time (the same on every rank, and in
    the test)."""
    gen = torch.Generator().manual_seed(7)
    for i in range(count):
        yield f"layers.{i}.weight", torch.randn(rows, cols, generator=gen)


async def save_big(rank: int, world: int, path: str, count: int, rows: int, cols: int) -> None:
    """``big_tensors`` as DTensors on a (2, world/2) mesh: replicated across the first
    dimension, sharded by rows (even layers) or columns (odd layers) across the second."""
    mesh = init_device_mesh("cpu", (2, world // 2))
    sd = {}
    for i, (key, t) in enumerate(big_tensors(count, rows, cols)):
        sd[key] = distribute_tensor(t, mesh, [Replicate(), Shard(i % 2)])
    await aiostage.save({"model": sd}, path, pg=dist.group.WORLD)
