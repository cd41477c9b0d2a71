"""Weight-sync benchmark: one publisher pushes a ~1 GiB state dict (~200 tensors) to 2 subscribers.

Run: ``.venv/bin/python bench/weight_sync.py [--gib 1] [--reps 3] [--runs K] [--no-verify] [--shared-memory] [--copy] [--stalls]``. Three gloo
ranks on loopback; rank 0 publishes, ranks 1 and 2 answer a request (a few matmuls that read the
weights) every ``--interval-ms`` the whole time. Contenders, in rounds: raw ``dist.broadcast``
of one flat tensor of the same bytes; a raw copy of the state dict into that (warm) flat tensor,
then its raw broadcast (what a publish that copies cannot avoid); ``WeightPublisher.publish``
(staging + both sends; and until both subscribers installed it); ``torch.save`` to a file + ``torch.load`` and copy into the
target on both subscribers. Then an idle period. The first two rounds are dropped (page faults of
fresh buffers). Times are medians over rounds; request latencies include queueing. Requests
read the weights inside ``sub.reading()``; install is double-buffered (the default) or by copy
(``--copy``). ``--runs K`` repeats the whole measurement and prints, per run, publish beside the
raw broadcast and the serving p99 ratio beside the raw broadcast's, with the median and worst
of each ratio (also against the raw copy + raw broadcast). Each rank counts its CPU seconds
(every thread) between the barriers that bound each phase: on a CPU-bound host a phase cannot end
sooner than its CPU over the cores. ``--stalls`` samples the publisher's loop thread during each publish, and each subscriber's
during each update, while its heartbeat is more than 2 ms overdue (``LoopLag(stalls=...)``).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import torch
import torch.distributed as dist
from _lib import shapes
from _lib.machine import run_spawned
from _lib.report import GB, Ratio, Report, add_report_arguments, start
from _lib.runs import Figure, add_runs, add_stalls, merge_stalls, stalls_seen
from _lib.timing import Heartbeat, percentile_ms

import aiostage

WARMUP = 2  # rounds dropped: the two staging and two receive buffers are allocated in them


def barrier() -> None:
    dist.barrier()


@dataclass
class Serving:
    """A subscriber's request loop: latency samples by phase, and who is waiting for a version."""

    sub: aiostage.WeightSubscriber
    weights: list[torch.Tensor]
    interval: float
    phase: str = "warmup"
    samples: dict[str, list[float]] = field(default_factory=dict)
    applied: anyio.Event = field(default_factory=anyio.Event)
    want: int = -1
    stop: bool = False

    def request(self, x: torch.Tensor) -> None:
        # one thread, as the rank set for itself: torch's thread count is per thread for MKL,
        # and a worker left at the default keeps an OpenMP thread spinning (a whole core of
        # this host) between requests, in whichever phase it happens to start
        torch.set_num_threads(1)
        for w in self.weights:
            (x @ w[: x.shape[1]]).sum()

    async def run(self) -> None:
        x = torch.randn(4, self.weights[0].shape[0] // 4)
        due = time.perf_counter()
        while not self.stop:
            await anyio.sleep(max(0.0, due - time.perf_counter()))
            during = self.sub.receiving
            update = self.sub.pending
            if update is not None:
                await update.apply()
                during = True
                if self.sub.version is not None and self.sub.version >= self.want:
                    self.applied.set()
            async with self.sub.reading():
                await anyio.to_thread.run_sync(self.request, x)
            took = time.perf_counter() - due
            key = self.phase + (" (update landing/installing)" if during else "")
            self.samples.setdefault(key, []).append(took)
            due = max(due + self.interval, time.perf_counter() - self.interval)


def _took(out: dict[str, list[float]], name: str, began: float) -> None:
    out.setdefault(name, []).append(time.perf_counter() - began)


#: the phases whose CPU seconds every rank counts (between the same barriers)
CPU_PHASES = ("raw broadcast", "raw copy + raw broadcast", "aiostage publish + install")


def _cpu() -> float:
    """This process's CPU seconds so far (every thread, gloo's included)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _mark(cpu: list[float]) -> None:
    """A barrier, then this rank's CPU seconds at it (phase boundaries every rank shares)."""
    await anyio.to_thread.run_sync(barrier)
    cpu.append(_cpu())


def _phase_cpu(marks: list[float], into: dict[str, list[float]]) -> None:
    """One round's marks (four barriers) as the CPU seconds of each of ``CPU_PHASES``."""
    for name, a, b in zip(CPU_PHASES, marks, marks[1:], strict=False):
        into.setdefault(name, []).append(b - a)


async def _publisher(sd: dict[str, Any], args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    n = shapes.unique_bytes(sd)
    flat = torch.ones(n // 4)
    into = _into_flat(sd, flat)
    await anyio.to_thread.run_sync(lambda: dist.broadcast(torch.tensor([n]), 0))
    out: dict[str, list[float]] = {}
    async with aiostage.WeightPublisher(
        subscribers=[1, 2], timeout=600, verify=args.verify, shared_memory=args.shared_memory
    ) as pub:
        await pub.wait_for_subscribers()  # none is "absent" from the first report
        stalls, cpu = [], {}
        for version in range(1, args.reps + WARMUP + 1):
            marks: list[float] = []
            async with Heartbeat(stalls=0.002 if args.stalls else None) as lag:
                await _publisher_round(
                    pub, sd, flat, into, version, Path(tmp) / "handoff.pt", out, marks
                )
            stalls.append(stalls_seen(lag.stalls))
            if version > WARMUP:
                _phase_cpu(marks, cpu)
        await anyio.to_thread.run_sync(barrier)  # idle period
        await anyio.to_thread.run_sync(barrier)
    times = {k: v[WARMUP:] for k, v in out.items()}
    flags = {"shared": args.shared_memory, "swap": not args.copy, "verify": args.verify}
    stalled = stalls[WARMUP:] if args.stalls else []
    return {"times": times, "bytes": n, "stalls": stalled, "cpu": cpu, **flags}


def _into_flat(sd: dict[str, Any], flat: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(source, destination)`` byte views: each unique storage of ``sd`` to its slice of
    ``flat`` (the raw copy a copying publish cannot avoid, before the raw broadcast)."""
    pairs, at, out = [], 0, flat.view(torch.uint8)
    for s in shapes.unique_storages(sd):
        src = torch.empty(0, dtype=torch.uint8).set_(s)
        pairs.append((src, out[at : at + s.nbytes()]))
        at += s.nbytes()
    return pairs


def _raw_copy(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for src, dst in pairs:
        dst.copy_(src)


async def _publisher_round(
    pub: aiostage.WeightPublisher,
    sd: dict[str, Any],
    flat: torch.Tensor,
    into: list[tuple[torch.Tensor, torch.Tensor]],
    version: int,
    path: Path,
    out: dict[str, list[float]],
    cpu: list[float],
) -> None:
    await _mark(cpu)
    began = time.perf_counter()
    await anyio.to_thread.run_sync(lambda: dist.broadcast(flat, 0))
    _took(out, "raw dist.broadcast (one flat tensor)", began)
    await _mark(cpu)
    began = time.perf_counter()
    await anyio.to_thread.run_sync(_raw_copy, into)
    _took(out, "raw copy only (into a warm flat buffer)", began)
    await anyio.to_thread.run_sync(lambda: dist.broadcast(flat, 0))
    _took(out, "raw copy + raw dist.broadcast of it", began)
    await _mark(cpu)
    began = time.perf_counter()
    report = await pub.publish(sd, version)
    _took(out, "aiostage publish (stage + send to both)", began)
    assert report.delivered == [1, 2], report
    out.setdefault("aiostage stage only", []).append(report.stage_seconds)
    await _mark(cpu)  # both installed it
    _took(out, "aiostage publish + install on both", began)
    await anyio.to_thread.run_sync(barrier)
    began = time.perf_counter()
    await anyio.to_thread.run_sync(torch.save, sd, path)
    await anyio.to_thread.run_sync(barrier)  # the file is there
    await anyio.to_thread.run_sync(barrier)  # both loaded and installed it
    _took(out, "torch.save + torch.load + install on both", began)
    await anyio.to_thread.run_sync(path.unlink)


async def _subscriber(args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    layout = shapes.flat(args.gib).state_dict(fill=lambda s: torch.empty(s, device="meta"))
    target = {
        k: torch.zeros(v.shape, dtype=v.dtype)
        for k, v in layout.items()
        if isinstance(v, torch.Tensor)
    }
    n = torch.zeros(1, dtype=torch.int64)
    await anyio.to_thread.run_sync(lambda: dist.broadcast(n, 0))
    flat = torch.empty(int(n) // 4)
    weights = [v for k, v in target.items() if k.endswith("mlp.up.weight")][:4]
    async with aiostage.WeightSubscriber(
        publisher=0, target=target, timeout=600, verify=args.verify, swap=not args.copy
    ) as sub:
        serving = Serving(sub, weights, args.interval_ms / 1e3)
        stalls, cpu = [], {}
        async with anyio.create_task_group() as tg:
            tg.start_soon(serving.run)
            for version in range(1, args.reps + WARMUP + 1):
                marks: list[float] = []
                seen = await _round(
                    serving, version, flat, target, Path(tmp) / "handoff.pt", args, marks
                )
                stalls += [seen] if seen is not None and version > WARMUP else []
                if version > WARMUP:
                    _phase_cpu(marks, cpu)
            await anyio.to_thread.run_sync(barrier)
            serving.phase = "idle"
            await anyio.sleep(args.idle_s)  # a measurement period, not synchronisation
            serving.phase = "done"
            await anyio.to_thread.run_sync(barrier)
            serving.stop = True
    return {"samples": serving.samples, "stalls": stalls, "cpu": cpu}


async def _round(
    serving: Serving,
    version: int,
    flat: torch.Tensor,
    target: dict[str, torch.Tensor],
    path: Path,
    args: argparse.Namespace,
    cpu: list[float],
) -> dict[str, Any] | None:
    """One round on a subscriber; its loop's stalls during the update (``--stalls``)."""
    first = version <= WARMUP
    await _mark(cpu)
    serving.phase = "warmup" if first else "raw broadcast"
    await anyio.to_thread.run_sync(lambda: dist.broadcast(flat, 0))
    await _mark(cpu)
    serving.phase = "warmup" if first else "raw copy + raw broadcast"
    await anyio.to_thread.run_sync(lambda: dist.broadcast(flat, 0))
    await _mark(cpu)
    serving.phase = "warmup" if first else "aiostage update"
    serving.want, serving.applied = version, anyio.Event()
    async with Heartbeat(stalls=0.002 if args.stalls else None) as lag:
        if serving.sub.version != version:
            await serving.applied.wait()
    await _mark(cpu)
    await anyio.to_thread.run_sync(barrier)
    serving.phase = "warmup" if first else "torch.save/load hand-off"
    await anyio.to_thread.run_sync(barrier)
    await anyio.to_thread.run_sync(_load_into, path, target)
    await anyio.to_thread.run_sync(barrier)
    serving.phase = "between"
    return stalls_seen(lag.stalls) if args.stalls else None


def _load_into(path: Path, target: dict[str, torch.Tensor]) -> None:
    loaded = torch.load(path, weights_only=True)
    with torch.no_grad():
        for k, t in target.items():
            t.copy_(loaded[k])


async def _rank(rank: int, world: int, args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    torch.set_num_threads(1)
    if rank == 0:
        return await _publisher(shapes.flat(args.gib).state_dict(), args, tmp)
    return await _subscriber(args, tmp)


def _latencies(results: list[dict[str, Any]]) -> tuple[list[list[Any]], dict[Any, float]]:
    """Request latency rows per subscriber and phase, and the p99 of each."""
    lat_rows: list[list[Any]] = []
    p99: dict[Any, float] = {}
    for rank, r in enumerate(results[1:], start=1):
        for phase, s in sorted(r["samples"].items()):
            if phase in ("warmup", "between", "done"):
                continue
            p99[(rank, phase)] = percentile_ms(s, 99)
            lat_rows.append(
                [rank, phase, len(s), f"{percentile_ms(s, 50):.2f}", f"{p99[(rank, phase)]:.2f}"]
            )
    return lat_rows, p99


def _p99_ratios(results: list[dict[str, Any]]) -> tuple[float, float]:
    """The serving p99 during an aiostage update and during the raw broadcast, each over the
    idle p99 (the worse subscriber)."""
    p99 = _latencies(results)[1]
    during = "aiostage update (update landing/installing)"

    def worst(phase: str) -> float:
        return max(p99.get((r, phase), float("nan")) / p99[(r, "idle")] for r in (1, 2))

    return worst(during), worst("raw broadcast")


def _run_figures(results: list[dict[str, Any]]) -> list[Figure]:
    """One run's figures: aiostage beside the raw broadcast measured in the same run."""
    med = {k: statistics.median(v) for k, v in results[0]["times"].items()}
    bcast = med["raw dist.broadcast (one flat tensor)"]
    pub = med["aiostage publish (stage + send to both)"]
    both = med["raw copy + raw dist.broadcast of it"]
    ours, raw = _p99_ratios(results)
    # on a host whose cores the transfer keeps busy, time follows CPU: both near the core count
    cpu_raw, cpu_ours = (_all_ranks_cpu(results, phase) for phase in (CPU_PHASES[0], CPU_PHASES[2]))
    installed = med["aiostage publish + install on both"]
    busy_raw, busy_ours = cpu_raw / bcast, cpu_ours / installed
    return [
        Figure("raw broadcast / publish (throughput), ms", 1e3 * pub, 1e3 * bcast, bcast / pub, 0.85),
        Figure("(raw copy + raw broadcast) / publish (throughput), ms", 1e3 * pub, 1e3 * both, both / pub),
        Figure("serving p99/idle during an update / the raw broadcast's", ours, raw, ours / raw, 1.2, False),
        Figure("raw broadcast / (publish + install on both), ms", 1e3 * installed, 1e3 * bcast, bcast / installed),
        Figure("CPU of all ranks: raw broadcast's / publish + install's, s", cpu_ours, cpu_raw, cpu_raw / cpu_ours),
        Figure("cores busy (all ranks' CPU / wall): publish + install, raw broadcast", busy_ours, busy_raw, busy_ours / busy_raw),
    ]  # fmt: skip


def _all_ranks_cpu(results: list[dict[str, Any]], phase: str) -> float:
    """The median over rounds of ``phase``'s CPU seconds summed over the ranks."""
    return statistics.median(sum(v) for v in zip(*(r["cpu"][phase] for r in results), strict=True))


def _ratios(
    bcast: float, pub: float, installed: float, handoff: float, worst: float, floor: float
) -> list[Ratio]:
    """The ratios against the issue's targets."""
    return [
        Ratio("publish throughput / raw broadcast throughput", bcast / pub),
        Ratio("(publish + install) throughput / raw broadcast throughput", bcast / installed),
        Ratio("torch.save/load hand-off time / publish + install time", handoff / installed),
        Ratio("serving p99 during an update / idle p99 (worse subscriber)", worst),
        Ratio("reference: serving p99 during the raw broadcast / idle p99 (worse)", floor),
    ]


def _cpu_rows(results: list[dict[str, Any]]) -> list[list[Any]]:
    """Each phase's CPU seconds per rank and over all three (the medians over rounds): on a
    CPU-bound host a phase cannot end sooner than its CPU over the cores."""
    rows = []
    for phase in CPU_PHASES:
        each = [statistics.median(r["cpu"][phase]) for r in results]
        total = _all_ranks_cpu(results, phase)
        rows.append([phase, *(f"{x:.3f}" for x in each), f"{total:.3f}"])
    return rows


def _report(results: list[dict[str, Any]], report: Report) -> None:
    n, times = results[0]["bytes"], results[0]["times"]
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [
        [k, f"{1e3 * min(times[k]):.1f}", f"{1e3 * m:.1f}", f"{n / m / GB:.2f}"]
        for k, m in med.items()
    ]
    lat_rows = _latencies(results)[0]
    bcast, pub = (
        med["raw dist.broadcast (one flat tensor)"],
        med["aiostage publish (stage + send to both)"],
    )
    installed, handoff = (
        med["aiostage publish + install on both"],
        med["torch.save + torch.load + install on both"],
    )
    worst, floor = _p99_ratios(results)
    r0 = results[0]
    via = "shared memory (same-host fast path)" if r0["shared"] else "gloo on loopback"
    via += ", install double-buffered (swap)" if r0["swap"] else ", install by copy"
    via += "" if r0["verify"] else ", verify=False"
    title = f"{n / GB:.3f} GB unique, 1 publisher -> 2 subscribers, aiostage via {via}"
    report.add(title, ["figure", "min ms", "median ms", "GB/s (median)"], rows)
    report.add("serving latency", ["subscriber", "phase", "requests", "p50 ms", "p99 ms"], lat_rows)
    report.add(
        "CPU seconds per phase, median over rounds (subscribers' include their serving)",
        ["phase", "publisher", "subscriber 1", "subscriber 2", "all ranks"],
        _cpu_rows(results),
    )
    report.figures["weight_sync"] = {
        k: {"seconds": v, "median_s": med[k], "bytes": n} for k, v in times.items()
    }
    report.ratios += _ratios(bcast, pub, installed, handoff, worst, floor)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--interval-ms", type=float, default=5.0)
    parser.add_argument("--idle-s", type=float, default=3.0)
    parser.add_argument("--no-verify", dest="verify", action="store_false")
    parser.add_argument("--shared-memory", action="store_true", help="the same-host fast path")
    parser.add_argument("--copy", action="store_true", help="subscribers install by copy")
    parser.add_argument("--runs", type=int, default=1, help="repeat the whole measurement")
    parser.add_argument("--stalls", action="store_true", help="sample the loop during a stall")
    add_report_arguments(parser)
    args = parser.parse_args()
    report = start("weight_sync", args)
    report.children = True
    report.shape = shapes.flat(args.gib).describe()
    runs, traced, served = [], [], []
    for _ in range(args.runs):
        results, report.background = run_spawned("weight_sync_", 3, _rank, args)
        runs.append(_run_figures(results))
        traced += results[0]["stalls"]
        served += [s for r in results[1:] for s in r["stalls"]]
    _report(results, report)  # the last run's tables
    add_runs(report, runs)
    if traced:
        add_stalls(report, "publisher loop stalls during a round", merge_stalls(traced))
    if served:
        add_stalls(report, "subscriber loop stalls during an update", merge_stalls(served))
    report.finish(args.json)


if __name__ == "__main__":
    main()
