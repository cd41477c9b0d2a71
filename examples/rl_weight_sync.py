"""Demo: a trainer pushes fresh weights to two serving processes on the CPU, printing a report.

Three spawned processes share one gloo group (``aiostage.testing.run_world``). Rank 0 trains an
MLP in a worker thread and, every ``--every`` steps, hands its weights to
``aiostage.WeightPublisher.submit`` (training resumes as soon as they are staged). Ranks 1 and 2
answer a request every ``--interval-ms`` with a forward pass, and install each update that has
arrived between two requests (``sub.pending`` / ``update.apply()``), so no request mixes two
versions. The report gives each version's update latency (staging,
transfer, install) and the serving latency p50/p99 (queueing included) while an update is landing
or being installed, against the idle requests.

    python examples/rl_weight_sync.py [--hidden 2048] [--steps 40] [--every 8] [--interval-ms 5]
        [--shared-memory] [--copy]
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import anyio
import anyio.to_thread
import torch

import aiostage
from aiostage.testing import run_world


def build(hidden: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, hidden),
        torch.nn.GELU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.GELU(),
        torch.nn.Linear(hidden, 8),
    )


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(step))
    loss = model(x).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


async def trainer(args: argparse.Namespace, world: int) -> dict[str, Any]:
    model = build(args.hidden)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    publications = []
    shared = args.shared_memory
    async with aiostage.WeightPublisher(
        subscribers=range(1, world), timeout=60, shared_memory=shared
    ) as pub:
        with anyio.fail_after(120):
            await pub.wait_for_subscribers()  # every server is up: the first version reaches all
        for step in range(1, args.steps + 1):
            await anyio.to_thread.run_sync(train_step, model, opt, step)
            if step % args.every == 0:  # staged, then sent while training goes on
                publications.append(await pub.submit(model.state_dict(), step))
        reports = [await p.report for p in publications]
    rows = []
    for r in reports:
        sent = {peer: (d.status, d.seconds) for peer, d in r.deliveries.items()}
        rows.append((r.version, r.stage_seconds, r.seconds, sent))
    return {"rows": rows, "nbytes": reports[-1].nbytes if reports else 0}


def answer(model: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        model(x)
        first = next(model.parameters())
        assert math.isfinite(float(first.sum()))


async def server(args: argparse.Namespace) -> dict[str, Any]:
    model = build(args.hidden)
    x = torch.randn(4, 64)
    idle: list[float] = []
    busy: list[float] = []
    installs: dict[int, float] = {}
    interval = args.interval_ms / 1e3
    async with aiostage.WeightSubscriber(
        publisher=0, target=model, timeout=60, swap=not args.copy
    ) as sub:
        due = time.perf_counter()
        # serve until the trainer closed its publisher and its last version is installed
        while not (sub.ended and sub.pending is None) or len(idle) < 50:
            await anyio.sleep(max(0.0, due - time.perf_counter()))
            during = sub.receiving
            update = sub.pending
            if update is not None:
                began = time.perf_counter()
                version = await update.apply()
                installs[version] = time.perf_counter() - began
                during = True
            await anyio.to_thread.run_sync(answer, model, x)
            (busy if during or sub.receiving else idle).append(time.perf_counter() - due)
            due = max(due + interval, time.perf_counter() - interval)  # no catch-up burst
        if sub.error is not None:
            raise sub.error  # the stream broke instead of ending
        return {"idle": idle, "busy": busy, "installs": installs, "skipped": sub.skipped}


async def rank_main(rank: int, world: int, args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    return await (trainer(args, world) if rank == 0 else server(args))


def pct(samples: list[float], q: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return 1e3 * ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)]


def show(results: list[dict[str, Any]]) -> None:
    train, servers = results[0], results[1:]
    print(f"weights: {train['nbytes'] / 1e6:.1f} MB per version, {len(servers)} subscribers")
    print("version | stage ms | publish ms (until every subscriber has it) | per subscriber")
    for version, stage, total, sent in train["rows"]:
        each = ", ".join(
            f"rank {p}: {s}" + (f" {1e3 * t:.1f} ms" if s == "delivered" else "")
            for p, (s, t) in sent.items()
        )
        installs = ", ".join(
            f"{1e3 * s['installs'][version]:.1f}" for s in servers if version in s["installs"]
        )
        print(
            f"{version:7d} | {1e3 * stage:8.1f} | {1e3 * total:10.1f} | {each}; install ms: {installs}"
        )
    for rank, s in enumerate(servers, start=1):
        print(
            f"rank {rank} requests: idle p50 {pct(s['idle'], 50):.2f} ms p99 {pct(s['idle'], 99):.2f} ms "
            f"(n={len(s['idle'])}); during updates p50 {pct(s['busy'], 50):.2f} ms "
            f"p99 {pct(s['busy'], 99):.2f} ms (n={len(s['busy'])}); skipped versions {s['skipped']}"
        )
    last = train["rows"][-1][0] if train["rows"] else None
    print(
        f"report: {len(train['rows'])} versions published; every subscriber installed version {last}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=8)
    parser.add_argument("--interval-ms", type=float, default=5.0)
    parser.add_argument("--shared-memory", action="store_true", help="the same-host fast path")
    parser.add_argument(
        "--copy",
        action="store_true",
        help="install by copying into the model (not double-buffered)",
    )
    args = parser.parse_args()
    show(run_world(rank_main, 3, args, timeout=600))


if __name__ == "__main__":
    main()
