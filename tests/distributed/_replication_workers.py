"""Rank functions for ``test_replication.py``: ReplicationStager in real gloo worlds.

Top-level so spawned ranks import them by name. Each function returns what it observed as plain
data (numbers, strings, lists and dicts of them, small CPU tensors): ``None`` where a state dict
matched, else ``assert_state_dict_equal``'s message; ``_raised``'s description of an error that
had to be raised. The test body asserts on it, so a failure names what differed in the test's
own report. An exception other than the one expected still fails the rank with its traceback.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import time
from typing import Any

import anyio
import torch
import torch.distributed as dist
from _seen import differs, raised

import aiostage
from aiostage._core import dist as dist_helpers
from aiostage._replication import transport
from aiostage._replication.wire import MAGIC, limits_of
from aiostage.errors import ReplicationError


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


def aliases_lost(replica: dict[str, Any]) -> list[str]:
    """The keys of ``replica["model"]`` that no longer alias ``w`` as in ``make_state``."""
    m = replica["model"]
    ptr = m["w"].untyped_storage().data_ptr()
    sharing = {
        "w_tied": m["w_tied"].data_ptr() == m["w"].data_ptr(),
        "w_t": m["w_t"].untyped_storage().data_ptr() == ptr,
        "row": m["row"].untyped_storage().data_ptr() == ptr,
    }
    return [key for key, shares in sharing.items() if not shares]


def _dtensor_seen(got: Any, want: Any = None) -> dict[str, Any]:
    """A replicated DTensor as plain data: its type, placements and a copy of its local shard;
    with ``want`` (the original), the original's placements and local shard next to them."""
    from torch.distributed.tensor import DTensor

    seen: dict[str, Any] = {"type": type(got).__qualname__, "is_dtensor": isinstance(got, DTensor)}
    if isinstance(got, DTensor):
        seen |= {"placements": str(got.placements), "local": got.to_local().clone()}
    if want is not None:
        seen |= {"want_placements": str(want.placements), "want_local": want.to_local().clone()}
    return seen


async def roundtrip(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """Four rounds with storage_dir: equality, aliasing, buffer reuse, the persisted replica.

    ``rounds``: per round, the replica against the partner's state (``vs_partner``) and the
    aliases it lost; ``on_disk``: the persisted replica; ``subgroup`` (world 4 only)."""
    sd = make_state(rank)
    rounds = []
    async with aiostage.ReplicationStager(storage_dir=tmp, timeout=30) as stager:
        src = stager.receive_from
        ptrs = []
        for _ in range(4):
            replica = await stager.stage(sd)
            rounds.append(
                {
                    "vs_partner": differs(replica, make_state(src)),
                    "aliases_lost": aliases_lost(replica),
                }
            )
            ptrs.append(replica["model"]["w"].untyped_storage().data_ptr())
            stager.release(replica)
        await stager.persisted()
        on_disk = await aiostage.load(stager.storage_path(src))  # type: ignore[arg-type]
        on_disk_vs_partner = differs(on_disk, make_state(src))
        stats = stager.statistics()
    seen: dict[str, Any] = {
        "send_to": stager.send_to,
        "from": src,
        "allocations": stats.receive_allocations,
        "reused": ptrs[2] in ptrs[:2] and ptrs[3] in ptrs[:2],
        "rounds": rounds,
        "on_disk": on_disk_vs_partner,
    }
    if world == 4:
        seen["subgroup"] = await _subgroup(rank)
    return seen


async def _subgroup(rank: int) -> str | None:
    """Ranks {1, 3} and {0, 2} replicate within their own subgroup (group ranks 0 and 1): the
    replica against the subgroup partner's state."""
    groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    pg = groups[rank % 2]
    async with aiostage.ReplicationStager(pg, timeout=30) as stager:
        replica = await stager.stage(make_state(rank))
        return differs(replica, make_state((rank + 2) % 4))


async def no_storage_and_tiny(rank: int, world: int) -> dict[str, Any]:
    """No storage_dir (no ``async with`` needed); then 4,096 tiny tensors, timed.

    ``replica``, ``unverified`` and (rank 0) ``mixed``: replicas against the partner's state;
    ``mixed_error`` (rank 1): the error of a check on arrival without digests; ``t4095``: the
    last tiny tensor's value in each round; ``sends``: the messages sent in each round."""
    stager = aiostage.ReplicationStager(timeout=30)
    replica = await stager.stage(make_state(rank))
    seen: dict[str, Any] = {"replica": differs(replica, make_state(1 - rank))}
    await stager.persisted()
    unverified = aiostage.ReplicationStager(timeout=30, verify=False)
    seen["unverified"] = differs(await unverified.stage(make_state(rank)), make_state(1 - rank))
    await unverified.aclose()
    # checked on arrival: rank 1's check fails on rank 0's zero digests (a misconfiguration)
    mixed = aiostage.ReplicationStager(timeout=30, verify=rank == 1, verify_on_arrival=True)
    if rank == 1:
        seen["mixed_error"] = await raised(mixed.stage(make_state(rank)), ReplicationError)
    else:
        seen["mixed"] = differs(await mixed.stage(make_state(rank)), make_state(1 - rank))
    await mixed.aclose()
    tiny = {f"t{i}": torch.full((1,), float(rank * 10_000 + i)) for i in range(4096)}
    stager.release(await stager.stage(tiny))  # warm-up: buffers, threads
    last, sends = [], []
    post_send = dist_helpers.post_send
    for _ in range(3):
        posted: list[int] = []

        def counted(t: torch.Tensor, *args: Any, posted: list[int] = posted) -> Any:
            posted.append(t.numel() * t.element_size())
            return post_send(t, *args)

        dist_helpers.post_send = counted  # the real send, counted
        try:
            got = await stager.stage(tiny)
        finally:
            dist_helpers.post_send = post_send
        last.append(got["t4095"].item())
        sends.append(len(posted))
        stager.release(got)
    seen |= {"t4095": last, "sends": sends}
    await stager.aclose()
    return seen


async def dtensors_and_sharded(rank: int, world: int) -> dict[str, Any]:
    """DTensors (Shard, Replicate) and a ShardedTensor arrive holding the partner's shards:
    their types, placements, local shards and (ShardedTensor) shard offsets."""
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import (  # type: ignore[attr-defined]
        ShardedTensor,
        init_from_local_shards,
    )
    from torch.distributed._shard.sharded_tensor.shard import Shard
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor
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
    st = replica["st"]
    seen_st: dict[str, Any] = {
        "type": type(st).__qualname__,
        "is_sharded_tensor": isinstance(st, ShardedTensor),
    }
    if isinstance(st, ShardedTensor):
        shards = st.local_shards()
        seen_st["shards"] = len(shards)
        if len(shards) == 1:
            seen_st["local"] = shards[0].tensor.clone()
            seen_st["offsets"] = list(shards[0].metadata.shard_offsets)
    return {
        "sharded": _dtensor_seen(replica["sharded"]),
        "replicated": _dtensor_seen(replica["replicated"]),
        "st": seen_st,
    }


async def peer_dies(rank: int, world: int, report: str) -> dict[str, Any]:
    """Rank 1 sends a frame's header, then SIGKILLs itself: rank 0 must fail fast, not hang.

    The world fails (rank 1 is gone), so rank 0 also writes what it saw (``_raised`` and
    ``seconds``) as JSON to ``report`` for the test body."""
    if rank == 1:
        _send_header_then_die()
    stager = aiostage.ReplicationStager(timeout=60)
    began = time.perf_counter()
    seen = await raised(stager.stage(make_state(rank)), ReplicationError)
    seen["seconds"] = time.perf_counter() - began
    part = anyio.Path(f"{report}.part")
    await part.write_text(json.dumps(seen))
    await part.replace(report)  # whole or absent, should rank 0 be killed while writing
    return seen


def _send_header_then_die() -> None:
    from aiostage._format.codec import encode_header
    from aiostage._replication.frames import plan_cpu_frame

    header = plan_cpu_frame(make_state(1)).header
    raw = bytearray(encode_header(header))
    head = [MAGIC, 1, len(raw), header.data_bytes, len(header.entries)]
    for t in (torch.tensor(head), torch.frombuffer(raw, dtype=torch.uint8)):
        dist.send(t, 0, tag=transport.TAG)
    os.kill(os.getpid(), signal.SIGKILL)


async def never_calls(rank: int, world: int) -> dict[str, Any]:
    """Rank 1 never stages: rank 0 gets ReplicationTimeout in time (``timeout``, ``seconds``),
    then a broken stager (``again``)."""
    if rank == 1:
        await anyio.to_thread.run_sync(dist.barrier)
        return {}
    stager = aiostage.ReplicationStager(timeout=1.5)
    began = time.perf_counter()
    first = await raised(stager.stage(make_state(rank)), TimeoutError)
    seconds = time.perf_counter() - began
    again = await raised(stager.stage(make_state(rank)), ReplicationError)
    await anyio.to_thread.run_sync(dist.barrier)
    return {"timeout": first, "seconds": seconds, "again": again}


#: what ``malformed``'s receiver takes: 1 GiB of data, a header of the format's longest
LIMITS = limits_of(1 << 30)


async def malformed(rank: int, world: int) -> dict[str, Any]:
    """Rank 1 sends frames that lie; rank 0's receive names rank 1 and phase "header".

    ``errors``: what each receive raised; ``allocations``: buffers asked for (none allowed)."""
    frames = [
        [0x1234, 1, 4096, 0, 0],  # not aiostage
        [MAGIC, 1, 1 << 40, 0, 0],  # a 1 TB header: refused before allocating
        [MAGIC, 1, 4096, 16, 1],  # then 4,096 bytes of pickle
    ]
    if rank == 1:
        for head in frames:
            dist.send(torch.tensor(head), 0, tag=transport.TAG)
        pickle = b"\x80\x04\x95cos\nsystem\n(S'echo pwned'\ntR."
        body = struct.pack("<Q", 4088) + pickle.ljust(4088, b" ")
        dist.send(torch.frombuffer(bytearray(body), dtype=torch.uint8), 0, tag=transport.TAG)
        dist.barrier()
        return {}
    link = transport.Link(dist.group.WORLD, torch.device("cpu"), 30.0)
    allocations = []

    async def no_buffer(n: int) -> torch.Tensor:
        allocations.append(n)
        raise AssertionError(f"allocated {n} bytes for a malformed frame")

    errors = [
        await raised(transport.recv_frame(link, 1, no_buffer, limits=LIMITS), ReplicationError)
        for _ in frames
    ]
    await anyio.to_thread.run_sync(dist.barrier)
    return {"errors": errors, "allocations": allocations}


async def recover(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """Rank 1 loses its state twice: back from rank 0's memory, then from its persisted file.

    ``replica``: the first replica against the partner's state; rank 0: ``kept`` (the type
    ``recover(lost=False)`` returned); rank 1: ``from_memory`` and ``from_file`` against its own
    state, and the aliases ``from_file`` lost."""
    sd = make_state(rank)
    seen: dict[str, Any] = {}
    async with aiostage.ReplicationStager(storage_dir=tmp, timeout=30) as first:
        replica = await first.stage(sd)
        await first.persisted()
        seen["replica"] = differs(replica, make_state(1 - rank))
        restarted = aiostage.ReplicationStager(storage_dir=tmp, timeout=30)
        if rank == 1:  # a fresh process would start here; its stager has nothing in memory
            back = await restarted.recover(lost=True, like=make_state(99))
            seen["from_memory"] = differs(back, sd)
        else:
            seen["kept"] = type(await first.recover(lost=False)).__qualname__
    # now every rank's memory is gone: rank 0 sends rank 1's state from its file
    async with aiostage.ReplicationStager(storage_dir=tmp, timeout=30) as fresh:
        back = await fresh.recover(lost=rank == 1, like=make_state(99) if rank == 1 else None)
        if rank == 1:
            seen["from_file"] = differs(back, sd)
            seen["from_file_aliases_lost"] = aliases_lost(back)
    return seen


async def recover_dtensors(rank: int, world: int) -> dict[str, Any]:
    """Odd worlds (a ring) and several lost ranks at once: DTensor shards come back wrapped.

    ``lost``, the type ``recover`` returned (``back``); for a lost rank, ``step`` and for ``w``
    and ``r`` what came back next to what the rank had staged (``_dtensor_seen``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

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
    seen: dict[str, Any] = {"lost": lost, "back": type(back).__qualname__}
    if not lost:
        return seen
    if back is not None:
        seen["step"] = back["step"]
        seen |= {key: _dtensor_seen(back[key], mine[key]) for key in ("w", "r")}
    await restarted.aclose()
    return seen


async def damaged_replica(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """Rank 0's copy of rank 1's state is damaged in memory after it arrived: writing it to
    storage_dir and giving it back both fail the check against rank 1's own digests.

    Rank 0: ``persist`` (what ``persisted()`` raised), ``kept`` (the file on disk against rank
    1's state), ``recover_kept`` (the type ``recover(lost=False)`` returned); rank 1: ``recover``
    (what a restarted stager's ``recover(lost=True)`` raised)."""
    sd, seen = make_state(rank), dict[str, Any]()
    async with aiostage.ReplicationStager(storage_dir=tmp, timeout=30) as stager:
        stager.release(await stager.stage(sd))
        await stager.persisted()  # an intact replica on disk first
        replica = await stager.stage(sd)
        if rank == 0:  # before the background write has started (no await in between)
            replica["model"]["ints"].add_(1)
            seen["persist"] = await raised(stager.persisted(), ReplicationError)
            path = stager.storage_path(1)
            assert path is not None
            kept = await aiostage.load(path)  # the previous replica stands
            seen["kept"] = differs(kept, make_state(1))
            seen["recover_kept"] = type(await stager.recover(lost=False)).__qualname__
        else:
            await stager.persisted()
            restarted = aiostage.ReplicationStager(timeout=30)
            seen["recover"] = await raised(restarted.recover(lost=True), ReplicationError)
            await restarted.aclose()
        stager.release(replica)
    return seen


async def chosen_partners(rank: int, world: int) -> dict[str, Any]:
    """World 4: ``partner=`` pairs 0-3 and 1-2 (not the default 0-2, 1-3) and replicates; then a
    choice that does not pair up (rank 3 names rank 1, which names rank 2) is a clear error on
    every rank instead of a timeout.

    ``partner`` and ``replica`` (against the partner's state); ``error`` (``_raised``) and
    ``seconds`` for the choice that does not pair up."""
    good = {0: 3, 3: 0, 1: 2, 2: 1}[rank]
    async with aiostage.ReplicationStager(timeout=30, partner=good) as stager:
        replica = await stager.stage(make_state(rank))
        seen: dict[str, Any] = {"partner": good, "replica": differs(replica, make_state(good))}
        stager.release(replica)
    bad = {0: 2, 2: 0, 1: 2, 3: 1}[rank]
    stager = aiostage.ReplicationStager(timeout=30, partner=bad)
    began = time.perf_counter()
    seen["error"] = await raised(stager.stage(make_state(rank)), aiostage.errors.UsageError)
    await stager.aclose()
    return seen | {"seconds": time.perf_counter() - began}


def _late_state() -> dict[str, Any]:
    """``make_state(0)`` plus five tensors of a message each (over ``wire.SMALL``)."""
    big = [torch.full((300_000,), float(i)) for i in range(5)]
    return {**make_state(0), "big": big}


async def late_digests(rank: int, world: int) -> dict[str, Any]:
    """Rank 0 sends two frames whose digests it gives only once the data is posted
    (``send_frame(digests=callable)``): the right ones, then damaged ones; rank 1 hashes each
    frame as its messages land and checks it.

    Rank 1: ``state`` (``differs`` of the first frame rebuilt against the state sent),
    ``digests`` (whether they are the ones rank 0 computed), ``damaged`` (what the second
    frame's check raised); rank 0: ``asked`` (how often its digests were asked for)."""
    from functools import partial

    from aiostage._replication.frames import plan_cpu_frame, rebuild
    from aiostage._replication.receive import ReceiveBuffers
    from aiostage._storage.digests import source_digests

    link = transport.Link(dist.group.WORLD, torch.device("cpu"), 60.0)
    planned = plan_cpu_frame(_late_state())
    right = source_digests(planned.sources)
    seen: dict[str, Any] = {}
    if rank == 0:
        asked = []

        async def later(digests: list[int]) -> list[int]:
            asked.append(1)
            await anyio.lowlevel.checkpoint()
            return digests

        for given in (right, [d ^ 1 for d in right]):
            sources = planned.sources
            await transport.send_frame(link, 1, planned.header, sources, partial(later, given))
        seen["asked"] = len(asked)
        return seen
    buffers = ReceiveBuffers()

    async def buffer(n: int) -> torch.Tensor:
        return await buffers.get(n, "receiving")

    limits = limits_of(1 << 30)
    got = await transport.recv_frame(link, 0, buffer, limits=limits, check=True)
    assert got is not None
    header, data, digests = got
    seen["state"] = differs(rebuild(header, data, None, 0, None), _late_state())
    seen["digests"] = list(digests) == right
    seen["damaged"] = await raised(
        transport.recv_frame(link, 0, buffer, limits=limits, check=True), ReplicationError
    )
    return seen
