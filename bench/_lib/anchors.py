"""The anchors aiostage is measured against, set up once for every bench: the raw per-tensor
``copy_`` loop, DCP's stagers, ``torch.save`` + fsync, ``dcp.save`` / ``dcp.load``, safetensors,
``dd``, and the training bench's checkpointing contenders (DCP ``async_save``, ``torch.save``)."""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import anyio
import safetensors.torch
import torch
from torch.distributed.checkpoint import staging
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load_into
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse, async_save
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save_to

from .shapes import named_tensors, tensors, tree_map

Pairs = list[tuple[torch.Tensor, torch.Tensor]]
DD_BLOCK = 16 << 20
DCP_SYNC = staging.StagingOptions(
    use_pinned_memory=False, use_shared_memory=False, use_async_staging=False,
    use_non_blocking_copy=False,
)  # fmt: skip
DCP_ASYNC = staging.StagingOptions(
    use_pinned_memory=False, use_shared_memory=False, use_async_staging=True,
    use_non_blocking_copy=False,
)  # fmt: skip

# ---------------------------------------------------------------- staging


def copy_pairs(sd: Any) -> Pairs:
    """One preallocated, already faulted-in destination per unique source storage."""
    by_storage: dict[int, torch.Tensor] = {}
    for t in tensors(sd):
        by_storage.setdefault(t.untyped_storage().data_ptr(), t)
    pairs = [(src, torch.empty_like(src)) for src in by_storage.values()]
    copy_loop(pairs)
    return pairs


def copy_loop(pairs: Pairs) -> None:
    """The raw limit: ``dst.copy_(src)``, one Python call per tensor (releases the GIL)."""
    for src, dst in pairs:
        dst.copy_(src)


async def dcp_stage_async(stager: staging.DefaultStager, sd: Any) -> Any:
    """DCP's ``DefaultStager(use_async_staging=True)``: its own thread, awaited from the loop."""
    return await asyncio.wrap_future(stager.stage(sd))  # type: ignore[arg-type]


# ---------------------------------------------------------------- files


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (and ``root``)."""
    for p in [*root.rglob("*"), root] if root.is_dir() else [root]:
        fsync_path(p)


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


def raw_buffer(path: Path) -> memoryview:
    """A buffer as large as the files under ``path``, faulted in once (the raw read's target)."""
    buf = bytearray(disk_bytes(path))
    buf[::4096] = bytes(len(range(0, len(buf), 4096)))  # every page written: none faults later
    return memoryview(buf)


def raw_read(path: Path, buf: memoryview, chunk: int = 64 << 20) -> int:
    """The limit of a load: the files under ``path`` read in order into ``buf`` (preallocated)
    with plain ``readinto`` of ``chunk`` bytes, one thread, no checks; the bytes read."""
    at = 0
    for f in sorted(files_under(path), key=lambda f: f.stat().st_size):
        with f.open("rb", buffering=0) as fh:
            while n := fh.readinto(buf[at : at + chunk]):
                at += n
    return at


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in files_under(path)) if path.exists() else 0


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


# ---------------------------------------------------------------- save and load


def torch_save_fsync(sd: Any, path: Path) -> None:
    """``torch.save`` to a temporary name, flush, fsync, rename: a durable ``torch.save``."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        torch.save(sd, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(path)


def torch_load(path: Path) -> Any:
    return torch.load(path, weights_only=True)


def dcp_save(sd: Any, root: Path) -> None:
    """``dcp.save`` with its file writer (fsync on, 2 threads), no process group."""
    dcp_save_to(sd, storage_writer=FileSystemWriter(root, sync_files=True, thread_count=2))


def dcp_load(sd: Any, root: Path) -> Any:
    """``dcp.load`` into a template shaped like ``sd`` (DCP loads in place)."""
    template = tree_map(torch.empty_like, sd)
    dcp_load_into(template, storage_reader=FileSystemReader(root))
    return template


def tensors_only(sd: Any) -> dict[str, torch.Tensor]:
    """The unique tensors of ``sd`` by dotted key path (safetensors refuses aliases and values)."""
    seen: set[int] = set()
    out = {}
    for key, t in named_tensors(sd):
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            out[key] = t.contiguous()
    return out


def safetensors_save(plain: dict[str, torch.Tensor], path: Path) -> None:
    safetensors.torch.save_file(plain, path)
    fsync_path(path)


def safetensors_load(path: Path) -> Any:
    return safetensors.torch.load_file(path)


async def dd(source: Path, out: Path, nbytes: int, flag: str) -> None:
    """``dd bs=16M`` of ``nbytes`` (rounded up to whole blocks) from ``source``, with ``flag``."""
    count = -(-nbytes // DD_BLOCK)
    argv = ["dd", f"if={source}", f"of={out}", "bs=16M", f"count={count}", flag]
    await anyio.run_process(argv, stderr=subprocess.DEVNULL)


# ---------------------------------------------------------------- training-loop contenders


class Checkpoints:
    """A contender of the training bench: ``async with`` it, ``prepare`` once before the clock
    starts, ``save`` every k steps; the base class checkpoints nothing."""

    name = "no checkpointing"
    saves = False

    async def __aenter__(self) -> Checkpoints:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass

    async def prepare(self, sd: Any) -> None:
        """Set-up before the clock starts (what a user would do once)."""

    async def save(self, step: int, sd: Any) -> None:
        """Checkpoint ``sd`` as ``step``; return when training may go on (forward, backward)."""

    async def before_step(self) -> None:
        """Wait until ``optimizer.step()`` may change the state (an overlapped copy is done)."""


class DcpAsyncSave(Checkpoints):
    """``dcp.async_save``: its default, or with ``DefaultStager`` staging asynchronously on its
    cached buffers (PyTorch's best configuration, its async checkpoint recipe: the copy overlaps
    the next forward and backward; ``staging_completion`` is awaited before ``optimizer.step()``)."""

    def __init__(self, root: Path, async_staging: bool) -> None:
        self.root = root
        self.pending: Any = None
        self.staging: Any = None
        self.stager = staging.DefaultStager(DCP_ASYNC) if async_staging else None
        self.name = (
            "DCP async_save + DefaultStager(async staging)"
            if async_staging
            else "DCP async_save (default)"
        )
        self.saves = True

    async def prepare(self, sd: Any) -> None:
        if self.stager is not None:  # the caching stager's warm-up: stage once
            await dcp_stage_async(self.stager, sd)

    async def save(self, step: int, sd: Any) -> None:
        if self.pending is not None:  # DCP's pattern: the previous save must be done
            await asyncio.wrap_future(self.pending)
        out = async_save(sd, checkpoint_id=self.root / f"dcp_{step}", async_stager=self.stager)
        if isinstance(out, AsyncSaveResponse):  # with a stager that stages asynchronously
            self.staging = out.staging_completion  # awaited before the next optimizer.step()
            self.pending = out.upload_completion
        else:
            self.pending = out

    async def before_step(self) -> None:
        if self.staging is not None:
            staging, self.staging = self.staging, None
            await asyncio.wrap_future(staging)

    async def __aexit__(self, *exc: object) -> None:
        await self.before_step()
        if self.pending is not None:
            await asyncio.wrap_future(self.pending)
        if self.stager is not None:
            self.stager.close()


class TorchSave(Checkpoints):
    """``torch.save`` + fsync on the loop thread: what a plain training loop does."""

    name = "torch.save + fsync"
    saves = True

    def __init__(self, root: Path) -> None:
        self.root = root

    async def save(self, step: int, sd: Any) -> None:
        torch_save_fsync(sd, self.root / f"torch_{step}.pt")
