"""Persistence benchmark: aiostage.save / load against torch.save, DCP, safetensors and dd, at a
state-dict shape.

Run: ``.venv/bin/python bench/persist.py [--shape flat|small|transformer|moe | --tensors N
--tensor-kib K] [--gib 1] [--reps 5] [--dir bench/out/persist] [--json PATH]`` (``--gib 4`` for
the large case). Every contender writes the same seeded state dict to the same disk. Before
each timed save its target is removed and ``os.sync()`` runs; before each timed load its files
are evicted from the page cache (``posix_fadvise(DONTNEED)``), so every load reads the disk.
Contenders of a group run round-robin, one rep each per round, so drift on a noisy disk hits
all alike. GB/s is unique tensor bytes per second (dd: the bytes it copied).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import statistics
import sys
import threading
import warnings
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio.to_thread
import psutil
import torch
from _lib import anchors, shapes
from _lib.machine import out_dir
from _lib.report import GB, Ratio, Report, add_report_arguments, speedup, start
from _lib.timing import Case, Timing, run_rounds, timings

import aiostage
from aiostage.testing import assert_state_dict_equal

HEADER = (
    "contender",
    "min",
    "median",
    "GB/s (median; best)",
    "loop max lag, median rep",
    "on disk",
)
AIO_SAVE, AIO_LOAD = "aiostage.save", "aiostage.load"
TORCH_SAVE, TORCH_LOAD = "torch.save + flush + fsync + rename", "torch.load"
DCP_SAVE, DCP_LOAD = "dcp.save, FileSystemWriter(thread_count=2)", "dcp.load into a template"
ST_SAVE, ST_LOAD = "safetensors save_file + fsync (tensors only)", "safetensors load_file"
DD_FSYNC, DD_DIRECT = "dd bs=16M conv=fsync (limit)", "dd bs=16M oflag=direct (limit)"
RAW_AIO = "raw read of aiostage's files (limit: readinto, 1 thread, preallocated)"
RAW_TORCH = "raw read of torch.pt (limit: readinto, 1 thread, preallocated)"
TARGETS = {  # contender -> what it writes or reads, under the bench's directory
    AIO_SAVE: "aio", TORCH_SAVE: "torch.pt", DCP_SAVE: "dcp", ST_SAVE: "st.safetensors",
    DD_FSYNC: "dd-fsync.bin", DD_DIRECT: "dd-direct.bin",
    AIO_LOAD: "aio", TORCH_LOAD: "torch.pt", DCP_LOAD: "dcp", ST_LOAD: "st.safetensors",
    RAW_AIO: "aio", RAW_TORCH: "torch.pt",
}  # fmt: skip
Op = Callable[[], Awaitable[Any]]


def save_cases(sd: Any, root: Path, dd_source: Path, nbytes: int) -> list[Case]:
    """Each save contender; its target is removed and ``os.sync()`` runs before each rep."""
    plain = anchors.tensors_only(sd)

    def case(name: str, op: Op) -> Case:
        async def before() -> None:
            anchors.remove(root / TARGETS[name])
            await anyio.to_thread.run_sync(os.sync)

        return Case(name, op, before)

    async def on_loop(fn: Callable[..., None], *args: Any) -> None:
        fn(*args)  # synchronous, on the loop thread: how these are called

    return [
        case(AIO_SAVE, lambda: aiostage.save(sd, root / "aio")),
        case(TORCH_SAVE, lambda: on_loop(anchors.torch_save_fsync, sd, root / "torch.pt")),
        case(DCP_SAVE, lambda: on_loop(anchors.dcp_save, sd, root / "dcp")),
        case(ST_SAVE, lambda: on_loop(anchors.safetensors_save, plain, root / "st.safetensors")),
        case(DD_FSYNC, lambda: anchors.dd(dd_source, root / "dd-fsync.bin", nbytes, "conv=fsync")),
        case(DD_DIRECT, lambda: anchors.dd(dd_source, root / "dd-direct.bin", nbytes, "oflag=direct")),
    ]  # fmt: skip


def load_cases(sd: Any, root: Path) -> list[Case]:
    """Each load contender; its files are evicted from the page cache before each rep. The raw
    reads are the limits: the same files' bytes read whole into a buffer faulted in beforehand."""

    def case(name: str, op: Op) -> Case:
        async def before() -> None:
            # the worker thread that built an earlier load's result may not have dropped its
            # reference yet (anyio resumes the caller first): a call on it waits for that, so
            # no earlier mapping keeps the file's pages in the cache
            await anyio.to_thread.run_sync(gc.collect)
            anchors.evict(root / TARGETS[name])

        async def after(result: Any) -> None:
            del result
            gc.collect()

        return Case(name, op, before, after)

    async def on_loop(fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)

    raw = anchors.raw_buffer(max(root / "aio", root / "torch.pt", key=anchors.disk_bytes))
    return [
        case(AIO_LOAD, lambda: aiostage.load(root / "aio")),
        case(TORCH_LOAD, lambda: on_loop(anchors.torch_load, root / "torch.pt")),
        case(RAW_AIO, lambda: on_loop(anchors.raw_read, root / "aio", raw)),
        case(RAW_TORCH, lambda: on_loop(anchors.raw_read, root / "torch.pt", raw)),
        case(ST_LOAD, lambda: on_loop(anchors.safetensors_load, root / "st.safetensors")),
        case(DCP_LOAD, lambda: on_loop(anchors.dcp_load, sd, root / "dcp")),
    ]


async def save_memory(sd: Any, root: Path) -> float:
    """Peak RSS above the starting RSS while ``aiostage.save`` runs, in MiB (1 ms samples)."""
    anchors.remove(root / "mem")
    gc.collect()
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak, done = base, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.001):
            peak = max(peak, proc.memory_info().rss)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        await aiostage.save(sd, root / "mem")
    finally:
        done.set()
        sampler.join()
    anchors.remove(root / "mem")
    return float(peak - base) / (1 << 20)


async def check(sd: Any, root: Path) -> str:
    try:
        assert_state_dict_equal(await aiostage.load(root / "aio"), sd, check_aliasing=True)
    except AssertionError as exc:
        return f"aiostage round trip differs: {exc}"
    return "aiostage round trip: equal, aliasing kept"


def write_dd_source(sd: Any, path: Path, nbytes: int) -> int:
    """The state dict's own bytes, padded to whole dd blocks, in ``path``; the padded size."""
    padded = -(-nbytes // anchors.DD_BLOCK) * anchors.DD_BLOCK
    with path.open("wb") as f:
        for s in shapes.unique_storages(sd):
            f.write(torch.empty(0, dtype=torch.uint8).set_(s).numpy().data)
        f.write(bytes(padded - nbytes))
    return padded


# ---------------------------------------------------------------- report


def row(name: str, t: Timing, nbytes: int, on_disk: int) -> list[str]:
    return [
        name,
        f"{t.min * 1e3:.0f} ms",
        f"{t.median * 1e3:.0f} ms",
        f"{nbytes / GB / t.median:.2f} ({nbytes / GB / t.min:.2f})",
        f"{statistics.median(t.max_lag_ms):.1f} ms",
        f"{on_disk / GB:.3f} GB",
    ]


def ratios(by: dict[str, Timing], extra_mib: float, dd_bytes: int, nbytes: int) -> list[Ratio]:
    """Issue 18's save and load targets, and the earlier ones (dd, safetensors, DCP, memory)."""
    dd = min((by[DD_FSYNC], by[DD_DIRECT]), key=lambda t: t.median)
    dd_same = Timing(seconds=[s * nbytes / dd_bytes for s in dd.seconds])  # the same bytes
    return [
        speedup("save vs torch.save + fsync", by[AIO_SAVE], by[TORCH_SAVE], 1.2),
        speedup("save vs dcp.save", by[AIO_SAVE], by[DCP_SAVE], 2.0),
        speedup("load vs torch.load", by[AIO_LOAD], by[TORCH_LOAD], 1.2),
        speedup("save vs the faster dd (same bytes)", by[AIO_SAVE], dd_same, 0.9),
        speedup("aiostage.load vs the raw read of its files (raw / load time)", by[AIO_LOAD], by[RAW_AIO], None),
        speedup("torch.load vs the raw read of its file (raw / load time)", by[TORCH_LOAD], by[RAW_TORCH], None),
        speedup("raw read of aiostage's files vs of torch.pt", by[RAW_AIO], by[RAW_TORCH], None),
        speedup("save vs safetensors save_file + fsync", by[AIO_SAVE], by[ST_SAVE], 1.0),
        speedup("load vs safetensors load_file", by[AIO_LOAD], by[ST_LOAD], 1.0),
        speedup("load vs dcp.load", by[AIO_LOAD], by[DCP_LOAD], 1.0),
        Ratio("memory above the state dict while aiostage.save runs (peak)", extra_mib, 64, False, " MiB"),
        Ratio("aiostage.save loop max lag (median rep)", by[AIO_SAVE].lag_ms, None, unit=" ms"),
        Ratio("aiostage.load loop max lag (median rep)", by[AIO_LOAD].lag_ms, None, unit=" ms"),
    ]  # fmt: skip


async def measure(sd: Any, root: Path, reps: int, report: Report) -> None:
    nbytes = shapes.unique_bytes(sd)
    dd_source = Path(f"/dev/shm/aiostage-bench-{os.getpid()}.bin")
    try:
        dd_bytes = write_dd_source(sd, dd_source, nbytes)
        gc.collect()
        gc.freeze()
        saves = save_cases(sd, root, dd_source, nbytes)
        await run_rounds(saves, reps)
        print(await check(sd, root), flush=True)
        loads = load_cases(sd, root)
        await run_rounds(loads, reps)
        extra = await save_memory(sd, root)
    finally:
        dd_source.unlink(missing_ok=True)
    on_disk = {name: anchors.disk_bytes(root / t) for name, t in TARGETS.items()}
    size = {DD_FSYNC: dd_bytes, DD_DIRECT: dd_bytes}
    by_save, by_load = timings(saves), timings(loads)
    title = f"save, {reps} reps round-robin, target removed + os.sync() before each"
    report.add(
        title, HEADER, [row(n, t, size.get(n, nbytes), on_disk[n]) for n, t in by_save.items()]
    )
    title = f"load, {reps} reps round-robin, page cache evicted before each"
    report.add(title, HEADER, [row(n, t, nbytes, on_disk[n]) for n, t in by_load.items()])
    report.add_timings("save", by_save, nbytes)
    report.add_timings("load", by_load, nbytes)
    for what, by, names in (
        ("save", by_save, (AIO_SAVE, TORCH_SAVE, DCP_SAVE)),
        ("load", by_load, (AIO_LOAD, TORCH_LOAD, DCP_LOAD)),
    ):
        report.traces[what] = {n: by[n].median_trace() for n in names}
    report.ratios += ratios(by_save | by_load, extra, dd_bytes, nbytes)


async def main(args: argparse.Namespace, shape: shapes.Shape, report: Report) -> None:
    root = (Path(args.dir) if args.dir else out_dir("persist")) / f"run-{os.getpid()}"
    root.mkdir(parents=True, exist_ok=True)  # removed afterwards, unless --keep
    sd = shape.state_dict()
    report.shape = shape.describe()
    report.notes.append(f"target {root.resolve()} ({os.statvfs(root).f_bsize} B blocks)")
    try:
        await measure(sd, root, args.reps, report)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def parse(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, shapes.Shape]:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    shapes.add_arguments(p)
    p.add_argument("--reps", type=int, default=5, help="timed reps per contender (default 5)")
    p.add_argument("--dir", help="where to write, a real disk (default bench/out/persist)")
    p.add_argument("--keep", action="store_true", help="keep the written files")
    add_report_arguments(p)
    return shapes.parse(p, argv)


if __name__ == "__main__":
    warnings.filterwarnings("ignore", category=UserWarning)  # DCP without a process group
    args, shape = parse()
    report = start("persist", args)
    asyncio.run(main(args, shape, report))
    report.finish(args.json)
    sys.exit(0)
