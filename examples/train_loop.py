"""Demo: a training loop with async checkpoints on the CPU, printing a report.

Each training step runs in a worker thread (as an async orchestrator would run it), so the event
loop stays free; a 1 ms heartbeat measures how late the loop runs. Every ``--every`` steps the
model and optimizer state are staged with ``aiostage.DefaultStager`` (the training-visible
stall), and a background task writes the staged copy durably with ``aiostage.save`` while
training goes on, then releases it. At the end the newest checkpoint is loaded into a fresh
model and optimizer, and the next steps are replayed from it: the losses must match.

    python examples/train_loop.py [--steps 60] [--every 10] [--hidden 1024] [--dir DIR]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import torch

import aiostage
from aiostage.testing import LoopLag


def build(hidden: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, hidden),
        torch.nn.GELU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.GELU(),
        torch.nn.Linear(hidden, 1),
    )
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> float:
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(256, 64, generator=gen)
    y = x[:, :1].sin() + 0.1 * torch.randn(256, 1, generator=gen)
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def nbytes(state: Any) -> int:
    if isinstance(state, torch.Tensor):
        return state.nbytes
    if isinstance(state, dict):
        return sum(nbytes(v) for v in state.values())
    if isinstance(state, list | tuple):
        return sum(nbytes(v) for v in state)
    return 0


class Saver:
    """Persists staged copies in the background and records how long each save took."""

    def __init__(self, stager: aiostage.DefaultStager, root: Path) -> None:
        self.stager, self.root = stager, root
        self.seconds: list[float] = []
        self.written: list[int] = []

    async def persist(self, staged: dict[str, Any], step: int) -> None:
        try:
            report = await aiostage.save(
                staged, self.root / f"step_{step:06d}", metadata={"step": step}
            )
        finally:
            self.stager.release(staged)
        self.seconds.append(report.total_seconds)
        self.written.append(report.bytes_written)


async def train(args: argparse.Namespace, root: Path) -> dict[int, float]:
    model, opt = build(args.hidden)
    gc.collect()
    gc.freeze()  # start-up objects are never scanned again: no 100 ms collector pauses
    losses: dict[int, float] = {}
    stalls: list[float] = []
    async with LoopLag() as lag, aiostage.DefaultStager() as stager:
        saver = Saver(stager, root)
        began = time.perf_counter()
        async with anyio.create_task_group() as background:
            for step in range(1, args.steps + 1):
                losses[step] = await anyio.to_thread.run_sync(train_step, model, opt, step)
                if step % args.every:
                    continue
                sd = {"model": model.state_dict(), "optim": opt.state_dict(), "step": step}
                mark, t0 = lag.beats, time.perf_counter()
                staged = await stager.stage(sd)  # the only wait training sees
                stalls.append(time.perf_counter() - t0)
                background.start_soon(saver.persist, staged, step)
                print(
                    f"step {step:4d}  loss {losses[step]:.4f}  staged {nbytes(sd) / 1e6:.1f} MB "
                    f"in {stalls[-1] * 1e3:5.1f} ms  loop max lag "
                    f"{1e3 * max(lag.lateness[mark:], default=0.0):.2f} ms"
                )
            trained = time.perf_counter() - began
        report(args.steps, trained, stalls, saver, lag, nbytes(sd))
    return losses


def report(
    steps: int, trained: float, stalls: list[float], saver: Saver, lag: LoopLag, size: int
) -> None:
    ms = [s * 1e3 for s in stalls]
    print("\nreport")
    print(f"  steps: {steps} in {trained:.2f} s ({steps / trained:.1f} steps/s)")
    print(
        f"  checkpoints: {len(ms)}, {size / 1e6:.1f} MB each; training stall per checkpoint: "
        f"median {statistics.median(ms):.1f} ms, max {max(ms):.1f} ms (first one allocates)"
    )
    print(f"  staging: median {size / statistics.median(stalls) / 1e9:.2f} GB/s")
    gbps = [w / s / 1e9 for w, s in zip(saver.written, saver.seconds, strict=True)]
    print(
        f"  background persistence (write + fsync + commit): median "
        f"{statistics.median(saver.seconds) * 1e3:.0f} ms, {statistics.median(gbps):.2f} GB/s"
    )
    print(
        f"  event loop lag over the run: max {lag.max_ms:.2f} ms, p99 {lag.p99_ms:.2f} ms"
        f" ({lag.beats} heartbeats)"
    )


async def resume(args: argparse.Namespace, root: Path, losses: dict[int, float]) -> None:
    """Restart from the newest checkpoint before the last step and replay the steps after it."""
    steps = sorted(int(p.name.removeprefix("step_")) for p in root.glob("step_*"))
    step = max((s for s in steps if s < args.steps), default=steps[-1])
    loaded = await aiostage.load(root / f"step_{step:06d}")
    assert loaded["step"] == (await aiostage.load_metadata(root / f"step_{step:06d}"))["step"]
    model, opt = build(args.hidden)
    model.load_state_dict(loaded["model"])
    opt.load_state_dict(loaded["optim"])
    replayed = range(step + 1, min(step + args.every, args.steps) + 1)
    again = [await anyio.to_thread.run_sync(train_step, model, opt, s) for s in replayed]
    same = all(
        abs(a - losses[s]) <= 1e-6 * max(1.0, abs(a)) for a, s in zip(again, replayed, strict=True)
    )
    print(
        f"  resume: a fresh model loaded step_{step:06d} and replayed steps {replayed.start}-"
        f"{replayed.stop - 1}: losses identical to the first run: {same}"
    )
    if not same:
        raise SystemExit("resumed training diverged from the original run")


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="aiostage-demo-") as tmp:
        root = Path(args.dir) if args.dir else Path(tmp)
        losses = await train(args, root)
        await resume(args, root, losses)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument(
        "--dir", default=None, help="keep the checkpoints here (default: a temp dir)"
    )
    anyio.run(main, parser.parse_args())
