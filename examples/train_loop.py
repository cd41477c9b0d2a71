"""Demo: train a small MLP on synthetic data inside an asyncio loop, staging its state every N steps.

Each training step runs in a worker thread (as an async orchestrator would run it), so the event
loop stays free for other work; a 1 ms heartbeat measures how late the loop runs. Every
``--every`` steps the model and optimizer state are staged with ``aiostage.DefaultStager``: the
step waits only for the copy (the training-visible stall), then the staged copy is released.

    python examples/train_loop.py [--steps 60] [--every 10] [--hidden 1024]
"""

from __future__ import annotations

import argparse
import statistics
import time
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


def state_of(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    return {"model": model.state_dict(), "optim": opt.state_dict(), "step": step}


def nbytes(state: Any) -> int:
    if isinstance(state, torch.Tensor):
        return state.nbytes
    if isinstance(state, dict):
        return sum(nbytes(v) for v in state.values())
    if isinstance(state, list | tuple):
        return sum(nbytes(v) for v in state)
    return 0


async def main(steps: int, every: int, hidden: int) -> None:
    model, opt = build(hidden)
    rows: list[tuple[int, float, float, float]] = []
    async with LoopLag() as lag, aiostage.DefaultStager() as stager:
        began = time.perf_counter()
        for step in range(1, steps + 1):
            loss = await anyio.to_thread.run_sync(train_step, model, opt, step)
            if step % every:
                continue
            sd = state_of(model, opt, step)
            mark, t0 = lag.beats, time.perf_counter()
            staged = await stager.stage(sd)
            stall = time.perf_counter() - t0
            rows.append(
                (step, stall, nbytes(sd) / stall / 1e9, 1e3 * max(lag.lateness[mark:], default=0.0))
            )
            print(
                f"step {step:4d}  loss {loss:.4f}  staged {nbytes(sd) / 1e6:.1f} MB in "
                f"{stall * 1e3:6.1f} ms  ({rows[-1][2]:5.2f} GB/s)  loop max lag {rows[-1][3]:.2f} ms"
            )
            stager.release(staged)
        elapsed = time.perf_counter() - began
    stalls = [r[1] * 1e3 for r in rows]
    print("\nreport")
    print(
        f"  steps: {steps} in {elapsed:.2f} s ({steps / elapsed:.1f} steps/s), stages: {len(rows)}"
    )
    print(
        f"  stall per stage: median {statistics.median(stalls):.1f} ms, max {max(stalls):.1f} ms"
        f" (first stage allocates: {stalls[0]:.1f} ms)"
    )
    print(f"  staging throughput: median {statistics.median(r[2] for r in rows):.2f} GB/s")
    print(
        f"  event loop lag over the run: max {lag.max_ms:.2f} ms, p99 {lag.p99_ms:.2f} ms"
        f" ({lag.beats} heartbeats)"
    )
    print(f"  buffers: {stager.statistics().allocations} allocation(s) for {len(rows)} stages")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=1024)
    args = parser.parse_args()
    anyio.run(main, args.steps, args.every, args.hidden)
