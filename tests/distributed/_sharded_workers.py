"""Rank functions for ``test_sharded.py``: FSDP2 models on gloo, saved and loaded in other layouts.

Top-level so spawned ranks import them by name. The model has layers of 10, 7 and 5 output
features: even and uneven shards on a shard dimension of 2, uneven and empty ones on 4. Each
returns what its rank observed (a state comparison as ``None`` when equal, else its first
difference); the test asserts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from _seen import differs
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import aiostage

STEPS = 2


def model_and_optimizer(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The unsharded model (the same on every rank for one ``seed``) and its AdamW."""
    gen = torch.Generator().manual_seed(seed)
    layers = [torch.nn.Linear(8, 10), torch.nn.ReLU(), torch.nn.Linear(10, 7), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(7, 5))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model, torch.optim.AdamW(model.parameters(), lr=0.01)


def sharded(mesh: DeviceMesh, seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model under FSDP2 on ``mesh`` (1-D: FSDP, 2-D replicate x shard: HSDP)."""
    model, _ = model_and_optimizer(seed)
    for layer in model.children():
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=0.01)


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int, rank: int) -> float:
    """One step on this rank's batch for ``step``; the (local) loss."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    loss = model(torch.randn(4, 8, generator=gen)).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return float(loss.detach())


def full(obj: Any) -> Any:
    """A copy of a state with every DTensor gathered whole (a collective per DTensor)."""
    if isinstance(obj, DTensor):
        return obj.full_tensor().detach().clone()
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: full(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(full(v) for v in obj)
    return obj


def hsdp_mesh() -> DeviceMesh:
    """The HSDP layout of 4 ranks: 2 replicas of a model sharded over 2 ranks."""
    return init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))


async def save_train_resume(rank: int, world: int, root: str) -> dict[str, Any]:
    """HSDP: train, save, train on, load back, train again: the state and losses come back.

    Returns, per rank: whether training after the save moved the weights, how the state loaded
    back differs from the saved one (``None``: it does not), the losses after the save and
    after the load; rank 0 adds the saved state with every tensor whole and the path.
    """
    model, opt = sharded(hsdp_mesh())
    for step in range(STEPS):
        train(model, opt, step, rank)
    state = await aiostage.train_state(model, opt).state_dict()
    saved = full(state)
    path = Path(root) / "hsdp"
    await aiostage.save(state, path, pg=dist.group.WORLD)
    after = [train(model, opt, STEPS + s, rank) for s in range(STEPS)]
    moved = full(await aiostage.train_state(model, opt).state_dict())["model"]["0.weight"]
    await aiostage.load(path, into=aiostage.train_state(model, opt), pg=dist.group.WORLD)
    resumed = differs(full(await aiostage.train_state(model, opt).state_dict()), saved)
    again = [train(model, opt, STEPS + s, rank) for s in range(STEPS)]
    seen = {
        "moved": not torch.equal(moved, saved["model"]["0.weight"]),
        "resumed": resumed,
        "losses": after,
        "again": again,
    }
    return {**seen, "saved": saved, "path": str(path)} if rank == 0 else seen


async def load_into(rank: int, world: int, path: str, layout: str, clean: str) -> dict[str, Any]:
    """A fresh model (other weights) in ``layout`` loads the checkpoint at ``path`` (which applies
    it); then DTensors sharded by columns load the (intact) checkpoint at ``clean``.

    Rank 0 returns both states with every tensor whole and each rank's shard of the 7-feature
    weight's shape.
    """
    mesh = hsdp_mesh() if layout == "hsdp" else init_device_mesh("cpu", (world,))
    model, opt = sharded(mesh, seed=1)
    await aiostage.load(path, into=aiostage.train_state(model, opt), pg=dist.group.WORLD)
    state = full(await aiostage.train_state(model, opt).state_dict())
    columns = await _load_by_columns(clean, state, init_device_mesh("cpu", (world,)))
    weight: Any = model.get_submodule("2").weight
    local = tuple(weight.to_local().shape)
    shapes = [None] * world
    dist.all_gather_object(shapes, local)
    return {"state": state, "columns": columns, "shapes": shapes} if rank == 0 else {}


def _like(obj: Any, mesh: DeviceMesh) -> Any:
    """Zeros shaped like ``obj``: matrices sharded by columns, vectors replicated."""
    if isinstance(obj, torch.Tensor):
        if obj.dim() == 0:
            return torch.zeros_like(obj)
        placement = Shard(1) if obj.dim() == 2 else Replicate()
        return distribute_tensor(torch.zeros_like(obj), mesh, [placement])
    if isinstance(obj, dict):
        return {k: _like(v, mesh) for k, v in obj.items()}
    return obj


async def _load_by_columns(path: str, whole: Any, mesh: DeviceMesh) -> Any:
    """Load the checkpoint into DTensors sharded by columns (``Shard(1)``); gather them whole."""
    into = _like(whole, mesh)
    await aiostage.load(path, into=into, pg=dist.group.WORLD)
    return full(into)
