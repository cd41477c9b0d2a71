"""Rank functions for ``test_staging_distributed.py``: stage DTensors and ShardedTensors per rank.

Top-level so spawned ranks import them by name (pytest puts ``tests/distributed`` on
``sys.path`` and the ranks inherit it). Each function asserts inside the rank, so a failure
surfaces as a ``WorldError`` carrying the rank's traceback, and returns a small summary.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor

import aiostage

Summary = dict[str, tuple[tuple[int, ...], tuple[int, ...]]]


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the storages behind ``a`` and ``b`` overlap by at least one byte."""
    sa, sb = a.untyped_storage(), b.untyped_storage()
    if sa.nbytes() == 0 or sb.nbytes() == 0:
        return False
    return (
        sa.data_ptr() < sb.data_ptr() + sb.nbytes() and sb.data_ptr() < sa.data_ptr() + sa.nbytes()
    )


def _check_dtensor(key: str, staged: Any, original: DTensor, local_before: torch.Tensor) -> None:
    """The staged copy is a DTensor on the same mesh and placements, with its own CPU bytes."""
    assert isinstance(staged, DTensor), f"{key}: staged as {type(staged).__qualname__}"
    assert staged.device_mesh == original.device_mesh, key
    assert staged.placements == original.placements, key
    assert staged.size() == original.size(), key
    assert staged.stride() == original.stride(), key
    assert staged.dtype == original.dtype, key
    local = staged.to_local()
    assert local.device.type == "cpu", key
    assert local.shape == local_before.shape, key
    assert torch.equal(local, local_before), key
    assert not _shares_memory(local, original.to_local()), f"{key}: shares the original's memory"


def _distribute(
    mesh: DeviceMesh, specs: dict[str, tuple[torch.Tensor, list[Placement]]]
) -> dict[str, DTensor]:
    return {k: distribute_tensor(full, mesh, placements) for k, (full, placements) in specs.items()}


async def _stage_and_check(
    sd: dict[str, Any], fulls: dict[str, torch.Tensor]
) -> dict[str, DTensor]:
    """Stage ``sd`` twice around an in-place edit and check both copies; return the first."""
    dtensors = {k: v for k, v in sd.items() if isinstance(v, DTensor)}
    before = {k: v.to_local().clone() for k, v in dtensors.items()}
    plain_before = sd["plain"].clone()
    async with aiostage.DefaultStager() as stager:
        staged = await stager.stage(sd)
        for k, v in dtensors.items():
            _check_dtensor(k, staged[k], v, before[k])
        assert torch.equal(staged["plain"], plain_before)
        assert not _shares_memory(staged["plain"], sd["plain"])
        assert staged["step"] == 7
        with torch.no_grad():
            for v in dtensors.values():
                v.add_(100.0)  # DTensor in-place op: edits every local shard
            sd["plain"].add_(100.0)
        again = await stager.stage(sd)  # a second copy, in a second pooled buffer set
        for k, v in dtensors.items():
            _check_dtensor(k, staged[k], v, before[k])  # the first copy did not move
            assert torch.equal(again[k].to_local(), v.to_local()), k
            assert torch.equal(staged[k].full_tensor(), fulls[k]), k  # a live mesh and spec
        assert torch.equal(staged["plain"], plain_before)
        stager.release(again)
        stager.release(staged)
    return staged


def _summary(staged: dict[str, DTensor]) -> Summary:
    return {k: (tuple(v.to_local().shape), tuple(v.size())) for k, v in staged.items()}


async def stage_dtensors_1d(rank: int, world_size: int) -> Summary:
    """Shard(0) (even, uneven, one empty shard), Shard(1) and Replicate on a 1-D CPU mesh."""
    mesh = init_device_mesh("cpu", (world_size,))
    torch.manual_seed(0)  # the same global tensors on every rank
    w, uneven, b, tiny = torch.randn(8, 4), torch.randn(5, 3), torch.randn(6), torch.randn(1, 4)
    specs: dict[str, tuple[torch.Tensor, list[Placement]]] = {
        "w": (w, [Shard(0)]),
        "w_cols": (w, [Shard(1)]),
        "uneven": (uneven, [Shard(0)]),
        "tiny": (tiny, [Shard(0)]),  # rank 1 holds an empty local shard
        "b": (b, [Replicate()]),
    }
    fulls = {k: full.clone() for k, (full, _) in specs.items()}  # Replicate may keep ``b`` itself
    dts = _distribute(mesh, specs)
    sd: dict[str, Any] = {**dts, "plain": torch.randn(3) + rank, "step": 7}
    staged = await _stage_and_check(sd, fulls)
    return _summary({k: staged[k] for k in dts})


async def stage_aliased_dtensor(rank: int, world_size: int) -> bool:
    """The same DTensor under two keys is staged once: the two copies share one CPU storage."""
    mesh = init_device_mesh("cpu", (world_size,))
    torch.manual_seed(0)
    w = distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)])
    async with aiostage.DefaultStager() as stager:
        staged = await stager.stage({"w": w, "tied": w})
        a, b = staged["w"].to_local(), staged["tied"].to_local()
        assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        assert not _shares_memory(a, w.to_local())
        assert staged["tied"].placements == w.placements
        stager.release(staged)
    return True


async def stage_dtensors_2d(rank: int, world_size: int) -> Summary:
    """Placements over a 2 x 2 mesh, and a DTensor on its ``tp`` sub-mesh."""
    mesh = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    w, v = torch.randn(8, 6), torch.randn(5, 3)
    specs: dict[str, tuple[torch.Tensor, list[Placement]]] = {
        "both": (w, [Shard(0), Shard(1)]),
        "dp_rep": (w, [Replicate(), Shard(0)]),
        "tp_rep": (v, [Shard(0), Replicate()]),
        "same_dim": (w, [Shard(0), Shard(0)]),
    }
    fulls = {k: full.clone() for k, (full, _) in specs.items()} | {"sub": v.clone()}
    dts = _distribute(mesh, specs)
    sub = distribute_tensor(v, mesh["tp"], [Shard(1)])
    sd: dict[str, Any] = {**dts, "sub": sub, "plain": torch.randn(2), "step": 7}
    staged = await _stage_and_check(sd, fulls)
    assert staged["sub"].device_mesh == mesh["tp"]
    return _summary({k: staged[k] for k in [*dts, "sub"]})


async def stage_sharded_tensor(rank: int, world_size: int) -> dict[str, Any]:
    """A ChunkShardingSpec ShardedTensor keeps its one local shard, offsets and sizes."""
    from torch.distributed._shard import sharded_tensor
    from torch.distributed._shard.sharded_tensor.api import ShardedTensor
    from torch.distributed._shard.sharding_spec import ChunkShardingSpec

    spec = ChunkShardingSpec(dim=0, placements=[f"rank:{r}/cpu" for r in range(world_size)])
    st = sharded_tensor.empty(spec, 8, 4)
    (shard,) = st.local_shards()
    shard.tensor.copy_(torch.arange(shard.tensor.numel()).view_as(shard.tensor) + 100.0 * rank)
    before = shard.tensor.clone()
    async with aiostage.DefaultStager() as stager:
        staged = await stager.stage({"st": st, "step": 7})
        out = staged["st"]
        assert isinstance(out, ShardedTensor), type(out)
        (copy,) = out.local_shards()
        assert copy.metadata == shard.metadata
        assert out.metadata() == st.metadata()
        assert out.size() == st.size()
        assert copy.tensor.device.type == "cpu"
        assert torch.equal(copy.tensor, before)
        assert not _shares_memory(copy.tensor, shard.tensor)
        shard.tensor.add_(1000.0)
        assert torch.equal(copy.tensor, before)
        stager.release(staged)
    meta = copy.metadata
    return {"offsets": list(meta.shard_offsets), "sizes": list(meta.shard_sizes)}


async def stage_wrapped_dtensor_and_grad_sharded_tensor(rank: int, world_size: int) -> None:
    """nn.Parameter(DTensor) (FSDP2's parameters) stays a Parameter; a grad-requiring
    ShardedTensor keeps requires_grad on its staged shards."""
    from torch.distributed._shard import sharded_tensor
    from torch.distributed._shard.sharding_spec import ChunkShardingSpec

    mesh = init_device_mesh("cpu", (world_size,))
    param = torch.nn.Parameter(distribute_tensor(torch.randn(4, 2), mesh, [Shard(0)]))
    frozen = torch.nn.Parameter(
        distribute_tensor(torch.randn(4), mesh, [Replicate()]), requires_grad=False
    )
    placements = [f"rank:{r}/cpu" for r in range(world_size)]
    st = sharded_tensor.rand(
        ChunkShardingSpec(dim=0, placements=placements), 4, 2, requires_grad=True
    )  # type: ignore[no-untyped-call]
    async with aiostage.DefaultStager() as stager:
        out = await stager.stage({"p": param, "frozen": frozen, "st": st})
    assert isinstance(out["p"], torch.nn.Parameter)
    assert isinstance(out["p"], DTensor)
    assert out["p"].requires_grad
    assert isinstance(out["frozen"], torch.nn.Parameter)
    assert not out["frozen"].requires_grad
    assert torch.equal(out["p"].to_local(), param.to_local())
    shard = out["st"].local_shards()[0].tensor
    assert shard.requires_grad
    assert torch.equal(shard, st.local_shards()[0].tensor)
