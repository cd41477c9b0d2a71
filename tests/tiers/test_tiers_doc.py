"""The example of docs/tiers.md, run as written: a world of one whose fast tier is its local
directory, restored from it by a new Checkpointer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_doc_examples import python_block, run_block


async def test_the_example_of_the_tiers_page(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = python_block("tiers.md", "ckpt.restore(into=fresh)")
    root, local_dir = tmp_path / "durable", tmp_path / "local"
    seen = await run_block(code, {"torch": torch, "root": root, "local_dir": local_dir})
    report = seen["report"]
    assert (report.step, report.mine.source, report.state["step"]) == (5, "local", 5)
    assert capsys.readouterr().out == "5 local 5\n"  # what the block's comment says
    assert torch.equal(seen["fresh"]["w"], torch.full((4,), 5.0))
    assert report.state["w"] is seen["fresh"]["w"]  # restored in place
    assert sorted(p.name for p in root.iterdir()) == ["step_000000003"]
    kept = sorted(p.name for p in (local_dir / "rank_00000").iterdir())
    assert kept == ["step_000000004", "step_000000005"]  # keep_local=2
