"""Example: DDP on gloo under torchrun, checkpointed by aiostage with replication on.

Each rank trains a DDP-wrapped MLP on its own shard of synthetic data. Every ``--every`` steps
``Checkpointer.save`` stages the state; in the background each rank's staged state goes to its
partner rank's memory (``replicate=True``) and every rank writes its file of the shared
checkpoint. At the end rank 1 "loses" its state: it gets it back from rank 0's memory
(``Checkpointer.recover``) and, for comparison, from disk; both must equal what it had.

    torchrun --nproc-per-node 2 examples/torchrun_ddp.py [--steps 40] [--every 10]
    python examples/torchrun_ddp.py ...   # launches torchrun itself
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import anyio
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import aiostage
from aiostage.testing import assert_state_dict_equal


def build(hidden: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(32, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 1)
    )
    model = DistributedDataParallel(net)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int, rank: int) -> float:
    gen = torch.Generator().manual_seed(step * 1000 + rank)
    x = torch.randn(128, 32, generator=gen)
    loss = torch.nn.functional.mse_loss(model(x), x[:, :1].cos())
    opt.zero_grad()
    loss.backward()  # DDP all-reduces the gradients on the default group
    opt.step()
    return loss.item()


async def run(args: argparse.Namespace) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    model, opt = build(args.hidden)
    handles = []
    async with aiostage.Checkpointer(
        args.dir, pg=dist.group.WORLD, replicate=True, keep_last=2
    ) as ckpt:
        for step in range(1, args.steps + 1):
            loss = await anyio.to_thread.run_sync(train_step, model, opt, step, rank)
            if step % args.every == 0:
                handles.append(await ckpt.save(step, aiostage.train_state(model, opt)))
                if rank == 0:
                    print(f"step {step:4d}  loss {loss:.4f}  staged (saving in the background)")
        reports = [await h.report for h in handles]
        mine = await aiostage.train_state(model, opt).state_dict()
        began = time.perf_counter()
        got = await ckpt.recover(lost=rank == 1, like=mine)
        from_peer = time.perf_counter() - began
        began = time.perf_counter()
        from_disk = await ckpt.load()
        disk = time.perf_counter() - began
        if rank == 1:
            assert_state_dict_equal(got, mine)
        assert_state_dict_equal(from_disk, mine)
        steps = ckpt.steps()
    if rank == 0:
        show(reports, world, steps, from_peer, disk)


def show(
    reports: list[aiostage.CheckpointReport], world: int, steps: list[int], peer: float, disk: float
) -> None:
    ms = statistics.median
    print("\nreport")
    print(f"  ranks: {world} (gloo); committed checkpoints: {steps}")
    print(
        f"  per save on rank 0 (median of {len(reports)}): stall {ms(r.stall_seconds for r in reports) * 1e3:.1f} ms "
        f"(waiting for the previous save {ms(r.wait_seconds for r in reports) * 1e3:.1f} ms), "
        f"replicate to the partner {ms(r.replicate_seconds for r in reports) * 1e3:.1f} ms, "
        f"persist {ms(r.persist_seconds for r in reports) * 1e3:.1f} ms, "
        f"{reports[-1].stage_bytes / 1e6:.2f} MB"
    )
    print(
        f"  rank 1's state recovered from rank 0's memory in {peer * 1e3:.1f} ms "
        f"(reading the checkpoint from disk: {disk * 1e3:.1f} ms); both identical to its own"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--dir", default=None, help="the shared checkpoint root")
    args = parser.parse_args()
    if "LOCAL_RANK" not in os.environ:  # not under torchrun: launch it
        with tempfile.TemporaryDirectory(prefix="aiostage-ddp-") as tmp:
            extra = [] if args.dir else ["--dir", tmp]
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            cmd += ["--nproc-per-node", "2", __file__, *sys.argv[1:], *extra]
            raise SystemExit(subprocess.run(cmd, check=False).returncode)
    if args.dir is None:
        raise SystemExit("under torchrun, pass --dir (a directory every rank can reach)")
    dist.init_process_group("gloo")
    try:
        anyio.run(run, args)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
