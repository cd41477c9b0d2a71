"""Rank functions for ``test_gpu_review.py``'s spawned worlds (top-level: ranks import them)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import torch
import torch.distributed as dist

import aiostage
from aiostage.testing import LoopLag

MiB = 1 << 20


async def one_device_stays_on_cuda1(rank: int, world: int, path: str) -> dict[str, Any]:
    """(f) On GPU 1 only: stage, save and load(map_location="cuda") stay there; GPU 0 gets no
    context."""
    torch.cuda.set_device(1)
    x = torch.randn(4 * MiB, device="cuda")
    async with aiostage.DefaultStager() as stager:
        staged = await stager.stage({"x": x})
        same = torch.equal(staged["x"], x.cpu())
    await aiostage.save({"x": x}, Path(path) / "ckpt")
    out = await aiostage.load(Path(path) / "ckpt", map_location="cuda")
    return {
        "staged_right": same,
        "loaded_on": str(out["x"].device),
        "loaded_right": bool(torch.equal(out["x"], x)),
        "gpu0_context": bool(torch._C._cuda_hasPrimaryContext(0)),  # type: ignore[attr-defined]
    }


async def nccl_replication(rank: int, world: int, path: str) -> dict[str, Any]:
    """(g) Two ranks on two GPUs over NCCL: 96 MiB frames, ``partner=``, ``recover()``, and the
    user's own send/recv on the same group meanwhile; device memory and loop lag bounded."""
    torch.cuda.set_device(rank)
    peer = 1 - rank
    state: dict[str, Any] = {"w": torch.full((24 * MiB,), float(rank + 1), device="cuda")}
    state["step"] = rank
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out: dict[str, Any] = {}
    async with aiostage.ReplicationStager(partner=peer, timeout=120) as stager:
        mine = torch.full((1000,), float(rank), device="cuda")
        theirs = torch.empty(1000, device="cuda")

        async def user_traffic() -> None:  # pipeline parallelism's own p2p on the same group
            def run() -> None:
                torch.cuda.set_device(rank)
                ops = [dist.P2POp(dist.isend, mine, peer), dist.P2POp(dist.irecv, theirs, peer)]
                for w in dist.batch_isend_irecv(ops):
                    w.wait()
                torch.cuda.synchronize()

            await anyio.to_thread.run_sync(run)

        async with LoopLag() as lag, anyio.create_task_group() as tg:
            tg.start_soon(user_traffic)
            replica = await stager.stage(state)
        out["lag_ms"] = lag.max_ms
        out["user_traffic_right"] = bool((theirs == float(peer)).all())
        out["replica_right"] = bool(torch.all(replica["w"] == float(peer + 1)))
        out["replica_step"] = replica["step"]
        stager.release(replica)
        out["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / MiB
        back = await stager.recover(lost=rank == 0, like=state if rank == 0 else None)
        out["recovered_right"] = (
            None if back is None else bool(torch.all(back["w"] == float(rank + 1)))
        )
    return out


async def dtensor_one_gpu_mesh(rank: int, world: int) -> dict[str, Any]:
    """(h) A DTensor on a one-GPU mesh is staged as its local shard, on the CPU."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    torch.cuda.set_device(0)
    mesh = init_device_mesh("cuda", (1,))
    full = torch.arange(64.0, device="cuda").reshape(8, 8)
    d = distribute_tensor(full, mesh, [Replicate()])
    async with aiostage.DefaultStager() as stager:
        out = await stager.stage({"d": d})
    local = out["d"].to_local() if hasattr(out["d"], "to_local") else out["d"]
    began = time.perf_counter()
    return {"right": bool(torch.equal(local.cpu(), full.cpu())), "t": began}
