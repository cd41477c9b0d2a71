"""Whole tensors from a checkpoint of any world size, one at a time (what ``export`` writes).

Every rank's header is read to learn where the saved shards of each tensor lie (``reshard``'s
plan; rank 0's file gives the structure and the plain tensors, as ``aiostage.load`` does). A
tensor is then assembled from the shards that make it up: only the entries it needs are mapped,
and verified against their checksums, and the mapping and the assembled bytes are let go as soon
as the caller has written them, so memory holds about one tensor at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import mmap
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread
import torch

from .._core.tree import KeyPath, Leaf, MapNode, Node, SeqNode, TensorLeaf, Value, key_str
from .._format.codec import FileInfo, Manifest
from .._format.placements import global_shape
from ..errors import UsageError
from .backend import Storage
from .locate import PathLike, locate
from .reader import _Headers, _record_tensor, _verified_data, read_header, read_manifest
from .reshard import Piece, Saved, copy_pieces, plan_pieces

__all__ = [
    "Checkpoint",
    "Selection",
    "Unit",
    "assembly",
    "nodes",
    "open_checkpoint",
    "select",
    "whole",
]


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A checkpoint opened for reading whole tensors: every rank's header and key paths, rank
    0's structure, and the entries verified so far (each is hashed once)."""

    storage: Storage
    target: Path
    manifest: Manifest
    headers: _Headers
    root: Node
    verified: set[tuple[int, int]] = dataclasses.field(default_factory=set)

    def file(self, rank: int) -> tuple[Path, FileInfo]:
        """The path and manifest entry of the file ``rank`` saved."""
        info = self.manifest.files[rank]
        return self.target / info.name, info


@dataclass(frozen=True, slots=True)
class Unit:
    """One storage of an export: a whole tensor assembled from saved shards (``pieces``), or
    entry ``entry`` of rank 0's file as stored (the tensors that shared it share it again)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...] = ()
    entry: int = -1

    @property
    def nbytes(self) -> int:
        """Bytes of its data."""
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True, slots=True)
class Selection:
    """The sub-tree exported: its node, its key path, the rank-0 records under it."""

    node: Node
    prefix: KeyPath
    records: tuple[int, ...]

    def name(self, path: KeyPath) -> str:
        """The exported name of ``path``: dotted, relative to the sub-tree."""
        return key_str(path[len(self.prefix) :])


async def open_checkpoint(path: PathLike) -> Checkpoint:
    """The manifest and every rank's header, checked against the manifest (no tensor data).

    Raises ``CheckpointNotFound`` and ``CheckpointCorrupt`` naming the file.
    """
    storage, target = locate(path)
    manifest = await read_manifest(storage, target)
    headers: _Headers = []
    roots: list[Node] = []
    for rank, info in enumerate(manifest.files):
        header, root, paths = await read_header(storage, target / info.name, info, True, rank)
        headers.append((header, paths))
        roots.append(root)
    return Checkpoint(storage, target, manifest, headers, roots[0])


def nodes(node: Node, path: KeyPath = ()) -> Iterator[tuple[KeyPath, Node]]:
    """Every node under ``node`` with its key path, parents first."""
    yield path, node
    if isinstance(node, MapNode | SeqNode):
        keys = node.keys if isinstance(node, MapNode) else range(len(node.children))
        for k, child in zip(keys, node.children, strict=True):
            yield from nodes(child, (*path, k))


def select(ck: Checkpoint, only: str | None) -> Selection:
    """The sub-tree whose dotted key is ``only`` (the whole state dict when ``None``).

    Raises ``UsageError`` naming the checkpoint when there is none, when it is one tensor or
    value, or when another rank saved keys in it that rank 0 did not (the structure and the
    plain tensors come from rank 0).
    """
    prefix: KeyPath = ()
    node = ck.root
    if only is not None:
        found = next(((p, n) for p, n in nodes(ck.root) if p and key_str(p) == only), None)
        if found is None:
            top = ", ".join(map(str, ck.root.keys)) if isinstance(ck.root, MapNode) else "none"
            raise UsageError(f"{ck.target}: no sub-tree {only!r} (top-level keys: {top})")
        prefix, node = found
        if isinstance(node, Leaf | Value):
            what = "a tensor" if isinstance(node, Leaf) else "a value"
            raise UsageError(f"{ck.target}: {only} is {what}, not a sub-tree; --only its parent")
    paths = ck.headers[0][1]
    known = set(paths)
    for rank, (_, theirs) in enumerate(ck.headers[1:], 1):
        extra = [p for p in theirs if p[: len(prefix)] == prefix and p not in known]
        if extra:
            raise UsageError(
                f"{ck.file(rank)[0]}: rank {rank} saved {key_str(extra[0])}, which rank 0 did "
                "not; export takes the structure from rank 0 (give --only a sub-tree rank 0 has)"
            )
    records = tuple(i for i, p in enumerate(paths) if p[: len(prefix)] == prefix)
    return Selection(node, prefix, records)


def assembly(ck: Checkpoint, records: Sequence[int]) -> list[tuple[Piece, ...]]:
    """Per record of rank 0's file, the copies that assemble its whole tensor (CPU work: a
    worker thread). Raises what ``plan_pieces`` raises: ``CheckpointCorrupt`` for shards that
    do not cover a tensor or disagree on it, ``UsageError`` for a Partial placement."""
    header, paths = ck.headers[0]
    where = [str(ck.file(r)[0]) for r in range(len(ck.headers))]
    leaves = []
    for i in records:
        r = header.records[i]
        shape = global_shape(r, key_str(paths[i]), where[0])
        leaves.append(TensorLeaf(paths[i], torch.empty(shape, dtype=r.dtype, device="meta")))
    home = Saved(0, [paths[i] for i in records], [header.records[i] for i in records], where[0])
    others = [Saved(r, p, h.records, where[r]) for r, (h, p) in enumerate(ck.headers) if r]
    out: list[list[Piece]] = [[] for _ in records]
    for p in plan_pieces(leaves, [home, *others], 0, 0):
        record = records[p.record] if p.file == 0 else p.record
        out[p.target].append(dataclasses.replace(p, target=0, record=record))
    return [tuple(pieces) for pieces in out]


# ---------------------------------------------------------------- reading one unit


@contextlib.asynccontextmanager
async def whole(ck: Checkpoint, unit: Unit) -> AsyncIterator[memoryview]:
    """``async with whole(ck, unit) as data``: the bytes of a unit of at least one byte,
    C-contiguous; ``data`` is released on exit.

    Maps the entries it needs (verifying those not verified yet: ``CheckpointCorrupt`` names
    the file and key), then either hands out the bytes where they lie (an entry, or one saved
    tensor stored contiguously) or assembles them into a fresh anonymous mapping in a worker
    thread. On exit both mappings are let go in a worker thread (unmapping drops their pages):
    nothing is kept.
    """
    needed: dict[int, set[int]] = {0: {unit.entry}} if unit.entry >= 0 else {}
    for p in unit.pieces:
        needed.setdefault(p.file, set()).add(ck.headers[p.file][0].records[p.record].entry)
    datas = await _map(ck, needed)
    buf: mmap.mmap | None = None
    try:
        found = _in_place(ck, unit, datas)
        if found is None:
            buf = await anyio.to_thread.run_sync(_assemble, ck, unit, datas)
            found = memoryview(buf)
        with found:
            yield found
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_let_go, list(datas.values()), buf)


async def _map(ck: Checkpoint, needed: dict[int, set[int]]) -> dict[int, memoryview]:
    """Map the data of each file holding the entries ``needed``; verify the new ones."""
    out: dict[int, memoryview] = {}
    for f, entries in sorted(needed.items()):
        fresh = any((f, e) not in ck.verified for e in entries)
        out[f] = await _verified_data(ck.storage, *ck.file(f), *ck.headers[f], fresh, entries)
        ck.verified.update((f, e) for e in entries)
    return out


def _in_place(ck: Checkpoint, unit: Unit, datas: dict[int, memoryview]) -> memoryview | None:
    """The unit's bytes where they lie in a file: its entry, or the one saved tensor that is all
    of it, stored contiguously. ``None`` when it must be assembled."""
    if unit.entry >= 0:
        e = ck.headers[0][0].entries[unit.entry]
        return datas[0][e.begin : e.end]
    if len(unit.pieces) != 1 or unit.pieces[0].part.shape != unit.shape:
        return None
    p = unit.pieces[0]
    header = ck.headers[p.file][0]
    r = header.records[p.record]
    contiguous = [math.prod(r.shape[d + 1 :]) for d in range(len(r.shape))]
    if r.shape != unit.shape or list(r.stride) != contiguous:
        return None
    start = header.entries[r.entry].begin + r.offset * r.dtype.itemsize
    return datas[p.file][start : start + unit.nbytes]


def _assemble(ck: Checkpoint, unit: Unit, datas: dict[int, memoryview]) -> mmap.mmap:
    """A new anonymous mapping holding the unit, copied from the mapped shards (worker thread)."""
    buf = mmap.mmap(-1, unit.nbytes)
    target = torch.frombuffer(buf, dtype=torch.uint8).view(unit.dtype).view(unit.shape)
    copy_pieces(unit.pieces, [target], functools.partial(_record_tensor, datas, ck.headers))
    return buf


def _let_go(datas: list[memoryview], buf: mmap.mmap | None) -> None:
    """Drop the pages of the file mappings and of the assembled one, and release them (worker
    thread). ``MADV_DONTNEED`` first: a worker thread may not have dropped its view of a
    mapping yet (the write it ran has returned, its work item not yet freed), which would keep
    the mapping and its pages until it does; a private mapping reads the file again if touched.
    """
    for data in datas:
        _dont_need(data.obj)
        data.release()
    if buf is not None:
        _dont_need(buf)
        with contextlib.suppress(BufferError):  # a view on it outlived the write: GC frees it
            buf.close()


def _dont_need(obj: object) -> None:
    """Tell the kernel the pages of mapping ``obj`` are not needed (a no-op for other memory)."""
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if isinstance(obj, mmap.mmap) and advice is not None and not obj.closed:
        obj.madvise(advice)
