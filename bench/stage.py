"""Staging benchmark: aiostage's DefaultStager against the raw per-tensor ``copy_`` loop and
DCP's stagers, time and event-loop lag, at a state-dict shape.

Run: ``.venv/bin/python bench/stage.py [--shape flat|small|transformer|moe | --tensors N
--tensor-kib K] [--gib 1] [--reps 5] [--flat-reps 50] [--json PATH]``. Contenders of a group run
round-robin (one rep each per round), so drift on a shared machine hits all alike; the loop lag
is a 1 ms heartbeat's lateness during each operation.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import anyio.to_thread
import psutil
import torch
from _lib import anchors, shapes
from _lib.report import GB, Ratio, Report, add_report_arguments, speedup, start
from _lib.timing import Case, Heartbeat, Timing, run_rounds, timings
from torch.distributed.checkpoint import staging as dcp

import aiostage
from aiostage.testing import assert_state_dict_equal

RAW = "raw copy_ loop, one call per tensor, worker thread"
WARM = "aiostage DefaultStager, warm"
DCP_SYNC = "DCP DefaultStager(sync), warm, on the loop"
DCP_ASYNC = "DCP DefaultStager(async), warm"
COLD = "aiostage DefaultStager, cold (fresh stager)"
DCP_COLD = "DCP DefaultStager(async), cold (fresh stager)"
HEADER = (
    "contender",
    "min",
    "median",
    "GB/s (median; best)",
    "loop max lag ms (min / median / worst rep)",
    "p99 lag ms (pooled)",
)


def row(name: str, t: Timing, nbytes: int) -> list[str]:
    lags = t.max_lag_ms
    return [
        name,
        f"{t.min * 1e3:.1f} ms",
        f"{t.median * 1e3:.1f} ms",
        f"{nbytes / GB / t.median:.2f} ({nbytes / GB / t.min:.2f})",
        f"{min(lags):.1f} / {statistics.median(lags):.1f} / {max(lags):.1f}",
        f"{t.p99_ms:.1f}",
    ]


# ---------------------------------------------------------------- contenders


def raw_copy(sd: Any) -> Case:
    pairs = anchors.copy_pairs(sd)

    async def op() -> None:
        await anyio.to_thread.run_sync(anchors.copy_loop, pairs)

    return Case(RAW, op)


async def aiostage_warm(sd: Any) -> tuple[Case, aiostage.DefaultStager]:
    stager = aiostage.DefaultStager(aiostage.StagingOptions())
    stager.release(await stager.stage(sd))  # allocate the pool once, untimed

    async def after(staged: Any) -> None:
        stager.release(staged)

    return Case(WARM, lambda: stager.stage(sd), after=after), stager


async def dcp_warm(sd: Any) -> tuple[list[Case], list[dcp.DefaultStager]]:
    """DCP's DefaultStager called synchronously on the loop (as ``async_save`` calls it) and in
    its own thread; each stages once untimed to fill its storage cache."""
    sync, threaded = dcp.DefaultStager(anchors.DCP_SYNC), dcp.DefaultStager(anchors.DCP_ASYNC)
    sync.stage(sd)
    await anchors.dcp_stage_async(threaded, sd)

    async def on_loop() -> Any:
        return sync.stage(sd)

    cases = [
        Case(DCP_SYNC, on_loop),
        Case(DCP_ASYNC, lambda: anchors.dcp_stage_async(threaded, sd)),
    ]
    return cases, [sync, threaded]


def aiostage_cold(sd: Any) -> Case:
    box: list[aiostage.DefaultStager] = []

    async def before() -> None:
        gc.collect()
        box[:] = [aiostage.DefaultStager(aiostage.StagingOptions())]

    async def after(staged: Any) -> None:
        box[0].release(staged)
        await box.pop().aclose()

    return Case(COLD, lambda: box[0].stage(sd), before, after)


def dcp_cold(sd: Any) -> Case:
    box: list[dcp.DefaultStager] = []

    async def before() -> None:
        gc.collect()
        box[:] = [dcp.DefaultStager(anchors.DCP_ASYNC)]

    async def after(staged: Any) -> None:
        box.pop().close()

    return Case(DCP_COLD, lambda: anchors.dcp_stage_async(box[0], sd), before, after)


def blocking(sd: Any, cache: bool) -> Case:
    stager = dcp.BlockingAsyncStager(cache_staged_state_dict=cache)

    async def before() -> None:
        gc.collect()

    async def op() -> Any:
        return stager.stage(sd)  # synchronous, on the loop thread, as DCP calls it

    return Case(f"DCP BlockingAsyncStager(cache={cache}), in the loop", op, before)


# ---------------------------------------------------------------- groups


async def warm_group(sd: Any, reps: int) -> dict[str, Timing]:
    ours, stager = await aiostage_warm(sd)
    theirs, dcp_stagers = await dcp_warm(sd)
    cases = [raw_copy(sd), ours, *theirs]
    await run_rounds(cases, reps)
    print(f"aiostage warm: {stager.statistics()}", flush=True)
    await stager.aclose()
    for s in dcp_stagers:
        s.close()
    gc.collect()
    return timings(cases)


async def cold_group(sd: Any, reps: int) -> dict[str, Timing]:
    cases = [aiostage_cold(sd), dcp_cold(sd), blocking(sd, cache=False)]
    await run_rounds(cases, reps)
    cached = blocking(sd, cache=True)
    try:
        await cached.op()
        cases.append(cached)
        await run_rounds([cached], reps)
    except Exception as exc:  # CPU-only torch cannot pin memory
        print(f"DCP BlockingAsyncStager(cache=True) FAILS: {type(exc).__name__}: {exc}")
    gc.collect()
    return timings(cases)


async def checks(sd: Any) -> list[str]:
    """Each stager's copy equals the source, aliasing included."""
    lines = []
    async with aiostage.DefaultStager(aiostage.StagingOptions()) as stager:
        lines.append(check("aiostage", sd, await stager.stage(sd)))
    sync = dcp.DefaultStager(anchors.DCP_SYNC)
    lines.append(check("DCP DefaultStager", sd, sync.stage(sd)))
    sync.close()
    lines.append(check("DCP BlockingAsyncStager", sd, dcp.BlockingAsyncStager().stage(sd)))
    gc.collect()
    return lines


def check(name: str, sd: Any, staged: Any) -> str:
    try:
        assert_state_dict_equal(staged, sd, check_aliasing=True)
    except AssertionError as exc:
        return f"{name}: copy differs: {exc}"
    return f"{name}: copy equal, aliasing kept"


async def flat_memory(sd: Any, reps: int) -> str:
    """RSS before and after ``reps`` warm stage + release cycles of one stager."""
    stager = aiostage.DefaultStager(aiostage.StagingOptions())
    stager.release(await stager.stage(sd))
    gc.collect()
    before = rss_gib()
    began = time.perf_counter()
    for _ in range(reps):
        stager.release(await stager.stage(sd))
    seconds = time.perf_counter() - began
    gc.collect()
    after, stats = rss_gib(), stager.statistics()
    async with Heartbeat() as beat:  # the pool's memory is given back inside aclose()
        closing = time.perf_counter()
        await stager.aclose()
        closing = time.perf_counter() - closing
    return (
        f"flat memory: RSS before {before:.3f} GiB, after {reps} warm stages {after:.3f} GiB "
        f"(delta {1024 * (after - before):+.1f} MiB); allocations={stats.allocations}, "
        f"mean {1e3 * seconds / reps:.1f} ms per stage; then aclose() took "
        f"{1e3 * closing:.1f} ms, loop max lag {beat.max_ms:.1f} ms, RSS {rss_gib():.3f} GiB"
    )


def rss_gib() -> float:
    return float(psutil.Process().memory_info().rss) / (1 << 30)


async def gpu_group(sd: Any, reps: int) -> dict[str, Timing]:
    """D2H on a GPU: aiostage against pinned ``copy_(non_blocking=True)`` of the same bytes."""
    gpu = shapes.tree_map(lambda t: t.cuda(), sd)
    pairs = [(t, torch.empty_like(t, device="cpu", pin_memory=True)) for t in shapes.tensors(gpu)]

    def limit() -> None:
        for src, dst in pairs:
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()

    async def pinned_copy() -> None:
        await anyio.to_thread.run_sync(limit)

    warm, stager = await aiostage_warm(gpu)
    name = "limit: pinned copy_(non_blocking=True) per tensor + synchronize, worker thread"
    cases = [Case(name, pinned_copy), warm]
    await run_rounds(cases, reps)
    await stager.aclose()
    return timings(cases)


# ---------------------------------------------------------------- report


def ratios(by: dict[str, Timing], shape: shapes.Shape) -> list[Ratio]:
    """Issue 18's staging targets (and issue 2's cold one)."""
    best_dcp = min((by[DCP_SYNC], by[DCP_ASYNC]), key=lambda t: t.median)
    raw_lag = by[RAW].lag_ms
    cold = [speedup("aiostage cold vs DCP cold", by[COLD], by[DCP_COLD], 2.0)] if COLD in by else []
    return [
        speedup("aiostage warm vs the raw copy_ loop", by[WARM], by[RAW], shape.copy_target),
        speedup("aiostage warm vs DCP DefaultStager (faster of sync/async, warm)", by[WARM], best_dcp, 1.5),
        Ratio("aiostage warm loop max lag (median rep) vs the raw copy loop's own", by[WARM].lag_ms, raw_lag, False, " ms"),
        speedup("the raw copy_ loop vs DCP DefaultStager (faster of sync/async, warm)", by[RAW], best_dcp, None),
        *cold,
        Ratio("DCP DefaultStager(sync) loop max lag (median rep)", by[DCP_SYNC].lag_ms, None, unit=" ms"),
    ]  # fmt: skip


async def main(args: argparse.Namespace, shape: shapes.Shape, report: Report) -> None:
    sd = shape.state_dict()
    nbytes = shapes.unique_bytes(sd)
    report.shape = shape.describe()
    gc.collect()
    gc.freeze()  # a full collection of torch's import-time heap takes ~100+ ms: keep it out of reps
    print("\n".join(await checks(sd)), flush=True)
    warm = await warm_group(sd, args.reps)
    cold = await cold_group(sd, args.reps) if args.cold else {}
    report.add(
        f"staging, warm, {args.reps} reps round-robin",
        HEADER,
        [row(n, t, nbytes) for n, t in warm.items()],
    )
    if cold:
        report.add(
            f"staging, cold, {args.reps} reps round-robin",
            HEADER,
            [row(n, t, nbytes) for n, t in cold.items()],
        )
    report.add_timings("stage warm", warm, nbytes)
    report.add_timings("stage cold", cold, nbytes)
    report.traces["stage"] = {n: t.median_trace() for n, t in warm.items()}
    report.ratios += ratios(warm | cold, shape)
    if args.flat_reps:
        report.notes.append(await flat_memory(sd, args.flat_reps))
    if torch.cuda.is_available():
        gpu = await gpu_group(sd, args.reps)
        title = f"GPU -> CPU staging on {torch.cuda.get_device_name()}"
        report.add(title, HEADER, [row(n, t, nbytes) for n, t in gpu.items()])
        report.add_timings("stage gpu", gpu, nbytes)
        lim, ours = gpu.values()
        report.ratios.append(speedup("aiostage D2H vs pinned copy_", ours, lim, 0.9))
    else:
        report.notes.append("GPU section skipped: no CUDA device on this machine")


def parse(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, shapes.Shape]:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    shapes.add_arguments(p)
    p.add_argument("--reps", type=int, default=5, help="timed reps per contender (default 5)")
    p.add_argument(
        "--no-cold", dest="cold", action="store_false", help="skip the cold-stager group"
    )
    p.add_argument(
        "--flat-reps", type=int, default=50, help="stages for the RSS check (50; 0: skip)"
    )
    add_report_arguments(p)
    return shapes.parse(p, argv)


if __name__ == "__main__":
    args, shape = parse()
    report = start("stage", args)
    asyncio.run(main(args, shape, report))
    report.finish(args.json)
    sys.exit(0)
