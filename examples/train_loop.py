"""Demo: a training loop with async checkpoints on the CPU, a crash, and a resume.

A training process runs an MLP on synthetic data; each step runs in a worker thread (as an async
orchestrator would run it), so the event loop stays free, and a 1 ms heartbeat measures how late
the loop runs. Every ``--every`` steps ``aiostage.Checkpointer.save`` stages the model and
optimizer state (the only stall training sees) and writes it durably in the background, keeping
the newest three. At ``--crash-at`` the process kills itself with SIGKILL right after starting a
save. The demo then resumes from ``Checkpointer.latest()`` in a fresh model and optimizer: the
replayed steps must give the same losses as before the crash, and the whole run the losses of
the same run without aiostage.

    python examples/train_loop.py [--steps 60] [--every 10] [--crash-at 50] [--hidden 1024]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


async def train(args: argparse.Namespace, root: Path, losses: Path) -> None:
    """The training process: checkpoint every ``--every`` steps, die at ``--crash-at``."""
    model, opt = build(args.hidden)
    gc.collect()
    gc.freeze()  # start-up objects are never scanned again: no 100 ms collector pauses
    handles: list[aiostage.SaveHandle] = []
    async with LoopLag() as lag, aiostage.Checkpointer(root, keep_last=3) as ckpt:
        state = aiostage.train_state(model, opt)  # built in a worker thread at each save
        await ckpt.reserve(state)  # buffers ready before step 1
        began = time.perf_counter()
        for step in range(1, args.steps + 1):
            loss = await anyio.to_thread.run_sync(train_step, model, opt, step)
            with losses.open("a") as f:
                f.write(json.dumps([step, loss]) + "\n")
            if step % args.every:
                continue
            mark, t0 = lag.beats, time.perf_counter()
            handle = await ckpt.save(step, state, metadata={"loss": loss})  # returns once staged
            print(
                f"step {step:4d}  loss {loss:.4f}  stall {(time.perf_counter() - t0) * 1e3:5.1f} ms"
                f"  loop max lag {1e3 * max(lag.lateness[mark:], default=0.0):.2f} ms"
            )
            if step == args.crash_at:
                reports = [await h.report for h in handles]  # the saves before this one
                report(step, time.perf_counter() - began, reports, lag)
                print(f"\ncrash: SIGKILL at step {step}, its checkpoint still being written")
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            handles.append(handle)


def report(
    steps: int, trained: float, reports: list[aiostage.CheckpointReport], lag: LoopLag
) -> None:
    print("\nreport")
    print(f"  steps: {steps} in {trained:.2f} s ({steps / trained:.1f} steps/s)")
    if not reports:
        return
    stalls = [r.stall_seconds * 1e3 for r in reports]
    print(
        f"  checkpoints: {len(reports)} committed, {reports[-1].stage_bytes / 1e6:.1f} MB each; "
        f"training stall per checkpoint: median {statistics.median(stalls):.1f} ms, "
        f"max {max(stalls):.1f} ms"
    )
    stage = statistics.median(r.stage_gb_per_second for r in reports)
    persist = statistics.median(r.persist_gb_per_second for r in reports)
    print(
        f"  staging: median {stage:.2f} GB/s; background persistence (write + fsync + commit): "
        f"median {statistics.median(r.persist_seconds for r in reports) * 1e3:.0f} ms, "
        f"{persist:.2f} GB/s"
    )
    print(
        f"  event loop lag over the run: max {lag.max_ms:.2f} ms, p99 {lag.p99_ms:.2f} ms"
        f" ({lag.beats} heartbeats)"
    )


async def resume(args: argparse.Namespace, root: Path, losses: Path) -> None:
    """After the crash: resume from the latest committed checkpoint and check the replay."""
    before = dict(json.loads(line) for line in losses.read_text().splitlines())
    left = await aiostage.sweep(root)
    async with aiostage.Checkpointer(root, keep_last=3) as ckpt:
        step = await ckpt.latest()
        assert step is not None, "no committed checkpoint to resume from"
        model, opt = build(args.hidden)
        await ckpt.load(step, into=aiostage.train_state(model, opt))  # restored in place
        print(
            f"  resume: removed {len(left)} leftover(s) of the interrupted save; a fresh model "
            f"loaded step {step} (committed: {ckpt.steps()})"
        )
        replayed = range(step + 1, args.crash_at + 1)
        again = [await anyio.to_thread.run_sync(train_step, model, opt, s) for s in replayed]
        same = all(a == before[s] for a, s in zip(again, replayed, strict=True))
        print(
            f"  replayed steps {step + 1}-{args.crash_at}: losses identical to the first run: {same}"
        )
        if not same:
            raise SystemExit("resumed training diverged from the original run")
        for s in range(args.crash_at + 1, args.steps + 1):
            loss = await anyio.to_thread.run_sync(train_step, model, opt, s)
            if s % args.every == 0:
                await ckpt.save(s, aiostage.train_state(model, opt), metadata={"loss": loss})
            before[s] = loss
    print(f"  finished: steps up to {args.steps}, committed checkpoints {ckpt.steps()}")
    model, opt = build(args.hidden)  # the same run, never checkpointed
    plain = [await anyio.to_thread.run_sync(train_step, model, opt, s) for s in before]
    same = plain == list(before.values())
    print(f"  every loss identical to the same run without aiostage: {same}")
    if not same:
        raise SystemExit("checkpointing changed the numbers training produced")


def main(args: argparse.Namespace) -> None:
    if args.crash_at % args.every or not 0 < args.crash_at <= args.steps:
        raise SystemExit("--crash-at must be a checkpoint step (a multiple of --every)")
    with tempfile.TemporaryDirectory(prefix="aiostage-demo-") as tmp:
        root, losses = Path(tmp) / "checkpoints", Path(tmp) / "losses.jsonl"
        child = [sys.executable, __file__, *sys.argv[1:], "--role", "train", "--dir", tmp]
        done = subprocess.run(child, check=False)
        if done.returncode != -signal.SIGKILL:
            raise SystemExit(f"the training process should have been killed; it exited {done}")
        anyio.run(resume, args, root, losses)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--crash-at", type=int, default=50)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--role", choices=["demo", "train"], default="demo", help=argparse.SUPPRESS)
    parser.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.role == "train":
        d = Path(ns.dir)
        anyio.run(train, ns, d / "checkpoints", d / "losses.jsonl")
    else:
        main(ns)
