"""Issue 19's GPU suite: what the CUDA and NCCL review found, proven on a GPU (skipped without).

Written against the documented CUDA and PyTorch semantics before any GPU ran it: each test
queues GPU work that is still running when aiostage is called (``torch.cuda._sleep``), so a
copy that does not wait for it, or memory reused too early, shows up as wrong data.
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

import _gpu_workers as workers
import anyio
import psutil
import pytest
import torch

import aiostage
from aiostage._core import cuda
from aiostage.testing import LoopLag, run_world

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
MiB = 1 << 20
_CYCLES_PER_SECOND: list[float] = []


def spin(seconds: float) -> None:
    """Queue about ``seconds`` of GPU busy-wait on the current stream (returns at once)."""
    if not _CYCLES_PER_SECOND:
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        torch.cuda._sleep(10_000_000)  # type: ignore[no-untyped-call]
        end.record()
        end.synchronize()
        _CYCLES_PER_SECOND.append(10_000_000 / (start.elapsed_time(end) / 1000))
    torch.cuda._sleep(int(seconds * _CYCLES_PER_SECOND[0]))  # type: ignore[no-untyped-call]


def _rss() -> int:
    return int(psutil.Process().memory_info().rss)


# (a) ------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
async def test_a_repeated_saves_and_unpooled_stages_leak_no_locked_memory(tmp_path: Path) -> None:
    sd = {f"w{i}": torch.randn(16 * MiB, device="cuda") for i in range(4)}  # 256 MiB
    rss = []
    for i in range(5):
        await aiostage.save(sd, tmp_path / f"c{i}")
        gc.collect()
        assert cuda.REGISTERED.live() == {}, f"save {i}: page-locked memory left registered"
        rss.append(_rss())
    assert rss[-1] - rss[0] < 128 * MiB, f"host memory grew: {rss}"
    options = aiostage.StagingOptions(reuse_buffers=False)
    async with aiostage.DefaultStager(options) as stager:
        for i in range(5):
            out = await stager.stage(sd)
            assert out["w0"].is_pinned()
            assert torch.equal(out["w3"], sd["w3"].cpu()), i
            del out
            gc.collect()
            assert cuda.REGISTERED.live() == {}, f"stage {i}: registration outlived its copy"


# (b) ------------------------------------------------------------------------------------------

OPTIONS = {
    "pinned": aiostage.StagingOptions(),
    "pageable": aiostage.StagingOptions(pin_memory=False),
    "blocking": aiostage.StagingOptions(non_blocking=False),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("warm", [False, True], ids=["cold", "reserved"])
@pytest.mark.parametrize("side", [False, True], ids=["default-stream", "side-stream"])
@pytest.mark.parametrize("name", list(OPTIONS))
async def test_b_the_copy_follows_work_still_queued_on_the_callers_stream(
    name: str, side: bool, warm: bool
) -> None:
    x = torch.zeros(32 * MiB, device="cuda")
    stream = torch.cuda.current_stream()
    if side:
        stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    stream.wait_stream(torch.cuda.current_stream())
    async with aiostage.DefaultStager(OPTIONS[name]) as stager:
        if warm:
            await stager.reserve({"x": x})
        with torch.cuda.stream(stream):
            spin(0.5)
            x.fill_(5)
            out = await stager.stage({"x": x})
        assert torch.all(out["x"] == 5), f"{name}: the copy ran before the queued fill"


# (c) ------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_c_a_source_freed_while_its_copy_is_queued_is_not_handed_out_early() -> None:
    src = torch.full((32 * MiB,), 7.0, device="cuda")
    dst = torch.empty(32 * MiB * 4, dtype=torch.uint8).pin_memory()
    streams = cuda.SideStreams()
    spin(0.5)  # the side stream's copy waits behind this
    device = src.device
    event = streams.issue_copies(
        device,
        [(src.view(torch.uint8), dst)],
        after=[torch.cuda.current_stream()],
    )
    del src
    junk = torch.full((32 * MiB,), -1.0, device="cuda")  # would take the freed block
    event.synchronize()
    torch.cuda.synchronize()
    assert torch.all(dst.view(torch.float32) == 7.0)
    del junk


# (d) ------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_d_the_loop_stays_free_while_staging_and_loading_on_the_gpu(tmp_path: Path) -> None:
    sd = {f"w{i}": torch.randn(16 * MiB, device="cuda") for i in range(4)}
    await aiostage.save(sd, tmp_path / "ckpt")
    async with aiostage.DefaultStager() as stager:
        stager.release(await stager.stage(sd))
        spin(0.2)
        async with LoopLag() as lag:
            stager.release(await stager.stage(sd))
        assert lag.max_ms < 2, f"staging behind a 200 ms kernel: {lag.max_ms:.2f} ms"
    async with LoopLag() as lag:
        out = await aiostage.load(tmp_path / "ckpt", map_location="cuda")
    assert lag.max_ms < 2, f"load(map_location='cuda'): {lag.max_ms:.2f} ms"
    assert torch.equal(out["w1"], sd["w1"])
    into = {k: torch.empty_like(v) for k, v in sd.items()}
    async with LoopLag() as lag:
        await aiostage.load(tmp_path / "ckpt", into=into)
    assert lag.max_ms < 2, f"load(into=cuda): {lag.max_ms:.2f} ms"
    assert torch.equal(into["w2"], sd["w2"])


# (e) ------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_e_a_stage_cancelled_mid_copy_returns_at_once_and_its_buffers_wait() -> None:
    x = torch.zeros(64 * MiB, device="cuda")
    async with aiostage.DefaultStager(pool_size=1) as stager:
        stager.release(await stager.stage({"x": x}))
        spin(1.0)
        x.fill_(1)
        began = time.perf_counter()
        with anyio.move_on_after(0.05):
            await stager.stage({"x": x})
        assert time.perf_counter() - began < 0.5, "cancelling waited for the queued kernel"
        x.fill_(2)  # the next stage must see this, in buffers the cancelled copy no longer writes
        out = await stager.stage({"x": x})
        assert torch.all(out["x"] == 2)
        assert stager.statistics().allocations == 1


# (f) ------------------------------------------------------------------------------------------


@two_gpus
@pytest.mark.timeout(180)
async def test_f_a_state_spanning_two_gpus_is_staged_right() -> None:
    sd = {
        "a": torch.full((MiB,), 1.0, device="cuda:0"),
        "b": torch.full((MiB,), 2.0, device="cuda:1"),
    }
    with torch.cuda.device(1):
        spin(0.3)
        sd["b"].fill_(3)
        async with aiostage.DefaultStager() as stager:
            out = await stager.stage(sd)
    assert torch.all(out["a"] == 1)
    assert torch.all(out["b"] == 3)


@two_gpus
@pytest.mark.timeout(180)
def test_f_set_device_1_keeps_stage_save_and_load_on_gpu_1(tmp_path: Path) -> None:
    (r,) = run_world(workers.one_device_stays_on_cuda1, 1, str(tmp_path), timeout=150)
    assert r["staged_right"], r
    assert r["loaded_right"], r
    assert r["loaded_on"] == "cuda:1", r
    assert not r["gpu0_context"], f"a CUDA context was created on GPU 0: {r}"


# (g) ------------------------------------------------------------------------------------------


@two_gpus
@pytest.mark.timeout(400)
def test_g_nccl_replication_partner_recover_and_user_traffic(tmp_path: Path) -> None:
    results = run_world(workers.nccl_replication, 2, str(tmp_path), timeout=360, backend="nccl")
    for rank, r in enumerate(results):
        assert r["replica_right"], r
        assert r["replica_step"] == 1 - rank, r
        assert r["user_traffic_right"], r
        assert r["peak_extra_mib"] < 96 + 2 * 32 + 16, f"rank {rank}: device memory {r}"
        assert r["lag_ms"] < 5, f"rank {rank}: loop lag {r}"
    assert results[0]["recovered_right"] is True
    assert results[1]["recovered_right"] is None


# (h) ------------------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_h_a_dtensor_on_a_one_gpu_mesh() -> None:
    (r,) = run_world(workers.dtensor_one_gpu_mesh, 1, timeout=150, backend="nccl")
    assert r["right"], r


@pytest.mark.timeout(120)
async def test_h_non_contiguous_into_targets_are_written_before_load_returns(
    tmp_path: Path,
) -> None:
    w = torch.arange(64.0 * MiB // 64).reshape(-1, 64)
    await aiostage.save({"w": w}, tmp_path / "ckpt")
    target = torch.zeros(64, w.shape[0], device="cuda").t()  # non-contiguous
    await aiostage.load(tmp_path / "ckpt", into={"w": target})
    other = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    with torch.cuda.stream(other):  # a reader on another stream, no synchronisation
        seen = target.sum().item()
    assert seen == float(w.sum())


# (j) ------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_j_a_fork_after_page_locking_does_not_move_the_pages() -> None:
    x = torch.full((32 * MiB,), 1.0, device="cuda")
    async with aiostage.DefaultStager(pool_size=1) as stager:
        stager.release(await stager.stage({"x": x}))
        pid = os.fork()
        if pid == 0:  # a DataLoader worker: touches nothing of CUDA
            os._exit(0)
        try:
            x.fill_(4)
            out = await stager.stage({"x": x})  # the parent writes the pages after the fork
            assert torch.all(out["x"] == 4)
        finally:
            await anyio.to_thread.run_sync(os.waitpid, pid, 0)
