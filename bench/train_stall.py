"""Training-loop stall benchmark: what checkpointing every k steps costs a CPU training loop.

Run: ``.venv/bin/python bench/train_stall.py [--gib 1] [--every 10] [--checkpoints 3]``.
One process, one run, in turns: a model whose parameters plus AdamW state are about ``--gib``
GiB trains for ``every * checkpoints`` steps (each step in a worker thread, as an async
orchestrator runs it) with no checkpointing, then with aiostage ``Checkpointer.save``, DCP
``async_save`` (its default, and with its ``DefaultStager`` staging asynchronously on cached
buffers), and ``torch.save`` + fsync, every ``every`` steps. Before the clock starts, aiostage
reserves its buffers (``Checkpointer.reserve``) and DCP's caching stager stages once, so
neither pays for fresh memory inside the loop. Prints the training-visible stall
per checkpoint (the time the loop waits before it can take the next step, waiting for the
previous checkpoint included) and the slowdown of steps/s against no checkpointing.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import staging

sys.path.insert(0, str(Path(__file__).parent))

from _common import CpuSnapshot, table

import aiostage

Checkpoint = Callable[[int, dict[str, Any]], Awaitable[None]]
OURS, DCP_DEFAULT = "aiostage Checkpointer.save", "DCP async_save (default)"
DCP_ASYNC_STAGING = staging.StagingOptions(
    use_pinned_memory=False, use_shared_memory=False, use_async_staging=True,
    use_non_blocking_copy=False,
)  # fmt: skip


def build(gib: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Square linear layers: parameters + two AdamW moments come to about ``gib`` GiB."""
    torch.manual_seed(0)
    width = 2048
    layers = max(1, round(gib * (1 << 30) / (3 * 4 * width * width)))
    model = torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(layers)))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    x = torch.randn(16, 2048, generator=torch.Generator().manual_seed(step))
    loss = model(x).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def fsync_tree(root: Path) -> None:
    for p in [*root.rglob("*"), root]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


async def run(
    name: str, args: argparse.Namespace, root: Path, make: Callable[[], Any]
) -> dict[str, Any]:
    """Train with the checkpoint function ``make`` builds (an async context manager)."""
    model, opt = build(args.gib)
    await anyio.to_thread.run_sync(train_step, model, opt, 0)  # optimizer state exists
    gc.collect()
    stalls: list[float] = []
    steps = args.every * args.checkpoints
    ctx = make()
    async with ctx as checkpoint:
        if hasattr(ctx, "prepare"):  # set-up, before the clock starts (what a user would do)
            await ctx.prepare({"model": model.state_dict(), "optim": opt.state_dict()})
        began = time.perf_counter()
        for step in range(1, steps + 1):
            await anyio.to_thread.run_sync(train_step, model, opt, step)
            if checkpoint is not None and step % args.every == 0:
                sd = {"model": model.state_dict(), "optim": opt.state_dict()}
                t = time.perf_counter()
                await checkpoint(step, sd)
                stalls.append(time.perf_counter() - t)
        trained = time.perf_counter() - began
    return {"name": name, "steps/s": steps / trained, "stalls": stalls}


class _Ours:
    def __init__(self, root: Path) -> None:
        self.ckpt = aiostage.Checkpointer(root / "aiostage", keep_last=2)
        self.handles: list[aiostage.SaveHandle] = []

    async def __aenter__(self) -> Checkpoint:
        await self.ckpt.__aenter__()

        async def save(step: int, sd: dict[str, Any]) -> None:
            self.handles.append(await self.ckpt.save(step, sd))

        return save

    async def prepare(self, sd: dict[str, Any]) -> None:
        await self.ckpt.reserve(sd)  # buffers allocated and faulted in before training

    async def __aexit__(self, *exc: object) -> None:
        await self.ckpt.aclose()
        for h in self.handles:
            r = await h.report
            print(
                f"  aiostage step {r.step}: stall {r.stall_seconds * 1e3:.1f} ms = waiting for the "
                f"previous save {r.wait_seconds * 1e3:.1f} ms + staging {r.stage_seconds * 1e3:.1f}"
                f" ms ({r.stage_gb_per_second:.2f} GB/s); persisted in {r.persist_seconds:.2f} s"
            )


class _Dcp:
    def __init__(self, root: Path, staged_async: bool) -> None:
        self.root, self.staged_async = root, staged_async
        self.pending: Any = None
        self.stager = staging.DefaultStager(DCP_ASYNC_STAGING) if staged_async else None

    async def __aenter__(self) -> Checkpoint:
        async def save(step: int, sd: dict[str, Any]) -> None:
            if self.pending is not None:  # DCP's pattern: the previous save must be done
                await asyncio.wrap_future(self.pending)
            out = dcp.async_save(
                sd, checkpoint_id=self.root / f"dcp_{step}", async_stager=self.stager
            )
            if self.staged_async:
                await asyncio.wrap_future(out.staging_completion)  # before the next step
                self.pending = out.upload_completion
            else:
                self.pending = out

        return save

    async def prepare(self, sd: dict[str, Any]) -> None:
        if self.stager is not None:  # the same warm-up for DCP's caching stager: stage once
            await asyncio.wrap_future(self.stager.stage(sd))  # type: ignore[arg-type]

    async def __aexit__(self, *exc: object) -> None:
        if self.pending is not None:
            await asyncio.wrap_future(self.pending)
        if self.stager is not None:
            self.stager.close()


class _TorchSave:
    def __init__(self, root: Path) -> None:
        self.root = root

    async def __aenter__(self) -> Checkpoint:
        async def save(step: int, sd: dict[str, Any]) -> None:
            path = self.root / f"torch_{step}.pt"
            torch.save(sd, path)  # blocks the loop: what a plain training loop does
            fsync_tree(path)

        return save

    async def __aexit__(self, *exc: object) -> None:
        pass


class _Nothing:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        pass


async def main(args: argparse.Namespace) -> None:
    warnings.filterwarnings("ignore", category=UserWarning)  # DCP without a process group
    start = CpuSnapshot.now()
    with tempfile.TemporaryDirectory(dir=Path(__file__).parent / "out") as tmp:
        root = Path(tmp)
        contenders: list[tuple[str, Callable[[], Any]]] = [
            ("no checkpointing", _Nothing),
            (OURS, lambda: _Ours(root)),
            (DCP_DEFAULT, lambda: _Dcp(root, staged_async=False)),
            ("DCP async_save + DefaultStager(async staging)", lambda: _Dcp(root, True)),
            ("torch.save + fsync", lambda: _TorchSave(root)),
        ]
        await run("warm-up", argparse.Namespace(**{**vars(args), "checkpoints": 1}), root, _Nothing)
        results = [await run(name, args, root, make) for name, make in contenders]
    print(report(results, args))
    print(f"\nbackground: {CpuSnapshot.now().others_since(start)}")


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    base = results[0]["steps/s"]
    rows = []
    for r in results:
        s = [x * 1e3 for x in r["stalls"]]
        cells = [f"{statistics.median(s):.1f}", f"{max(s):.1f}"] if s else ["-", "-"]
        rows.append([r["name"], *cells, f"{r['steps/s']:.2f}", f"{base / r['steps/s']:.3f}"])
    med = {r["name"]: statistics.median(r["stalls"]) for r in results if r["stalls"]}
    ours = med[OURS]
    ratios = [
        [f"aiostage stall / {n}", f"{ours / v:.2f}", "<= 0.5" if n == DCP_DEFAULT else ""]
        for n, v in med.items()
        if n != OURS
    ]
    slow = {r["name"]: base / r["steps/s"] for r in results[1:]}
    lowest = all(slow[OURS] < v for n, v in slow.items() if n != OURS)
    ratios.append(["aiostage slowdown lower than every anchor's", str(lowest), "True"])
    return (
        f"{args.gib} GiB of parameters + AdamW state, a checkpoint every {args.every} steps, "
        f"{args.checkpoints} checkpoints per contender\n\n"
        + table(["contender", "stall median ms", "stall max ms", "steps/s", "slowdown"], rows)
        + "\n\n"
        + table(["ratio (median stall)", "value", "target"], ratios)
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--checkpoints", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
