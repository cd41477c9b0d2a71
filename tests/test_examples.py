"""Every example runs on the CPU (small sizes), so none can rot."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"

SMALL_ARGS: dict[str, list[str]] = {
    "torchrun_ddp.py": ["--steps", "4", "--every", "2", "--hidden", "32"],
    "train_loop.py": ["--steps", "6", "--every", "2", "--crash-at", "4", "--hidden", "64"],
    "rl_weight_sync.py": ["--hidden", "64", "--steps", "6", "--every", "2"],
}


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_example_runs(name: str) -> None:
    assert name in SMALL_ARGS, f"add small arguments for examples/{name} to SMALL_ARGS"
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *SMALL_ARGS[name]],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "report" in done.stdout
