"""``aiostage ls --local DIR``: a node's local tier listed beside the durable steps, run as a
real subprocess over what a tiered ``Checkpointer`` wrote."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import aiostage
from aiostage._storage import localfs

pytestmark = pytest.mark.timeout(120)


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``python -m aiostage ARGS``: its exit status and output."""
    cmd = [sys.executable, "-m", "aiostage", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


async def _tiered_run(tmp_path: Path) -> tuple[Path, Path]:
    """Steps 1..4 of a world of one (every 2nd durable, 3 kept locally), a replica received
    from rank 1, and what an interrupted local write left."""
    root, local = tmp_path / "durable", tmp_path / "local"
    async with aiostage.Checkpointer(root, local_dir=local, durable_every=2, keep_local=3) as ckpt:
        for step in range(1, 5):
            await (await ckpt.save(step, {"w": torch.full((64,), float(step))})).committed
    await aiostage.save({"w": torch.zeros(8)}, local / "replica_of_rank_00001" / "step_000000004")
    left = localfs.temp_path(local / "rank_00000" / "step_000000005", "0" * 32)
    left.mkdir()
    (left / "rank_00000.safetensors").write_bytes(b"partial")
    return root, local


def _rows(out: subprocess.CompletedProcess[str]) -> list[list[str]]:
    """(STEP, STATUS, TIER, first word of PATH) of each line; SIZE is two words, AGE one."""
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["STEP", "STATUS", "SIZE", "AGE", "TIER", "PATH"]
    return [[*line.split()[:2], *line.split()[5:7]] for line in lines[1:]]


async def test_ls_lists_the_local_tier_beside_the_durable_steps(tmp_path: Path) -> None:
    root, local = await _tiered_run(tmp_path)
    left = f"rank_00000/{localfs.temp_path(Path('step_000000005'), '0' * 32).name}"
    assert _rows(run_cli("ls", root, "--local", local)) == [
        ["2", "committed", "durable", "step_000000002"],
        ["2", "committed", "local", "rank_00000/step_000000002"],
        ["3", "committed", "local", "rank_00000/step_000000003"],
        ["4", "committed", "durable", "step_000000004"],
        ["4", "committed", "local", "rank_00000/step_000000004"],
        ["4", "committed", "replica", "replica_of_rank_00001/step_000000004"],
        ["5", "incomplete", "local", left],
    ]
    alone = _rows(run_cli("ls", "--local", local))
    assert [r[2] for r in alone] == ["local", "local", "local", "replica", "local"]


async def test_ls_without_a_directory_or_with_a_missing_one_says_so(tmp_path: Path) -> None:
    for args, words in (
        ((), "give ROOT"),
        (("--local", tmp_path / "nope"), f"{tmp_path / 'nope'}: No such file"),
    ):
        out = run_cli("ls", *args)
        assert out.returncode == 2, out
        assert out.stderr.strip().splitlines() == [out.stderr.strip()], out.stderr
        assert "Traceback" not in out.stderr
        assert words in out.stderr, out.stderr
