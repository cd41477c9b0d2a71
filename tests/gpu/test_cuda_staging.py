"""CUDA staging: side stream, pinned buffers, event polling (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

import aiostage
from aiostage.testing import LoopLag

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
MiB = 1 << 20


async def test_d2h_stage_lands_in_pinned_cpu_memory_with_aliasing() -> None:
    base = torch.randn(64, 64, device="cuda")
    sd = {"w": base, "view": base[8:16], "tied": base, "cpu": torch.ones(3), "step": 3}
    async with aiostage.DefaultStager() as stager:
        out = await stager.stage(sd)
        assert out["w"].device.type == "cpu"
        assert out["w"].is_pinned()
        assert torch.equal(out["w"], base.cpu())
        assert torch.equal(out["view"], base[8:16].cpu())
        assert out["view"].untyped_storage().data_ptr() == out["w"].untyped_storage().data_ptr()
        assert out["step"] == 3


async def test_copy_waits_for_work_queued_on_the_current_stream() -> None:
    x = torch.zeros(16 * MiB, device="cuda")
    async with aiostage.DefaultStager() as stager:
        for _ in range(20):
            x.add_(1)  # queued on the current stream, likely still running when stage() starts
        out = await stager.stage({"x": x})
        assert torch.all(out["x"] == 20)


async def test_source_freed_right_after_stage_is_not_reused_too_early() -> None:
    async with aiostage.DefaultStager() as stager:
        src = torch.full((32 * MiB,), 7.0, device="cuda")
        pending = stager.stage({"x": src})
        out = await pending
        del src
        junk = torch.full((32 * MiB,), -1.0, device="cuda")  # may take the freed block
        assert torch.all(out["x"] == 7.0)
        del junk


async def test_loop_stays_free_while_256_mib_copy_from_the_gpu() -> None:
    sd = {f"w{i}": torch.randn(16 * MiB, device="cuda") for i in range(4)}
    async with aiostage.DefaultStager() as stager:
        stager.release(await stager.stage(sd))
        async with LoopLag() as lag:
            out = await stager.stage(sd)
        for k, v in sd.items():
            assert torch.equal(out[k], v.cpu()), k
    assert lag.max_ms < 1.5, f"loop blocked {lag.max_ms:.2f} ms"


async def test_unpinned_path_copies_from_a_worker_thread() -> None:
    options = aiostage.StagingOptions(pin_memory=False)
    x = torch.randn(MiB, device="cuda")
    async with aiostage.DefaultStager(options) as stager:
        out = await stager.stage({"x": x})
    assert not out["x"].is_pinned()
    assert torch.equal(out["x"], x.cpu())
