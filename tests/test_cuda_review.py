"""The CUDA and NCCL review's fixes (issue 19), shown on the CPU: page-lock bookkeeping, the
device carried into worker calls, collectives on the group's backend device, grouped exchanges
over a dedicated group (real gloo worlds), and retired buffer sets. ``tests/gpu`` proves the
rest on a GPU."""

from __future__ import annotations

import ast
import gc
import struct
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

import aiostage
from aiostage._core import buffers as buffers_mod
from aiostage._core import cuda, dist
from aiostage._core.buffers import allocate, free
from aiostage.testing import run_world

ROOT = Path(aiostage.__file__).parent
WORLD_TIMEOUT = 60.0


def _mapped(ptr: int) -> bool:
    """Whether ``ptr`` lies in a mapping of this process now (``/proc/self/maps``)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if lo <= ptr < hi:
            return True
    return False


class _Driver:
    """Stands in for ``cudaHostRegister``/``cudaHostUnregister`` (the bookkeeping's injectable
    functions): records each call and whether the range was still mapped when unregistered."""

    def __init__(self) -> None:
        self.registered: list[int] = []
        self.unregistered: list[tuple[int, bool]] = []

    def register(self, ptr: int, nbytes: int, device: torch.device | None) -> None:
        assert nbytes > 0
        self.registered.append(ptr)

    def unregister(self, ptr: int, device: torch.device | None) -> None:
        self.unregistered.append((ptr, _mapped(ptr)))


@pytest.fixture
def driver(monkeypatch: pytest.MonkeyPatch) -> _Driver:
    fake = _Driver()
    monkeypatch.setattr(cuda, "REGISTERED", cuda.Registrations(fake.register, fake.unregister))
    return fake


LAYOUT = (("cuda", 3 << 20), ("cuda", 100), ("cuda", 70_000))


# ---------------------------------------------------------------- 1: page-locked memory


def test_a_range_is_unregistered_exactly_once_and_a_failed_register_leaves_nothing() -> None:
    calls: list[str] = []

    def register(ptr: int, n: int, device: torch.device | None) -> None:
        if ptr == 2:
            raise RuntimeError("cudaHostRegister failed")
        calls.append(f"+{ptr}")

    regs = cuda.Registrations(register, lambda ptr, device: calls.append(f"-{ptr}"))
    regs.add(1, 10, None)
    with pytest.raises(RuntimeError, match="already page-locked"):
        regs.add(1, 10, None)
    with pytest.raises(RuntimeError, match="failed"):
        regs.add(2, 10, None)
    assert regs.live() == {1: 10}
    assert regs.remove(1) is True
    assert regs.remove(1) is False  # the finalizer after free(), or free() after it
    assert calls == ["+1", "-1"]
    assert regs.live() == {}


def test_an_unpooled_arena_is_unregistered_once_its_last_tensor_dies_before_it_is_unmapped(
    driver: _Driver,
) -> None:
    for i in range(5):  # what five aiostage.save() calls with reuse_buffers=False do
        got = allocate(LAYOUT, False, True, False)  # often at the last one's address
        ptr = got.pinned[0].data_ptr()
        staged = got.flats[1][10:20]  # a staged tensor: a view of one span
        del got
        gc.collect()
        assert list(cuda.REGISTERED.live()) == [ptr], "unregistered while a tensor lives"
        assert len(driver.unregistered) == i
        del staged
        gc.collect()
        assert cuda.REGISTERED.live() == {}, "a registration outlived its memory"
        assert driver.unregistered[-1] == (ptr, True), "unregistered after it was unmapped"
    assert len(driver.registered) == len(driver.unregistered) == 5


def test_free_unregisters_and_the_finalizer_then_does_nothing(driver: _Driver) -> None:
    got = allocate(LAYOUT, False, True, False)
    keep = got.flats[0]
    free([got])
    assert len(driver.unregistered) == 1
    assert cuda.REGISTERED.live() == {}
    del got, keep
    gc.collect()
    assert len(driver.unregistered) == 1
    again = allocate(LAYOUT, False, True, False)  # the same address, if the kernel reuses it
    free([again])
    assert len(driver.registered) == 2


def test_a_retired_set_is_freed_only_once_its_copies_are_done(driver: _Driver) -> None:
    done = [False]
    got = allocate(LAYOUT, False, True, False)
    got.settled = lambda: done[0]
    free([got])
    assert buffers_mod.retired() == 1
    assert len(cuda.REGISTERED.live()) == 1
    other = allocate((("cpu", 10),), False, False, False)  # frees what is done: nothing yet
    assert buffers_mod.retired() == 1
    done[0] = True
    free([other])
    assert buffers_mod.retired() == 0
    assert cuda.REGISTERED.live() == {}


async def test_a_pooled_set_whose_copies_run_on_is_not_reused_until_they_are_done() -> None:
    sd = {"w": torch.arange(1000.0)}
    async with aiostage.DefaultStager(pool_size=1) as stager:
        first = await stager.stage(sd)
        stager.release(first)
        (pooled,) = stager._pool  # the set a cancelled stage would leave unsettled
        done = [False]
        pooled.settled = lambda: done[0]
        got: list[Any] = []
        staged = anyio.Event()

        async def stage() -> None:
            got.append(await stager.stage({"w": torch.arange(1000.0) + 1}))
            staged.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(stage)
            with anyio.move_on_after(0.1):  # it polls the set every 2 ms meanwhile
                await staged.wait()
            assert got == [], "refilled a set whose copies were still running"
            done[0] = True
        assert torch.equal(got[0]["w"], torch.arange(1000.0) + 1)
        assert stager.statistics().allocations == 1  # the same set, once ready
        assert pooled.settled is None


# ---------------------------------------------------------------- 2: the device of worker calls


def test_on_device_and_bound_need_an_index_and_leave_the_cpu_alone() -> None:
    cpu = torch.device("cpu")
    with cuda.on_device(cpu), cuda.on_device(None):
        pass
    assert cuda.bound(cpu, lambda a, b: a + b)(2, 3) == 5
    assert cuda.resolve(cpu) == cpu
    assert cuda.resolve(torch.device("cuda", 3)) == torch.device("cuda", 3)
    with pytest.raises(ValueError, match="needs an index"):
        cuda.bound(torch.device("cuda"), print)
    with pytest.raises(ValueError, match="needs an index"), cuda.on_device(torch.device("cuda")):
        pass


def _run_sync_targets(path: Path) -> tuple[set[str], set[str]]:
    """The functions ``path`` hands to ``anyio.to_thread.run_sync``: bare, and through
    ``cuda.bound(device, f)``."""
    bare, bound = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "anyio.to_thread.run_sync":
            first = node.args[0]
            if isinstance(first, ast.Call) and ast.unparse(first.func) == "cuda.bound":
                bound.add(ast.unparse(first.args[1]))
            else:
                bare.add(ast.unparse(first))
    return bare, bound


@pytest.mark.parametrize(
    ("module", "cuda_workers"),
    [
        ("_replication/transport.py", {"_send", "_exchange_one", "_receive"}),
        ("_replication/grouped.py", {"steps.run"}),
        ("_core/dist.py", {"t.to", "t.cpu"}),
        ("_staging.py", {"_flagged(run, finished)"}),
    ],
)
def test_every_worker_call_that_may_touch_cuda_carries_the_callers_device(
    module: str, cuda_workers: set[str]
) -> None:
    bare, bound = _run_sync_targets(ROOT / module)
    assert cuda_workers <= bound, f"{module}: not run through cuda.bound: {cuda_workers - bound}"
    assert not cuda_workers & bare, f"{module}: run without its device: {cuda_workers & bare}"


def test_page_locking_is_done_on_the_callers_device() -> None:
    tree = ast.parse((ROOT / "_staging.py").read_text())
    calls = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call)
        and ast.unparse(n.func) == "anyio.to_thread.run_sync"
        and ast.unparse(n.args[0]) == "allocate"
    ]
    assert calls, "the stager allocates its buffers"
    assert all(ast.unparse(c.args[-1]) == "device" for c in calls)


# ---------------------------------------------------------------- 3: collectives and exchanges


async def _backend_and_grouped(rank: int, world: int) -> dict[str, Any]:
    """A dedicated group over the world; the frame exchange of NCCL groups run over it."""
    from aiostage._format.codec import Header
    from aiostage._replication.frames import Planned, plan_frame
    from aiostage._replication.grouped import exchange_grouped
    from aiostage._replication.transport import Link, partners
    from aiostage._replication.wire import limits_of

    pg = dist.default_group()
    out: dict[str, Any] = {
        "device": str(dist.backend_device(pg)),
        "nccl": dist.uses_nccl(pg),
        "gathered": await dist.all_gather_ints(pg, [rank, 7], pg_timeout=30, what="test"),
    }
    group = await dist.own_group(pg, 30)
    out["own_group_is_new"] = group is not pg
    link = Link(group, dist.backend_device(group), 30.0)
    send_to, recv_from = partners(rank, world)
    # sizes differ per rank, so each side sends and receives different numbers of messages
    state = {
        f"t{i}": torch.full((300_000 * (rank + 1),), float(rank * 10 + i)) for i in range(2 + rank)
    }
    state["small"] = torch.arange(5) + rank
    planned = plan_frame(state, True)
    assert isinstance(planned, Planned)
    header: Header = planned.header

    async def buffer(n: int) -> torch.Tensor:
        return torch.empty(n, dtype=torch.uint8)

    for _ in range(2):  # the second round reuses the encoded header
        got, data, digests = await exchange_grouped(
            link, send_to, header, planned.sources, recv_from, buffer,
            limits=limits_of(1 << 30), check=True,
        )  # fmt: skip
    out["sent_bytes"], out["data_bytes"] = header.data_bytes, got.data_bytes
    out["entries"] = [e.name for e in got.entries]
    out["first"] = {
        e.name: struct.unpack("<f", data[e.begin : e.begin + 4].numpy().tobytes())[0]
        for e in got.entries
    }
    out["digests"] = len(digests)
    return out


@pytest.mark.distributed
@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 3])
def test_collectives_use_the_backends_device_and_grouped_exchanges_pair_up(world: int) -> None:
    results = run_world(_backend_and_grouped, world, timeout=WORLD_TIMEOUT)
    for rank, r in enumerate(results):
        assert r["device"] == "cpu", r
        assert r["nccl"] is False, r
        assert r["gathered"] == [[i, 7] for i in range(world)], r
        assert r["own_group_is_new"], r
        peer = (rank + world // 2) % world if world % 2 == 0 else (rank - 1) % world
        assert r["data_bytes"] == results[peer]["sent_bytes"], r
        for name, first in r["first"].items():
            if name.startswith("t"):
                assert first == peer * 10 + int(name[1:]), (rank, name, first)
        assert r["digests"] == len(r["entries"]), r
