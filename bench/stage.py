"""Staging benchmark: aiostage against the memcpy limit and DCP's stagers, time and loop lag.

Run: ``.venv/bin/python bench/stage.py [--gib 1] [--reps 5] [--flat-reps 50]``. Contenders of
a group run round-robin (one rep each per round), so drift on a shared machine hits all alike.
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
from _common import (
    GB,
    Case,
    CpuSnapshot,
    LoopLag,
    Timing,
    hidden_for,
    make_sd,
    run_rounds,
    table,
    tensors,
    unique_bytes,
)
from torch.distributed.checkpoint import staging as dcp

import aiostage

Pairs = list[tuple[torch.Tensor, torch.Tensor]]
HEADER = (
    "contender",
    "min",
    "median",
    "GB/s (median; best)",
    "loop max lag ms (min / median / worst rep)",
    "p99 lag ms (pooled)",
    "beats",
)
LIMIT = "limit: Tensor.copy_ into prealloc, worker thread"
WARM = "aiostage DefaultStager, warm"
COLD = "aiostage DefaultStager, cold (fresh stager)"
DCP_WARM = "DCP DefaultStager(async), warm"
DCP_COLD = "DCP DefaultStager(async), cold (fresh stager)"
CACHED = "DCP BlockingAsyncStager(cache=True), in the loop"
Q_VIEW, QKV = "layers.0.attn.q_view", "layers.0.attn.qkv.weight"
DCP_OPTIONS = dcp.StagingOptions(
    use_pinned_memory=False,
    use_shared_memory=False,
    use_async_staging=True,
    use_non_blocking_copy=False,
)


def free() -> None:
    """Drop cyclic garbage so the next contender starts with the memory given back."""
    gc.collect()


def rss_gib() -> float:
    return psutil.Process().memory_info().rss / (1 << 30)


def row(name: str, t: Timing, nbytes: int) -> list[str]:
    lags = t.max_lag_ms
    return [
        name,
        f"{t.min * 1e3:.1f} ms",
        f"{t.median * 1e3:.1f} ms",
        f"{nbytes / GB / t.median:.2f} ({nbytes / GB / t.min:.2f})",
        f"{min(lags):.1f} / {statistics.median(lags):.1f} / {max(lags):.1f}",
        f"{t.p99_ms:.1f}",
        str(len(t.lateness)),
    ]


# ---------------------------------------------------------------- contenders


def limit_pairs(sd: dict[str, Any]) -> Pairs:
    """One preallocated, already faulted-in destination per unique source storage."""
    by_storage: dict[int, torch.Tensor] = {}
    for t in tensors(sd):
        by_storage.setdefault(t.untyped_storage().data_ptr(), t)
    pairs = [(src, torch.empty_like(src)) for src in by_storage.values()]
    copy_all(pairs)
    return pairs


def copy_all(pairs: Pairs, threads: int | None = None) -> None:
    """``dst.copy_(src)`` for every pair (releases the GIL); ``threads`` pins torch's pool."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        for src, dst in pairs:
            dst.copy_(src)
    finally:
        torch.set_num_threads(before)


def limit_cases(pairs: Pairs) -> list[Case]:
    async def two() -> None:
        await anyio.to_thread.run_sync(copy_all, pairs)

    async def one() -> None:
        await anyio.to_thread.run_sync(copy_all, pairs, 1)

    return [
        Case(LIMIT, two),
        Case("(diagnostic) limit, worker thread, torch threads=1", one),
    ]


async def aiostage_warm(sd: dict[str, Any]) -> tuple[Case, aiostage.DefaultStager]:
    stager = aiostage.DefaultStager(aiostage.StagingOptions())
    stager.release(await stager.stage(sd))  # allocate the pool once, untimed

    async def op() -> Any:
        return await stager.stage(sd)

    async def after(staged: Any) -> None:
        stager.release(staged)

    return Case(WARM, op, after=after), stager


def aiostage_cold(sd: dict[str, Any]) -> Case:
    box: list[aiostage.DefaultStager] = []

    async def before() -> None:
        free()
        box[:] = [aiostage.DefaultStager(aiostage.StagingOptions())]

    async def op() -> Any:
        return await box[0].stage(sd)

    async def after(staged: Any) -> None:
        box[0].release(staged)
        await box.pop().aclose()

    return Case(COLD, op, before, after)


def dcp_warm(sd: dict[str, Any]) -> tuple[Case, dcp.DefaultStager]:
    stager = dcp.DefaultStager(DCP_OPTIONS)

    async def op() -> Any:
        return await asyncio.wrap_future(stager.stage(sd))  # type: ignore[arg-type]

    return Case(DCP_WARM, op), stager


def dcp_cold(sd: dict[str, Any]) -> Case:
    box: list[dcp.DefaultStager] = []

    async def before() -> None:
        free()
        box[:] = [dcp.DefaultStager(DCP_OPTIONS)]

    async def op() -> Any:
        return await asyncio.wrap_future(box[0].stage(sd))  # type: ignore[arg-type]

    async def after(staged: Any) -> None:
        box.pop().close()

    return Case(DCP_COLD, op, before, after)


def blocking(sd: dict[str, Any], cache: bool) -> Case:
    stager = dcp.BlockingAsyncStager(cache_staged_state_dict=cache)

    async def before() -> None:
        free()

    async def op() -> Any:
        return stager.stage(sd)  # synchronous, on the loop thread, as DCP calls it

    return Case(f"DCP BlockingAsyncStager(cache={cache}), in the loop", op, before)


# ---------------------------------------------------------------- checks and reports


def check(name: str, sd: dict[str, Any], staged: dict[str, Any]) -> str:
    """Values equal, the tied pair and the view still alias, non-tensors kept."""
    equal = all(torch.equal(a, b) for a, b in zip(tensors(sd), tensors(staged), strict=True))

    def shared(a: str, b: str) -> bool:
        return bool(
            staged[a].untyped_storage().data_ptr() == staged[b].untyped_storage().data_ptr()
        )

    same = staged["lm_head.weight"] is staged["embed.weight"]
    tied, view = shared("lm_head.weight", "embed.weight"), shared(Q_VIEW, QKV)
    return (
        f"{name}: equal={equal}, tied same object={same}, tied same storage={tied}, "
        f"view shares storage={view}, sched={staged['sched']}"
    )


async def checks(sd: dict[str, Any]) -> list[str]:
    async with aiostage.DefaultStager(aiostage.StagingOptions()) as stager:
        lines = [check("aiostage", sd, await stager.stage(sd))]
    stager2 = dcp.DefaultStager(DCP_OPTIONS)
    lines.append(check("DCP DefaultStager", sd, await asyncio.wrap_future(stager2.stage(sd))))  # type: ignore[arg-type]
    stager2.close()
    lines.append(check("BlockingAsyncStager", sd, dcp.BlockingAsyncStager().stage(sd)))
    free()
    return lines


def timings(cases: Sequence[Case]) -> dict[str, Timing]:
    """Keep only the figures: a case's closures hold its buffers alive."""
    return {c.name: c.timing for c in cases}


async def warm_group(sd: dict[str, Any], reps: int) -> dict[str, Timing]:
    pairs = limit_pairs(sd)
    limit = limit_cases(pairs)
    ours, stager = await aiostage_warm(sd)
    theirs, dcp_stager = dcp_warm(sd)
    await theirs.op()  # fill DCP's storage cache once, untimed
    cases = [limit[0], ours, theirs, limit[1]]
    await run_rounds(cases, reps)
    print(f"aiostage warm: {stager.statistics()}")
    await stager.aclose()
    dcp_stager.close()
    free()
    return timings(cases)


async def cold_group(sd: dict[str, Any], reps: int) -> dict[str, Timing]:
    cases = [aiostage_cold(sd), dcp_cold(sd), blocking(sd, cache=False)]
    await run_rounds(cases, reps)
    free()
    return timings(cases)


async def blocking_cached(sd: dict[str, Any], reps: int) -> Timing | str:
    """``BlockingAsyncStager(cache=True)``: the exception text if it fails (CPU-only torch)."""
    case = blocking(sd, cache=True)
    try:
        await case.op()
    except Exception as exc:
        return f"FAILS: {type(exc).__name__}: {exc}"
    await run_rounds([case], reps)
    return case.timing


async def flat_memory(sd: dict[str, Any], reps: int) -> str:
    """RSS before and after ``reps`` warm stage + release cycles of one stager."""
    stager = aiostage.DefaultStager(aiostage.StagingOptions())
    stager.release(await stager.stage(sd))
    free()
    before = rss_gib()
    began = time.perf_counter()
    for _ in range(reps):
        stager.release(await stager.stage(sd))
    seconds = time.perf_counter() - began
    free()
    after, stats = rss_gib(), stager.statistics()
    async with LoopLag() as lag:  # the pool's memory is given back inside aclose()
        closing = time.perf_counter()
        await stager.aclose()
        closing = time.perf_counter() - closing
    return (
        f"RSS before {before:.3f} GiB, after {reps} warm stages {after:.3f} GiB "
        f"(delta {1024 * (after - before):+.1f} MiB); allocations={stats.allocations}, "
        f"stages={stats.stages}, mean {1e3 * seconds / reps:.1f} ms per stage; then "
        f"aclose() took {1e3 * closing:.1f} ms, loop max lag {lag.max_ms:.1f} ms, "
        f"RSS after aclose {rss_gib():.3f} GiB"
    )


def ratio_line(what: str, faster: float, slower: float, target: float) -> str:
    r = slower / faster
    return f"- {what}: {r:.2f}x (target >= {target}x) {'PASS' if r >= target else 'MISS'}"


def ratios(by: dict[str, Timing]) -> list[str]:
    """Speed ratios (other time / aiostage time) against the issue's targets."""
    warm, cold, limit, dcp_c = by[WARM], by[COLD], by[LIMIT], by[DCP_COLD]
    dcp_w = min((by[k] for k in (DCP_WARM, CACHED) if k in by), key=lambda t: t.median)
    lines = []
    for stat in ("median", "min"):
        w, lim, dw, c, dc = (float(getattr(t, stat)) for t in (warm, limit, dcp_w, cold, dcp_c))
        lines += [
            f"by {stat}:",
            ratio_line("aiostage warm vs limit", w, lim, 0.9),
            ratio_line("aiostage warm vs best DCP warm", w, dw, 1.0),
            ratio_line("aiostage cold vs DCP cold", c, dc, 2.0),
        ]
    for name, t in (("warm", warm), ("cold", cold)):
        worst = max(t.max_lag_ms)
        ok = "PASS" if worst <= 5.0 else "MISS"
        lines.append(
            f"- aiostage {name} loop max lag, worst rep: {worst:.1f} ms (target <= 5) {ok}"
        )
    return lines


async def gpu_section(sd: dict[str, Any], reps: int, nbytes: int) -> str:
    """D2H on a GPU: aiostage against pinned ``copy_(non_blocking=True)`` of the same bytes."""
    moved: dict[int, torch.Tensor] = {}
    gpu = {
        k: moved.setdefault(id(v), v.cuda()) if isinstance(v, torch.Tensor) else v
        for k, v in sd.items()
    }
    pairs = [(torch.empty_like(t, device="cpu", pin_memory=True), t) for t in moved.values()]

    def limit() -> None:
        for dst, src in pairs:
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()

    async def pinned_copy() -> None:
        await anyio.to_thread.run_sync(limit)

    warm, stager = await aiostage_warm(gpu)
    lim = Case("limit: pinned copy_(non_blocking=True) + synchronize, worker thread", pinned_copy)
    await run_rounds([lim, warm], reps)
    await stager.aclose()
    ratio = lim.timing.median / warm.timing.median
    rows = [row(c.name, c.timing, nbytes) for c in (lim, warm)]
    verdict = "PASS" if ratio >= 0.9 else "MISS"
    return (
        f"\n### GPU -> CPU staging on {torch.cuda.get_device_name()}\n\n{table(HEADER, rows)}\n\n"
        f"- aiostage D2H vs pinned copy_: {ratio:.2f}x (target >= 0.9x) {verdict}; "
        f"loop max lag worst rep {max(warm.timing.max_lag_ms):.2f} ms (target <= 1)"
    )


def describe(sd: dict[str, Any], gib: float, nbytes: int) -> str:
    keys, entries = len(sd), sum(1 for _ in tensors(sd))
    return (
        f"state dict: --gib {gib} (h={hidden_for(gib)}), {keys} keys, {entries} tensor entries, "
        f"{nbytes / GB:.3f} GB = {nbytes / (1 << 30):.3f} GiB unique; torch {torch.__version__}, "
        f"torch threads={torch.get_num_threads()}, switchinterval={sys.getswitchinterval() * 1e3:.0f} ms"
    )


async def main(args: argparse.Namespace) -> None:
    start = CpuSnapshot.now()
    sd = make_sd(args.gib)
    nbytes = unique_bytes(sd)
    gc.collect()
    gc.freeze()  # a full collection of torch's import-time heap takes ~100+ ms: keep it out of reps
    print(describe(sd, args.gib, nbytes) + f"; RSS with the state dict {rss_gib():.3f} GiB")
    worker = await anyio.to_thread.run_sync(torch.get_num_threads)
    print(f"torch.get_num_threads() in an anyio worker thread: {worker}")
    print("\n".join(await checks(sd)))
    by = await warm_group(sd, args.reps)
    by |= await cold_group(sd, args.reps)
    cached = await blocking_cached(sd, args.reps)
    if isinstance(cached, Timing):
        by[CACHED] = cached
    print(f"\n### staging, {args.reps} reps, groups interleaved round-robin\n")
    print(table(HEADER, [row(name, t, nbytes) for name, t in by.items()]))
    if isinstance(cached, str):
        print(f"\nDCP BlockingAsyncStager(cache=True): {cached}")
    print("\n" + "\n".join(ratios(by)))
    print("\nflat memory: " + await flat_memory(sd, args.flat_reps))
    if torch.cuda.is_available():
        print(await gpu_section(sd, args.reps, nbytes))
    else:
        print("\nGPU section skipped: no CUDA device on this machine")
    print("background: " + CpuSnapshot.now().others_since(start))


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--gib", type=float, default=1.0, help="state dict size in GiB (default 1)")
    p.add_argument("--reps", type=int, default=5, help="timed reps per contender (default 5)")
    p.add_argument("--flat-reps", type=int, default=50, help="stages for the RSS check (50)")
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
