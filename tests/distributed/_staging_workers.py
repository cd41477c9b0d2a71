"""Rank functions for ``test_staging_distributed.py``: stage DTensors and ShardedTensors per rank.

Top-level so spawned ranks import them by name (pytest puts ``tests/distributed`` on
``sys.path`` and the ranks inherit it). Each function returns what it observed as plain data
(numbers, strings, bools, tuples, dicts of them); the test body asserts on it, so a failure
names what differed in the test's own report.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor

import aiostage

#: key -> (local shard shape, global size), or the type name a key was staged as instead
Summary = dict[str, Any]


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the storages behind ``a`` and ``b`` overlap by at least one byte."""
    sa, sb = a.untyped_storage(), b.untyped_storage()
    if sa.nbytes() == 0 or sb.nbytes() == 0:
        return False
    return (
        sa.data_ptr() < sb.data_ptr() + sb.nbytes() and sb.data_ptr() < sa.data_ptr() + sa.nbytes()
    )


def _tensor_diff(got: torch.Tensor, want: torch.Tensor) -> str | None:
    """``None`` when ``torch.equal(got, want)``, else where they first differ."""
    if torch.equal(got, want):
        return None
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    differ = (got.detach().cpu() != want.detach().cpu()).nonzero()
    if len(differ) == 0:
        return f"not torch.equal ({got.dtype} on {got.device} vs {want.dtype} on {want.device})"
    at = tuple(differ[0].tolist())
    return (
        f"{len(differ)} of {got.numel()} elements differ, the first at {at}: "
        f"{got[at].item()!r} != {want[at].item()!r}"
    )


def _observe_dtensor(staged: Any, original: DTensor, local_before: torch.Tensor) -> dict[str, Any]:
    """The staged copy next to ``original``: the body expects a DTensor on the same mesh and
    placements, with the same global size, stride and dtype, and its own CPU local shard equal
    to ``local_before``. Pairs are ``(staged, original)``."""
    if not isinstance(staged, DTensor):
        return {"type": type(staged).__qualname__}
    local = staged.to_local()
    return {
        "type": type(staged).__qualname__,
        "same_mesh": staged.device_mesh == original.device_mesh,
        "mesh": (str(staged.device_mesh), str(original.device_mesh)),
        "placements": (str(staged.placements), str(original.placements)),
        "size": (tuple(staged.size()), tuple(original.size())),
        "stride": (tuple(staged.stride()), tuple(original.stride())),
        "dtype": (str(staged.dtype), str(original.dtype)),
        "local_shape": (tuple(local.shape), tuple(local_before.shape)),
        "local_device": local.device.type,
        "local_vs_before": _tensor_diff(local, local_before),
        "shares_original_memory": _shares_memory(local, original.to_local()),
    }


def _distribute(
    mesh: DeviceMesh, specs: dict[str, tuple[torch.Tensor, list[Placement]]]
) -> dict[str, DTensor]:
    return {k: distribute_tensor(full, mesh, placements) for k, (full, placements) in specs.items()}


async def _stage_twice(
    sd: dict[str, Any], fulls: dict[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Stage ``sd`` twice around an in-place edit; return the first copy and what was seen.

    ``staged``: each DTensor's first copy (``_observe_dtensor``); ``plain``: the plain tensor's
    copy against its value before the edit and whether it shares the original's memory;
    ``step``: the staged int. After the edit and a second stage: ``after_edit`` (the first copy
    again, which must not have moved), ``again`` (the second copy against the edited original),
    ``full`` (the first copy's ``full_tensor()`` against the global tensor: a live mesh and
    spec) and ``plain_after_edit``.
    """
    dtensors = {k: v for k, v in sd.items() if isinstance(v, DTensor)}
    before = {k: v.to_local().clone() for k, v in dtensors.items()}
    plain_before = sd["plain"].clone()
    seen: dict[str, Any] = {}
    async with aiostage.DefaultStager() as stager:
        staged = await stager.stage(sd)
        seen["staged"] = {k: _observe_dtensor(staged[k], v, before[k]) for k, v in dtensors.items()}
        seen["plain"] = {
            "vs_before": _tensor_diff(staged["plain"], plain_before),
            "shares_original_memory": _shares_memory(staged["plain"], sd["plain"]),
        }
        seen["step"] = staged["step"]
        with torch.no_grad():
            for v in dtensors.values():
                v.add_(100.0)  # DTensor in-place op: edits every local shard
            sd["plain"].add_(100.0)
        again = await stager.stage(sd)  # a second copy, in a second pooled buffer set
        seen["after_edit"], seen["again"], seen["full"] = {}, {}, {}
        for k, v in dtensors.items():
            seen["after_edit"][k] = _observe_dtensor(staged[k], v, before[k])
            second, first = again[k], staged[k]
            seen["again"][k] = (
                _tensor_diff(second.to_local(), v.to_local())
                if isinstance(second, DTensor)
                else f"staged as {type(second).__qualname__}"
            )
            seen["full"][k] = (  # full_tensor() is a collective: every rank, every key, in order
                _tensor_diff(first.full_tensor(), fulls[k])
                if isinstance(first, DTensor)
                else f"staged as {type(first).__qualname__}"
            )
        seen["plain_after_edit"] = _tensor_diff(staged["plain"], plain_before)
        stager.release(again)
        stager.release(staged)
    return staged, seen


def _summary(staged: dict[str, Any]) -> Summary:
    return {
        k: (tuple(v.to_local().shape), tuple(v.size()))
        if isinstance(v, DTensor)
        else type(v).__qualname__
        for k, v in staged.items()
    }


async def stage_dtensors_1d(rank: int, world_size: int) -> dict[str, Any]:
    """Shard(0) (even, uneven, one empty shard), Shard(1) and Replicate on a 1-D CPU mesh.

    Returns ``shapes`` (``_summary``) and what ``_stage_twice`` saw."""
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
    staged, seen = await _stage_twice(sd, fulls)
    return {"shapes": _summary({k: staged[k] for k in dts}), **seen}


async def stage_aliased_dtensor(rank: int, world_size: int) -> dict[str, Any]:
    """The same DTensor under two keys is staged once: the two copies share one CPU storage."""
    mesh = init_device_mesh("cpu", (world_size,))
    torch.manual_seed(0)
    w = distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)])
    async with aiostage.DefaultStager() as stager:
        staged = await stager.stage({"w": w, "tied": w})
        a, b = staged["w"].to_local(), staged["tied"].to_local()
        seen = {
            "copies_share_storage": a.untyped_storage().data_ptr()
            == b.untyped_storage().data_ptr(),
            "shares_original_memory": _shares_memory(a, w.to_local()),
            "tied_placements": (str(staged["tied"].placements), str(w.placements)),
            "same_tied_placements": staged["tied"].placements == w.placements,
        }
        stager.release(staged)
    return seen


async def stage_dtensors_2d(rank: int, world_size: int) -> dict[str, Any]:
    """Placements over a 2 x 2 mesh, and a DTensor on its ``tp`` sub-mesh.

    Returns ``shapes``, what ``_stage_twice`` saw, and whether ``sub``'s copy is on the ``tp``
    sub-mesh (``sub_on_tp``, with the two meshes' reprs in ``sub_mesh``)."""
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
    staged, seen = await _stage_twice(sd, fulls)
    sub_mesh, tp_mesh = getattr(staged["sub"], "device_mesh", None), mesh["tp"]
    return {
        "shapes": _summary({k: staged[k] for k in [*dts, "sub"]}),
        **seen,
        "sub_on_tp": sub_mesh == tp_mesh,
        "sub_mesh": (str(sub_mesh), str(tp_mesh)),
    }


async def stage_sharded_tensor(rank: int, world_size: int) -> dict[str, Any]:
    """A ChunkShardingSpec ShardedTensor keeps its one local shard, offsets and sizes.

    Metadata pairs are ``(staged, original)`` reprs next to the ``==`` verdict."""
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
        seen: dict[str, Any] = {
            "type": type(out).__qualname__,
            "is_sharded_tensor": isinstance(out, ShardedTensor),
        }
        (copy,) = out.local_shards()
        seen |= {
            "same_shard_metadata": copy.metadata == shard.metadata,
            "shard_metadata": (repr(copy.metadata), repr(shard.metadata)),
            "same_metadata": out.metadata() == st.metadata(),
            "metadata": (repr(out.metadata()), repr(st.metadata())),
            "size": (tuple(out.size()), tuple(st.size())),
            "device": copy.tensor.device.type,
            "vs_before": _tensor_diff(copy.tensor, before),
            "shares_original_memory": _shares_memory(copy.tensor, shard.tensor),
        }
        shard.tensor.add_(1000.0)
        seen["vs_before_after_edit"] = _tensor_diff(copy.tensor, before)
        stager.release(staged)
    meta = copy.metadata
    return {"offsets": list(meta.shard_offsets), "sizes": list(meta.shard_sizes), **seen}


async def stage_wrapped_dtensor_and_grad_sharded_tensor(
    rank: int, world_size: int
) -> dict[str, Any]:
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
    shard = out["st"].local_shards()[0].tensor
    p = out["p"]
    return {
        "p": {
            "type": type(p).__qualname__,
            "is_parameter": isinstance(p, torch.nn.Parameter),
            "is_dtensor": isinstance(p, DTensor),
            "requires_grad": p.requires_grad,
            "local_vs_original": _tensor_diff(p.to_local(), param.to_local())
            if isinstance(p, DTensor)
            else "not a DTensor",
        },
        "frozen": {
            "type": type(out["frozen"]).__qualname__,
            "is_parameter": isinstance(out["frozen"], torch.nn.Parameter),
            "requires_grad": out["frozen"].requires_grad,
        },
        "st_shard": {
            "requires_grad": shard.requires_grad,
            "vs_original": _tensor_diff(shard, st.local_shards()[0].tensor),
        },
    }
