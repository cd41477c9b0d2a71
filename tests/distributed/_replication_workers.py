"""Rank functions for ``test_replication.py``: ReplicationStager in real gloo worlds.

Top-level so spawned ranks import them by name. Each asserts inside the rank (a failure surfaces
as a ``WorldError`` with the rank's traceback) and returns a small summary.
"""

from __future__ import annotations

import os
import signal
import struct
import time
from typing import Any

import anyio
import pytest
import torch
import torch.distributed as dist

import aiostage
from aiostage._replication import transport
from aiostage.errors import ReplicationError, ReplicationTimeout
from aiostage.testing import assert_state_dict_equal


def make_state(rank: int) -> dict[str, Any]:
    """A nested state dict that differs per rank: aliases, views, a Parameter, odd dtypes."""
    g = torch.Generator().manual_seed(rank)
    w = torch.randn(8, 6, generator=g)
    model = {
        "w": w,
        "w_tied": w,
        "w_t": w.t(),
        "row": w[2],
        "b": torch.nn.Parameter(torch.randn(6, generator=g)),
        "half": torch.randn(5, generator=g).to(torch.bfloat16),
        "ints": torch.arange(7) * rank,
        "empty": torch.empty(0, 3),
    }
    optim = {
        "state": {0: {"step": torch.tensor(float(rank)), "exp_avg": torch.randn(6, generator=g)}},
        "param_groups": [{"lr": 0.1 * rank, "betas": (0.9, 0.99), "name": f"r{rank}"}],
    }
    return {"model": model, "optim": optim, "epoch": rank, "tag": None}


def check_aliasing(replica: dict[str, Any]) -> None:
    m = replica["model"]
    ptr = m["w"].untyped_storage().data_ptr()
    assert m["w_tied"].data_ptr() == m["w"].data_ptr()
    assert m["w_t"].untyped_storage().data_ptr() == ptr
    assert m["row"].untyped_storage().data_ptr() == ptr


async def roundtrip(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """Three rounds with storage_dir: equality, aliasing, buffer reuse, the persisted replica."""
    sd = make_state(rank)
    async with aiostage.ReplicationStager(storage_dir=tmp, timeout=30) as stager:
        src = stager.receive_from
        ptrs = []
        for _ in range(4):
            replica = await stager.stage(sd)
            assert_state_dict_equal(replica, make_state(src))
            check_aliasing(replica)
            ptrs.append(replica["model"]["w"].untyped_storage().data_ptr())
            stager.release(replica)
        await stager.persisted()
        on_disk = await aiostage.load(stager.storage_path(src))  # type: ignore[arg-type]
        assert_state_dict_equal(on_disk, make_state(src))
        stats = stager.statistics()
    if world == 4:
        await _subgroup(rank)
    return {
        "send_to": stager.send_to,
        "from": src,
        "allocations": stats.receive_allocations,
        "reused": ptrs[2] in ptrs[:2] and ptrs[3] in ptrs[:2],
    }


async def _subgroup(rank: int) -> None:
    """Ranks {1, 3} and {0, 2} replicate within their own subgroup (group ranks 0 and 1)."""
    groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    pg = groups[rank % 2]
    async with aiostage.ReplicationStager(pg, timeout=30) as stager:
        replica = await stager.stage(make_state(rank))
        assert_state_dict_equal(replica, make_state((rank + 2) % 4))


async def no_storage_and_tiny(rank: int, world: int) -> dict[str, Any]:
    """No storage_dir (no ``async with`` needed); then 4,096 tiny tensors, timed."""
    stager = aiostage.ReplicationStager(timeout=30)
    replica = await stager.stage(make_state(rank))
    assert_state_dict_equal(replica, make_state(1 - rank))
    await stager.persisted()
    unverified = aiostage.ReplicationStager(timeout=30, verify=False)
    assert_state_dict_equal(await unverified.stage(make_state(rank)), make_state(1 - rank))
    await unverified.aclose()
    # checked on arrival: rank 1's check fails on rank 0's zero digests (a misconfiguration)
    mixed = aiostage.ReplicationStager(timeout=30, verify=rank == 1, verify_on_arrival=True)
    if rank == 1:
        with pytest.raises(ReplicationError, match="verify=False") as caught:
            await mixed.stage(make_state(rank))
        assert caught.value.phase == "verify"
    else:
        assert_state_dict_equal(await mixed.stage(make_state(rank)), make_state(1 - rank))
    await mixed.aclose()
    tiny = {f"t{i}": torch.full((1,), float(rank * 10_000 + i)) for i in range(4096)}
    stager.release(await stager.stage(tiny))  # warm-up: buffers, threads
    times = []
    for _ in range(3):  # the best of three: the machine is shared
        began = time.perf_counter()
        got = await stager.stage(tiny)
        times.append(time.perf_counter() - began)
        assert got["t4095"].item() == (1 - rank) * 10_000 + 4095
        stager.release(got)
    seconds = min(times)
    await stager.aclose()
    return {"seconds": seconds}


async def dtensors_and_sharded(rank: int, world: int) -> dict[str, Any]:
    """DTensors (Shard, Replicate) and a ShardedTensor arrive holding the partner's shards."""
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import (  # type: ignore[attr-defined]
        ShardedTensor,
        init_from_local_shards,
    )
    from torch.distributed._shard.sharded_tensor.shard import Shard
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
    from torch.distributed.tensor import Shard as DShard

    mesh = init_device_mesh("cpu", (world,))
    full = torch.arange(48.0).reshape(8, 6)
    local = torch.full((4, 4), float(rank))
    meta = ShardMetadata([4 * rank, 0], [4, 4], f"rank:{rank}/cpu")
    sd = {
        "sharded": distribute_tensor(full, mesh, [DShard(0)]),
        "replicated": distribute_tensor(full * 2, mesh, [Replicate()]),
        "st": init_from_local_shards([Shard(local, meta)], [8, 4]),
    }
    async with aiostage.ReplicationStager(timeout=30) as stager:
        replica = await stager.stage(sd)
    peer = 1 - rank
    d = replica["sharded"]
    assert isinstance(d, DTensor)
    assert d.placements == (DShard(0),), d
    assert torch.equal(d.to_local(), full[4 * peer : 4 * peer + 4])
    r = replica["replicated"]
    assert isinstance(r, DTensor)
    assert r.placements == (Replicate(),)
    assert torch.equal(r.to_local(), full * 2)
    st = replica["st"]
    assert isinstance(st, ShardedTensor)
    [shard] = st.local_shards()
    assert torch.equal(shard.tensor, torch.full((4, 4), float(peer)))
    assert shard.metadata.shard_offsets == [4 * peer, 0]
    return {"ok": True}


async def peer_dies(rank: int, world: int) -> float:
    """Rank 1 sends a frame's header, then SIGKILLs itself: rank 0 must fail fast, not hang."""
    if rank == 1:
        _send_header_then_die()
    stager = aiostage.ReplicationStager(timeout=60)
    began = time.perf_counter()
    with pytest.raises(ReplicationError) as caught:
        await stager.stage(make_state(rank))
    assert not isinstance(caught.value, ReplicationTimeout), caught.value
    assert caught.value.peer == 1, caught.value
    seconds = time.perf_counter() - began
    assert seconds < 10, f"the survivor took {seconds:.1f} s to notice"
    return seconds


def _send_header_then_die() -> None:
    from aiostage._format.codec import encode_header
    from aiostage._replication.frames import plan_cpu_frame

    header = plan_cpu_frame(make_state(1)).header
    raw = bytearray(encode_header(header))
    head = [transport.MAGIC, 1, len(raw), header.data_bytes, len(header.entries)]
    for t in (torch.tensor(head), torch.frombuffer(raw, dtype=torch.uint8)):
        dist.send(t, 0, tag=transport.TAG)
    os.kill(os.getpid(), signal.SIGKILL)


async def never_calls(rank: int, world: int) -> dict[str, Any]:
    """Rank 1 never stages: rank 0 gets ReplicationTimeout in time, then a broken stager."""
    if rank == 1:
        await anyio.to_thread.run_sync(dist.barrier)
        return {}
    stager = aiostage.ReplicationStager(timeout=1.5)
    began = time.perf_counter()
    with pytest.raises(TimeoutError) as caught:
        await stager.stage(make_state(rank))
    seconds = time.perf_counter() - began
    assert isinstance(caught.value, ReplicationTimeout)
    assert caught.value.peer == 1, caught.value
    with pytest.raises(ReplicationError) as again:
        await stager.stage(make_state(rank))
    broken = str(again.value)
    await anyio.to_thread.run_sync(dist.barrier)
    return {"seconds": seconds, "broken": broken}


async def malformed(rank: int, world: int) -> list[str]:
    """Rank 1 sends frames that lie; rank 0's receive names rank 1 and phase "header"."""
    frames = [
        [0x1234, 1, 4096, 0, 0],  # not aiostage
        [transport.MAGIC, 1, 1 << 40, 0, 0],  # a 1 TB header: refused before allocating
        [transport.MAGIC, 1, 4096, 16, 1],  # then 4,096 bytes of pickle
    ]
    if rank == 1:
        for head in frames:
            dist.send(torch.tensor(head), 0, tag=transport.TAG)
        pickle = b"\x80\x04\x95cos\nsystem\n(S'echo pwned'\ntR."
        body = struct.pack("<Q", 4088) + pickle.ljust(4088, b" ")
        dist.send(torch.frombuffer(bytearray(body), dtype=torch.uint8), 0, tag=transport.TAG)
        dist.barrier()
        return []
    link = transport.Link(dist.group.WORLD, torch.device("cpu"), 30.0)

    async def no_buffer(n: int) -> torch.Tensor:
        raise AssertionError("allocated for a malformed frame")

    errors = []
    for _ in frames:
        with pytest.raises(ReplicationError) as caught:
            await transport.recv_frame(link, 1, no_buffer, max_data=1 << 30)
        assert caught.value.peer == 1
        assert caught.value.phase == "header", caught.value
        errors.append(str(caught.value))
    await anyio.to_thread.run_sync(dist.barrier)
    return errors


async def recover(rank: int, world: int, tmp: str) -> list[str]:
    """Rank 1 loses its state twice: back from rank 0's memory, then from its persisted file."""
    sd = make_state(rank)
    async with aiostage.ReplicationStager(storage_dir=tmp, timeout=30) as first:
        replica = await first.stage(sd)
        await first.persisted()
        assert_state_dict_equal(replica, make_state(1 - rank))
        restarted = aiostage.ReplicationStager(storage_dir=tmp, timeout=30)
        if rank == 1:  # a fresh process would start here; its stager has nothing in memory
            back = await restarted.recover(lost=True, like=make_state(99))
            assert_state_dict_equal(back, sd)
        else:
            assert await first.recover(lost=False) is None
    sources = ["memory"]
    # now every rank's memory is gone: rank 0 sends rank 1's state from its file
    async with aiostage.ReplicationStager(storage_dir=tmp, timeout=30) as fresh:
        back = await fresh.recover(lost=rank == 1, like=make_state(99) if rank == 1 else None)
        if rank == 1:
            assert_state_dict_equal(back, sd)
            check_aliasing(back)
        sources.append("file")
    return sources


async def recover_dtensors(rank: int, world: int) -> dict[str, Any]:
    """Odd worlds (a ring) and several lost ranks at once: DTensor shards come back wrapped."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    full = torch.arange(float(world * 12)).reshape(world * 3, 4)

    def state(scale: float) -> dict[str, Any]:
        return {
            "w": distribute_tensor(full * scale, mesh, [Shard(0)]),
            "r": distribute_tensor(full[:2] * scale, mesh, [Replicate()]),
            "step": int(scale),
        }

    lost = rank in ({world - 1} if world % 2 else {0, 1})
    mine, like = state(7.0), state(0.0)  # collectives (distribute_tensor): every rank, in order
    async with aiostage.ReplicationStager(timeout=30) as stager:
        stager.release(await stager.stage(mine))
        restarted = aiostage.ReplicationStager(timeout=30)  # a restarted rank has no replica
        back = await (restarted if lost else stager).recover(lost=lost, like=like)
    if not lost:
        assert back is None
        return {"lost": False}
    assert back["step"] == 7
    for key in ("w", "r"):
        assert isinstance(back[key], DTensor), key
        assert back[key].placements == mine[key].placements
        assert torch.equal(back[key].to_local(), mine[key].to_local()), key
    await restarted.aclose()
    return {"lost": True}


async def damaged_replica(rank: int, world: int, tmp: str) -> dict[str, str]:
    """Rank 0's copy of rank 1's state is damaged in memory after it arrived: writing it to
    storage_dir and giving it back both fail the check against rank 1's own digests."""
    sd, seen = make_state(rank), {}
    async with aiostage.ReplicationStager(storage_dir=tmp, timeout=30) as stager:
        stager.release(await stager.stage(sd))
        await stager.persisted()  # an intact replica on disk first
        replica = await stager.stage(sd)
        if rank == 0:  # before the background write has started (no await in between)
            replica["model"]["ints"].add_(1)
            with pytest.raises(ReplicationError) as caught:
                await stager.persisted()
            seen["persist"] = f"{caught.value.phase}: {caught.value}"
            kept = await aiostage.load(stager.storage_path(1))  # the previous replica stands
            assert_state_dict_equal(kept, make_state(1))
            assert await stager.recover(lost=False) is None
        else:
            await stager.persisted()
            restarted = aiostage.ReplicationStager(timeout=30)
            with pytest.raises(ReplicationError) as caught:
                await restarted.recover(lost=True)
            seen["recover"] = f"{caught.value.phase}: {caught.value}"
            await restarted.aclose()
        stager.release(replica)
    return seen


async def chosen_partners(rank: int, world: int) -> dict[str, Any]:
    """World 4: ``partner=`` pairs 0-3 and 1-2 (not the default 0-2, 1-3) and replicates; then a
    choice that does not pair up (rank 3 names rank 1, which names rank 2) is a clear error on
    every rank instead of a timeout."""
    good = {0: 3, 3: 0, 1: 2, 2: 1}[rank]
    async with aiostage.ReplicationStager(timeout=30, partner=good) as stager:
        replica = await stager.stage(make_state(rank))
        assert_state_dict_equal(replica, make_state(good))
        stager.release(replica)
    bad = {0: 2, 2: 0, 1: 2, 3: 1}[rank]
    stager = aiostage.ReplicationStager(timeout=30, partner=bad)
    began = time.perf_counter()
    with pytest.raises(aiostage.errors.UsageError, match="does not pair up") as caught:
        await stager.stage(make_state(rank))
    await stager.aclose()
    return {"error": str(caught.value), "seconds": time.perf_counter() - began}
