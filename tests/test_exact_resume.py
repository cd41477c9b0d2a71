"""Checkpointing never changes training, and resuming is exact (the README's loop, as written).

The same seeded training runs four ways, each in a fresh process (tests/_exact_training.py):
without aiostage, with the README's ``train`` checkpointing every 100 steps, with it SIGKILLed
at the first write of step 200's checkpoint, and resumed from ``latest()`` after that. At every
step, the loss, the learning rate and the parameters of every run equal the plain run's,
bit for bit: for SGD with momentum and dampening, AdamW with StepLR, and Adam with L2 weight
decay and a cosine schedule (where DCP's zero-gradient initialisation step would show).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import aiostage

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

WORKER = Path(__file__).resolve().parent / "_exact_training.py"


def run(optim: str, mode: str, root: Path, out: Path) -> int:
    """Run one training process to its end; its exit code."""
    cmd = [sys.executable, str(WORKER), optim, mode, str(root), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"{mode} run failed ({proc.returncode}):\n{proc.stderr}")
    return proc.returncode


def steps(out: Path) -> dict[int, dict[str, Any]]:
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    return {line["step"]: line for line in lines}


@pytest.mark.parametrize("optim", ["sgd", "adamw", "adam"])
async def test_checkpointed_killed_and_resumed_runs_train_exactly_like_a_plain_run(
    tmp_path: Path, optim: str
) -> None:
    plain = tmp_path / "plain.jsonl"
    assert run(optim, "plain", tmp_path / "unused", plain) == 0
    expected = steps(plain)
    assert sorted(expected) == list(range(1, 301))

    saved = tmp_path / "readme.jsonl"
    assert run(optim, "readme", tmp_path / "ckpt", saved) == 0
    assert steps(saved) == expected  # checkpointing changed nothing
    assert [p.name for p in sorted((tmp_path / "ckpt").iterdir())] == [
        "step_000000100",
        "step_000000200",
        "step_000000300",
    ]

    root, first, second = tmp_path / "crash", tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    assert run(optim, "killed", root, first) == -signal.SIGKILL
    killed = steps(first)  # training goes on while step 200 is written behind it
    assert max(killed) >= 200
    assert all(killed[s] == expected[s] for s in killed)
    visible = [p.name for p in root.iterdir() if not p.name.startswith(".")]
    assert visible == ["step_000000100"]  # step 200's save never committed
    async with aiostage.Checkpointer(root) as ckpt:
        assert await ckpt.latest() == 100

    assert run(optim, "resumed", root, second) == 0
    resumed = steps(second)
    assert sorted(resumed) == list(range(101, 301))
    differing = [s for s in resumed if resumed[s] != expected[s]]
    assert not differing, f"resumed run differs from step {differing[:1]}: {resumed[differing[0]]}"
