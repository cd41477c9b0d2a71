"""Crash consistency: SIGKILL a process that saves in a loop, at random instants, many times.

A zygote process imports torch and aiostage once and forks one saver per round (a fresh
interpreter per kill would spend most of the test importing torch). The saver overwrites three
checkpoint names in turn and prints ``saving <step>`` before each save; the test waits for its
first, second or third such line, kills it at a random instant of that save, waits until the
zygote has reaped it, and then checks that every visible checkpoint loads, verifies and equals
what that step saved, and that ``sweep`` leaves no temporary behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import aiostage
from aiostage._storage import localfs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

KILLS = 32
LINE_TIMEOUT = 30.0

ZYGOTE = r"""
import asyncio, os, signal, sys
import torch
import aiostage
from aiostage._storage import localfs

def make_sd(step):
    gen = torch.Generator().manual_seed(step)
    a = torch.randn(3 << 18, generator=gen)
    return {"a": a, "tied": a, "view": a[100:200], "b": torch.randn(300, 100, generator=gen),
            "i": torch.randint(0, 9, (5000,), generator=gen), "step": step, "meta": {"k": [step]}}

def say(message):  # one write(2) per line: the zygote and its saver share the pipe
    os.write(1, (message + "\n").encode())

async def save_forever(root, step):
    while True:
        say(f"saving {step}")
        await aiostage.save(make_sd(step), os.path.join(root, f"ckpt_{step % 3}"),
                            overwrite=True, metadata={"step": step})
        step += 1

root, exchange = sys.argv[1], sys.argv[2] == "1"
for line in sys.stdin:
    cmd, arg = line.split()
    if cmd == "fork":
        pid = os.fork()
        if pid == 0:
            sys.stdin.close()
            if not exchange:
                localfs._renameat2 = None  # the three-rename fallback and its crash window
            asyncio.run(save_forever(root, int(arg)))
            os._exit(0)
        say(f"forked {pid}")
    elif cmd == "reap":
        os.waitpid(int(arg), 0)
        say(f"reaped {arg}")
"""


def make_sd(step: int) -> dict[str, Any]:
    """What the saver writes at ``step`` (the same code as in ``ZYGOTE``)."""
    gen = torch.Generator().manual_seed(step)
    a = torch.randn(3 << 18, generator=gen)
    return {
        "a": a,
        "tied": a,
        "view": a[100:200],
        "b": torch.randn(300, 100, generator=gen),
        "i": torch.randint(0, 9, (5000,), generator=gen),
        "step": step,
        "meta": {"k": [step]},
    }


class Zygote:
    """The forking helper process and a thread that queues its output lines."""

    def __init__(self, root: Path, exchange: bool, log: Path) -> None:
        self.log = log.open("w")  # the zygote's and savers' stderr, for failure reports
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE, str(root), "1" if exchange else "0"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            bufsize=1,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.children: set[int] = set()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def expect(self, prefix: str) -> str:
        """The next line starting with ``prefix`` (lines from an earlier saver are skipped)."""
        while True:
            line = self.lines.get(timeout=LINE_TIMEOUT)
            if line.startswith(prefix):
                return line

    def close(self) -> None:
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()


async def check_root(root: Path) -> tuple[int, int]:
    """Every visible checkpoint loads, verifies and matches its step; then sweep.

    Returns how many checkpoints were visible and how many leftovers ``sweep`` removed.
    """
    visible = sorted(n for n in os.listdir(root) if not n.startswith("."))
    for name in visible:
        step = (await aiostage.load_metadata(root / name))["step"]
        assert name == f"ckpt_{step % 3}"
        out = await aiostage.load(root / name, verify=True)
        want = make_sd(step)
        for key, value in want.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(out[key], value), (name, key)
            else:
                assert out[key] == value, (name, key)
        assert out["tied"].untyped_storage().data_ptr() == out["a"].untyped_storage().data_ptr()
    removed = await aiostage.sweep(root)
    assert [n for n in os.listdir(root) if localfs.TEMP_NAME.match(n)] == []
    for name in sorted(n for n in os.listdir(root) if n not in visible):
        await aiostage.load(root / name)  # an interrupted overwrite that sweep finished
    return len(visible), len(removed)


def kill_during_a_save(zygote: Zygote, pid: int, rng: random.Random, save_seconds: float) -> float:
    """SIGKILL ``pid`` at a random instant of its first, second or third save.

    Waiting for the k-th ``saving`` line lets k - 1 saves commit whatever the machine's speed;
    the delay after it is drawn over the measured length of one save. Returns that length.
    """
    stamps = []
    for _ in range(rng.choice([1, 2, 3])):
        zygote.expect("saving")
        stamps.append(time.monotonic())
    if len(stamps) > 1:
        save_seconds = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    time.sleep(rng.uniform(0.0, 1.2 * save_seconds))  # draws the instant; not a synchronisation
    os.kill(pid, signal.SIGKILL)
    return save_seconds


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-fallback"])
def test_sigkill_at_random_instants_never_leaves_a_torn_checkpoint(
    tmp_path: Path, exchange: bool
) -> None:
    rng = random.Random(1234 + exchange)
    root = tmp_path / "saves"
    root.mkdir()
    zygote = Zygote(root, exchange, tmp_path / "zygote.log")
    step, seen, torn = 0, 0, 0
    try:
        save_seconds = 0.05  # a first guess; measured below, so a loaded machine is no problem
        for _ in range(KILLS):
            zygote.send(f"fork {step}")
            pid = int(zygote.expect("forked").split()[1])
            zygote.children.add(pid)
            save_seconds = kill_during_a_save(zygote, pid, rng, save_seconds)
            zygote.send(f"reap {pid}")
            zygote.expect(f"reaped {pid}")
            zygote.children.discard(pid)
            visible, removed = asyncio.run(check_root(root))
            seen, torn = max(seen, visible), torn + (removed > 0)
            steps = [
                asyncio.run(aiostage.load_metadata(root / n))["step"] for n in os.listdir(root)
            ]
            step = max(steps, default=step) + 1
    finally:
        zygote.close()
    assert seen >= 2, "the saver never got far enough to commit (kills came too early)"
    assert torn >= 3, f"only {torn} of {KILLS} kills landed inside a save"
