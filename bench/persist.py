"""Persistence benchmark: aiostage.save / load against torch.save, DCP, safetensors and dd.

Run: ``.venv/bin/python bench/persist.py [--gib 1] [--reps 5] [--dir bench/out/persist]``
(``--gib 4`` for the large case). Every contender writes the same seeded state dict
(``_common.make_sd``) to the same disk. Before each timed save its target is removed and
``os.sync()`` runs; before each timed load its files are evicted from the page cache
(``posix_fadvise(DONTNEED)``), so every load reads the disk. Contenders of a group run
round-robin, one rep each per round, so drift on a noisy disk hits all alike. GB/s is unique
tensor bytes per second (dd: the bytes it copied).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import statistics
import subprocess
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio.to_thread
import psutil
import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp
from _common import (
    GB,
    Case,
    CpuSnapshot,
    Timing,
    make_sd,
    run_rounds,
    table,
    tensors,
    unique_bytes,
    unique_storages,
)

import aiostage

HEADER = (
    "contender",
    "min",
    "median",
    "GB/s (median; best)",
    "loop max lag, median rep",
    "on disk",
)
DD_BLOCK = 16 << 20
AIO_SAVE, AIO_LOAD = "aiostage.save", "aiostage.load"
TORCH_SAVE, TORCH_LOAD = "torch.save + flush + fsync + rename", "torch.load"
DCP_SAVE, DCP_LOAD = "dcp.save, FileSystemWriter(thread_count=2)", "dcp.load into a template"
ST_SAVE, ST_LOAD = "safetensors save_file + fsync (tensors only)", "safetensors load_file"
DD_FSYNC, DD_DIRECT = "dd bs=16M conv=fsync (limit)", "dd bs=16M oflag=direct (limit)"


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def files_under(path: Path) -> list[Path]:
    return [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]


def evict(path: Path) -> None:
    """Drop ``path``'s pages from the page cache (they are clean: every writer fsynced)."""
    gc.collect()  # a previous load's mapping would keep its pages
    for f in files_under(path):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in files_under(path)) if path.exists() else 0


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def tensors_only(sd: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The unique tensors of ``sd`` (safetensors refuses aliases and cannot hold values)."""
    seen: set[int] = set()
    out = {}
    for k, v in sd.items():
        if isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() not in seen:
            seen.add(v.untyped_storage().data_ptr())
            out[k] = v.contiguous()
    return out


# ---------------------------------------------------------------- save contenders


def save_case(name: str, target: Path, op: Any) -> Case:
    async def before() -> None:
        remove(target)
        await anyio.to_thread.run_sync(os.sync)

    return Case(name, op, before)


def save_cases(sd: dict[str, Any], root: Path, dd_source: Path, nbytes: int) -> list[Case]:
    plain = tensors_only(sd)
    dd_count = -(-nbytes // DD_BLOCK)

    async def aio() -> None:
        await aiostage.save(sd, root / "aio")

    async def torch_save() -> None:
        tmp = root / "torch.pt.tmp"
        with tmp.open("wb") as f:
            torch.save(sd, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.rename(root / "torch.pt")

    async def dcp_save() -> None:
        writer = dcp.FileSystemWriter(root / "dcp", sync_files=True, thread_count=2)
        dcp.save(sd, storage_writer=writer)

    async def st_save() -> None:
        safetensors.torch.save_file(plain, root / "st.safetensors")
        fsync_path(root / "st.safetensors")

    def dd(flag: str, out: Path) -> Any:
        async def op() -> None:
            argv = ["dd", f"if={dd_source}", f"of={out}", "bs=16M", f"count={dd_count}", flag]
            await anyio.run_process(argv, stderr=subprocess.DEVNULL)

        return op

    return [
        save_case(AIO_SAVE, root / "aio", aio),
        save_case(TORCH_SAVE, root / "torch.pt", torch_save),
        save_case(DCP_SAVE, root / "dcp", dcp_save),
        save_case(ST_SAVE, root / "st.safetensors", st_save),
        save_case(DD_FSYNC, root / "dd-fsync.bin", dd("conv=fsync", root / "dd-fsync.bin")),
        save_case(DD_DIRECT, root / "dd-direct.bin", dd("oflag=direct", root / "dd-direct.bin")),
    ]


# ---------------------------------------------------------------- load contenders


def load_cases(sd: dict[str, Any], root: Path) -> list[Case]:
    def case(name: str, path: Path, op: Any) -> Case:
        async def before() -> None:
            # the worker thread that built an earlier load's result may not have dropped its
            # reference yet (anyio resumes the caller first): a call on it waits for that, so
            # no earlier mapping keeps the file's pages in the cache
            await anyio.to_thread.run_sync(gc.collect)
            evict(path)

        async def after(result: Any) -> None:
            del result
            gc.collect()

        return Case(name, op, before, after)

    async def aio() -> Any:
        return await aiostage.load(root / "aio")

    async def torch_load() -> Any:
        return torch.load(root / "torch.pt", weights_only=True)

    async def st_load() -> Any:
        return safetensors.torch.load_file(root / "st.safetensors")

    async def dcp_load() -> Any:
        template = {
            k: torch.empty_like(v) if isinstance(v, torch.Tensor) else v for k, v in sd.items()
        }
        dcp.load(template, storage_reader=dcp.FileSystemReader(root / "dcp"))
        return template

    return [
        case(AIO_LOAD, root / "aio", aio),
        case(TORCH_LOAD, root / "torch.pt", torch_load),
        case(ST_LOAD, root / "st.safetensors", st_load),
        case(DCP_LOAD, root / "dcp", dcp_load),
    ]


# ---------------------------------------------------------------- memory and checks


async def save_memory(sd: dict[str, Any], root: Path) -> float:
    """Peak RSS above the starting RSS while ``aiostage.save`` runs, in MiB (1 ms samples)."""
    remove(root / "mem")
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
    remove(root / "mem")
    return (peak - base) / (1 << 20)


async def check(sd: dict[str, Any], root: Path) -> str:
    out = await aiostage.load(root / "aio")
    equal = all(torch.equal(a, b) for a, b in zip(tensors(sd), tensors(out), strict=True))
    tied = (
        out["lm_head.weight"].untyped_storage().data_ptr()
        == out["embed.weight"].untyped_storage().data_ptr()
    )
    values = all(out[k] == sd[k] for k in ("step", "lr", "tag", "sched"))
    return f"aiostage round trip: tensors equal={equal}, tied pair shares storage={tied}, values equal={values}"


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


def ratio(name: str, ours: Timing, theirs: Timing, target: float) -> str:
    med, best = theirs.median / ours.median, theirs.min / ours.min
    verdict = "PASS" if med >= target else "MISS"
    return f"- {name}: {med:.2f}x by median, {best:.2f}x by best (target >= {target}x) {verdict}"


def ratios(
    saves: dict[str, Timing], loads: dict[str, Timing], extra_mib: float, dd_bytes: int, nbytes: int
) -> list[str]:
    limit = {
        n: Timing(seconds=[s * nbytes / dd_bytes for s in saves[n].seconds])
        for n in (DD_FSYNC, DD_DIRECT)
    }  # dd wrote dd_bytes; scale to the state dict's bytes
    faster = min(limit.values(), key=lambda t: t.median)
    ok = "PASS" if extra_mib <= 64 else "MISS"
    return [
        ratio("save vs the faster dd (same bytes)", saves[AIO_SAVE], faster, 0.9),
        ratio("save vs torch.save + fsync", saves[AIO_SAVE], saves[TORCH_SAVE], 1.2),
        ratio("save vs dcp.save", saves[AIO_SAVE], saves[DCP_SAVE], 1.3),
        ratio("save vs safetensors save_file + fsync", saves[AIO_SAVE], saves[ST_SAVE], 1.0),
        ratio("load vs torch.load", loads[AIO_LOAD], loads[TORCH_LOAD], 1.0),
        ratio("load vs safetensors load_file", loads[AIO_LOAD], loads[ST_LOAD], 1.0),
        ratio("load vs dcp.load", loads[AIO_LOAD], loads[DCP_LOAD], 1.0),
        f"- memory above the state dict while aiostage.save runs: peak {extra_mib:.0f} MiB "
        f"(target <= 64 MiB) {ok}",
    ]


async def main(args: argparse.Namespace) -> None:
    start = CpuSnapshot.now()
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    sd = make_sd(args.gib)
    nbytes = unique_bytes(sd)
    dd_source = Path(f"/dev/shm/aiostage-bench-{os.getpid()}.bin")
    dd_bytes = -(-nbytes // DD_BLOCK) * DD_BLOCK
    try:
        with dd_source.open("wb") as f:  # the state dict's own bytes, padded to whole dd blocks
            for s in unique_storages(sd):
                f.write(memoryview(torch.empty(0, dtype=torch.uint8).set_(s).numpy()))
            f.write(bytes(dd_bytes - nbytes))
        gc.collect()
        gc.freeze()
        print(
            f"state dict: --gib {args.gib}, {len(sd)} keys, {nbytes / GB:.3f} GB unique; "
            f"target {root.resolve()} ({os.statvfs(root).f_bsize} B blocks); torch {torch.__version__}"
        )
        saves = save_cases(sd, root, dd_source, nbytes)
        await run_rounds(saves, args.reps)
        on_disk = {
            c.name: disk_bytes(root / p)
            for c, p in zip(
                saves,
                ["aio", "torch.pt", "dcp", "st.safetensors", "dd-fsync.bin", "dd-direct.bin"],
                strict=True,
            )
        }
        print(await check(sd, root))
        loads = load_cases(sd, root)
        await run_rounds(loads, args.reps)
        extra = await save_memory(sd, root)
    finally:
        dd_source.unlink(missing_ok=True)
    rows = [
        row(c.name, c.timing, dd_bytes if c.name.startswith("dd") else nbytes, on_disk[c.name])
        for c in saves
    ]
    print(f"\n### save, {args.reps} reps round-robin, target removed + os.sync() before each\n")
    print(table(HEADER, rows))
    load_disk = {
        AIO_LOAD: on_disk[AIO_SAVE],
        TORCH_LOAD: on_disk[TORCH_SAVE],
        ST_LOAD: on_disk[ST_SAVE],
        DCP_LOAD: on_disk[DCP_SAVE],
    }
    print(f"\n### load, {args.reps} reps round-robin, page cache evicted before each\n")
    print(table(HEADER, [row(c.name, c.timing, nbytes, load_disk[c.name]) for c in loads]))
    by_save = {c.name: c.timing for c in saves}
    by_load = {c.name: c.timing for c in loads}
    print("\n" + "\n".join(ratios(by_save, by_load, extra, dd_bytes, nbytes)))
    print("background: " + CpuSnapshot.now().others_since(start))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument(
        "--gib",
        type=float,
        default=1.0,
        help="state dict size in GiB (default 1; 4 for the large case)",
    )
    p.add_argument("--reps", type=int, default=5, help="timed reps per contender (default 5)")
    p.add_argument("--dir", default="bench/out/persist", help="where to write (a real disk)")
    p.add_argument("--keep", action="store_true", help="keep the written files")
    return p.parse_args(argv)


if __name__ == "__main__":
    warnings.filterwarnings("ignore", category=UserWarning)  # DCP without a process group
    sys.exit(asyncio.run(main(parse())))
