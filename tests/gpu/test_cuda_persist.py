"""Saving CUDA tensors (staged first) and loading onto the GPU (skipped without a GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import aiostage

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


async def test_cuda_tensors_are_staged_saved_and_loaded_back_to_the_gpu(tmp_path: Path) -> None:
    base = torch.randn(256, 64, device="cuda")
    sd = {"w": base, "tied": base, "rows": base[8:16], "cpu": torch.ones(3), "step": 3}
    report = await aiostage.save(sd, tmp_path / "ckpt")
    assert report.stage_seconds > 0
    out = await aiostage.load(tmp_path / "ckpt", map_location="cuda")
    assert out["w"].device.type == "cuda"
    assert torch.equal(out["w"], base)
    assert torch.equal(out["rows"], base[8:16])
    assert out["rows"].untyped_storage().data_ptr() == out["w"].untyped_storage().data_ptr()
    target = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else v for k, v in sd.items()}
    await aiostage.load(tmp_path / "ckpt", into=target)
    assert torch.equal(target["w"], base)
