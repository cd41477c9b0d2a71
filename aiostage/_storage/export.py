"""``aiostage export``: a checkpoint of any world size written as whole tensors, streamed.

The plan reads headers only: which whole tensors (``consolidate.Unit``) go where in which output
file, around the bytes that frame them (a safetensors header; the zip records and pickle of a
``torch.save`` file). Writing assembles one unit at a time, writes it, and lets it go. The files
go into a hidden sibling of the output (``.{name}.aiostage-tmp-{token}``, which
``aiostage.sweep`` removes if the export is interrupted), each fsynced, and are renamed into
place once all are written: the output appears whole or not at all, with the umask's mode.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.to_thread
import torch

from .._core.dtypes import ST_DTYPES
from .._core.storages import View, view_tensor
from .._core.tree import (
    KeyPath,
    MapNode,
    Node,
    SeqNode,
    TensorLeaf,
    Tree,
    Value,
    key_str,
    unflatten,
)
from .._format.hf import (
    INDEX_NAME,
    TensorSpec,
    index_json,
    safetensors_header,
    shard_names,
    split_shards,
)
from .._format.placements import global_shape
from .._format.torchzip import torch_layout
from ..errors import CheckpointCorrupt, UsageError
from . import localfs
from .consolidate import (
    Checkpoint,
    Selection,
    Unit,
    assembly,
    nodes,
    open_checkpoint,
    select,
    whole,
)
from .local import LOCAL
from .locate import PathLike
from .reader import _leaf
from .reshard import Piece

__all__ = ["FORMATS", "ExportPlan", "plan_export", "write_export"]

#: the formats ``export`` writes
FORMATS = ("safetensors", "torch")


@dataclass(frozen=True, slots=True)
class _File:
    """One output file: ``size`` bytes, made of ``parts`` (bytes or a unit's data) at offsets."""

    name: str
    size: int
    parts: tuple[tuple[int, bytes | Unit], ...]


@dataclass(frozen=True, slots=True)
class ExportPlan:
    """What an export will write: ``out`` (a file, or a directory of ``files`` when sharded)."""

    source: Checkpoint
    out: Path
    directory: bool
    files: tuple[_File, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data to assemble and write (what progress counts)."""
        return sum(p.nbytes for f in self.files for _, p in f.parts if isinstance(p, Unit))


# ---------------------------------------------------------------- planning


async def plan_export(
    path: PathLike,
    fmt: str,
    out: Path,
    *,
    only: str | None = None,
    max_shard_size: int | None = None,
) -> ExportPlan:
    """Read the headers of the checkpoint at ``path`` and plan its export to ``out``.

    ``fmt`` "safetensors": one file, or with ``max_shard_size`` (bytes) a directory of shards
    and ``model.safetensors.index.json`` as Hugging Face writes them; "torch": one
    ``torch.save`` file. ``only``: the dotted key of the sub-tree to export (names relative to
    it). Reads no tensor data. Raises ``UsageError`` naming the key or file (``out`` exists, no
    such sub-tree, a name taken twice, a dtype or value safetensors cannot hold, keys that rank
    0 does not have), ``CheckpointNotFound`` and ``CheckpointCorrupt``.
    """
    if fmt not in FORMATS:
        raise UsageError(f"export writes {' or '.join(FORMATS)}, not {fmt!r}")
    if max_shard_size is not None and fmt != "safetensors":
        raise UsageError("--max-shard-size cuts safetensors files only: use --to safetensors")
    if await LOCAL.kind(out) != "absent":
        raise UsageError(f"{out} exists; remove it or choose another output path")
    ck = await open_checkpoint(path)
    sel = await anyio.to_thread.run_sync(select, ck, only)
    _check_sizes(ck, sel, dense=fmt == "safetensors")
    pieces = await anyio.to_thread.run_sync(assembly, ck, sel.records)
    files: tuple[_File, ...]
    if fmt == "torch":
        files = (await anyio.to_thread.run_sync(_torch_file, ck, sel, pieces, out.name),)
    else:
        make = _safetensors_files
        files = await anyio.to_thread.run_sync(make, ck, sel, pieces, out.name, max_shard_size)
    return ExportPlan(ck, out, max_shard_size is not None, files)


def _check_sizes(ck: Checkpoint, sel: Selection, *, dense: bool) -> None:
    """Refuse, before anything is allocated, a tensor that the export would hold whole in memory
    (every tensor when ``dense``, else the DTensors) but that is larger than all the data of the
    checkpoint: a view with stride 0 over a few stored bytes, or a DTensor whose stated global
    shape its saved shards repeat to. ``UsageError`` naming the key and the sizes."""
    budget = sum(h.data_bytes for h, _ in ck.headers)
    header, paths = ck.headers[0]
    where = ck.file(0)[0]
    for i in sel.records:
        r, key = header.records[i], key_str(paths[i])
        if not dense and r.wrap != "dtensor":
            continue  # --to torch writes a plain tensor's storage as it was stored
        shape = global_shape(r, key, str(where))
        if any(n < 0 for n in shape):
            raise CheckpointCorrupt(
                f"{where}: {key} has a negative size {list(shape)}", path=where, key=key
            )
        nbytes = math.prod(shape) * r.dtype.itemsize
        if nbytes > budget:
            hint = "; export --to torch keeps it a view" if r.wrap != "dtensor" else ""
            raise UsageError(
                f"{key}: whole, this {list(shape)} {r.dtype} tensor is {nbytes} bytes, more than "
                f"the {budget} bytes of data in the checkpoint (its stored bytes are repeated, "
                f"stride 0); export assembles no tensor larger than the checkpoint{hint}"
            )


def _safetensors_files(
    ck: Checkpoint,
    sel: Selection,
    pieces: Sequence[tuple[Piece, ...]],
    name: str,
    max_shard_size: int | None,
) -> tuple[_File, ...]:
    """The safetensors file named ``name`` of the selection, or its shards and their index
    (worker thread)."""
    specs = _specs(ck, sel)
    metadata = _metadata(ck, sel)
    if max_shard_size is None:
        groups, names = [list(range(len(specs)))], [name]
    else:
        groups = split_shards([s.nbytes for s in specs], max_shard_size)
        names = shard_names(len(groups))
    files = []
    for group, file in zip(groups, names, strict=True):
        head = safetensors_header([specs[j] for j in group], metadata)
        parts: list[tuple[int, bytes | Unit]] = [(0, head)]
        at = len(head)
        for j in group:
            parts.append((at, Unit(specs[j].dtype, specs[j].shape, pieces[j])))
            at += specs[j].nbytes
        files.append(_File(file, at, tuple(parts)))
    if len(files) > 1:
        weights = {specs[j].name: file for g, file in zip(groups, names, strict=True) for j in g}
        index = index_json(sum(s.nbytes for s in specs), weights)
        files.append(_File(INDEX_NAME, len(index), ((0, index),)))
    return tuple(files)


def _specs(ck: Checkpoint, sel: Selection) -> list[TensorSpec]:
    """Name, dtype and whole shape of each selected tensor; ``UsageError`` naming the key of a
    dtype safetensors lacks or of two tensors whose dotted names are the same."""
    header, paths = ck.headers[0]
    where = str(ck.file(0)[0])
    specs: list[TensorSpec] = []
    taken: dict[str, KeyPath] = {}
    for i in sel.records:
        key, r = key_str(paths[i]), header.records[i]
        spec = TensorSpec(sel.name(paths[i]), r.dtype, global_shape(r, key, where))
        if spec.name in taken:
            raise UsageError(
                f"{key}: the tensors at key paths {list(taken[spec.name])} and {list(paths[i])} "
                f"both export as {spec.name!r}; rename one, or export --to torch"
            )
        if r.dtype not in ST_DTYPES:
            raise UsageError(f"{key}: safetensors cannot hold {r.dtype}; export --to torch")
        taken[spec.name] = paths[i]
        specs.append(spec)
    return specs


def _metadata(ck: Checkpoint, sel: Selection) -> dict[str, str]:
    """What a safetensors file's metadata holds: ``format: pt`` (which ``transformers``
    requires), the checkpoint's metadata, and each non-tensor value as JSON by its name."""
    out = {"format": "pt", "aiostage.metadata": json.dumps(ck.manifest.metadata)}
    reserved = set(out)
    for path, node in nodes(sel.node, sel.prefix):
        if not isinstance(node, Value):
            continue
        key, name = key_str(path), sel.name(path)
        try:
            text = json.dumps(node.value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            kind = type(node.value).__name__
            raise UsageError(
                f"{key}: safetensors cannot hold this {kind} value ({node.value!r:.40}): its "
                "metadata holds JSON text only; export --to torch, or --only a sub-tree without it"
            ) from exc
        if name in out:
            why = "a name safetensors metadata reserves" if name in reserved else "taken twice"
            raise UsageError(f"{key}: the value's name {name!r} is {why}; export --to torch")
        out[name] = text
    return out


def _torch_file(
    ck: Checkpoint, sel: Selection, pieces: Sequence[tuple[Piece, ...]], name: str
) -> _File:
    """The ``torch.save`` file named ``name`` of the selection (worker thread): its structure
    with whole tensors, plain tensors sharing the storage they shared (as ``aiostage.load``
    returns them, namedtuples as plain tuples); laid out around placeholders whose memory is
    never touched."""
    header, paths = ck.headers[0]
    data, units, probes = _placeholders(ck, sel, dict(zip(sel.records, pieces, strict=True)))
    leaves = tuple(_leaf(p, r) for p, r in zip(paths, header.records, strict=True))
    for i in sel.records:
        _restorable(leaves[i])
    obj = unflatten(Tree(_plain_tuples(sel.node), leaves), data, copy_values=False)
    zipped = torch_layout(obj, probes)
    parts: list[tuple[int, bytes | Unit]] = [
        *zipped.chunks,
        *zip(zipped.offsets, units, strict=True),
    ]
    return _File(name, zipped.size, tuple(sorted(parts, key=lambda part: part[0])))


def _plain_tuples(node: Node) -> Node:
    """``node`` with its namedtuples made plain tuples: their classes were made when the header
    was decoded, so ``torch.save`` could not pickle them by reference, nor ``torch.load`` (with
    ``weights_only=True``) rebuild them."""
    if isinstance(node, SeqNode):
        return SeqNode(tuple if node.named else node.cls, tuple(map(_plain_tuples, node.children)))
    if isinstance(node, MapNode):
        return dataclasses.replace(node, children=tuple(map(_plain_tuples, node.children)))
    return node


def _placeholders(
    ck: Checkpoint, sel: Selection, chosen: dict[int, tuple[Piece, ...]]
) -> tuple[list[torch.Tensor], list[Unit], list[tuple[KeyPath, int]]]:
    """A stand-in for each tensor of rank 0's file (uninitialised: ``torch.empty`` reserves,
    it does not touch), the units that fill their storages, and per unit a tensor's key path
    in the selection and the unit's bytes (what ``torch_layout`` asks about)."""
    header, paths = ck.headers[0]
    data: list[torch.Tensor] = []
    units: list[Unit] = []
    probes: list[tuple[KeyPath, int]] = []
    shared: dict[int, torch.UntypedStorage] = {}
    viewed_as: dict[int, tuple[KeyPath, torch.dtype]] = {}
    for i, (p, r) in enumerate(zip(paths, header.records, strict=True)):
        if i not in chosen:
            data.append(torch.empty(0))
        elif r.wrap == "dtensor":  # the whole tensor, in its own storage
            shape = global_shape(r, key_str(p), str(ck.file(0)[0]))
            units.append(Unit(r.dtype, shape, chosen[i]))
            probes.append((p[len(sel.prefix) :], units[-1].nbytes))
            data.append(torch.empty(units[-1].shape, dtype=r.dtype))
        elif r.numel and r.entry >= 0:  # a view into its entry, shared as it was
            if r.entry not in shared:
                e = header.entries[r.entry]
                units.append(Unit(torch.uint8, (e.end - e.begin,), entry=r.entry))
                probes.append((p[len(sel.prefix) :], units[-1].nbytes))
                shared[r.entry] = torch.empty(e.end - e.begin, dtype=torch.uint8).untyped_storage()
            _one_dtype(viewed_as.setdefault(r.entry, (p, r.dtype)), p, r.dtype)
            view = View(0, r.offset, r.shape, r.stride, r.dtype)
            data.append(view_tensor(view, [shared[r.entry]]))
        else:
            data.append(torch.empty_strided(r.shape, r.stride, dtype=r.dtype))
    return data, units, probes


def _one_dtype(first: tuple[KeyPath, torch.dtype], path: KeyPath, dtype: torch.dtype) -> None:
    """``UsageError`` naming both keys when the tensor at ``path`` views a storage as another
    dtype than the ``first`` tensor on it did: ``torch.save`` holds a storage as one dtype."""
    if first[1] != dtype:
        raise UsageError(
            f"{key_str(path)}: it views the storage of {key_str(first[0])} as {dtype}, not "
            f"{first[1]}, and torch.save holds a storage as one dtype; export --to safetensors "
            "(which copies each tensor), or --only a sub-tree without one of them"
        )


def _restorable(leaf: TensorLeaf) -> None:
    """``UsageError`` naming the key of a tensor with a Python attribute that torch's tensors
    define themselves (``data``, ``grad``, ``shape``): ``torch.load`` sets the attributes of a
    saved tensor one by one, and those cannot be set to a saved value."""
    for name in leaf.attrs:
        found = inspect.getattr_static(torch.nn.Parameter, name, None)
        if found is not None and hasattr(type(found), "__set__"):
            raise UsageError(
                f"{leaf.key}: its attribute {name!r} is one torch tensors have themselves, "
                "which torch.load cannot restore; export --to safetensors"
            )


# ---------------------------------------------------------------- writing


async def write_export(plan: ExportPlan, progress: Callable[[int], None]) -> list[tuple[Path, int]]:
    """Write what ``plan`` says; return each file written and its size.

    Tensors are assembled one at a time from the saved shards, whose entries are verified on
    the way (``progress`` hears of the bytes written); files are fsynced in a hidden sibling of
    ``plan.out`` and renamed into place at the end, so ``plan.out`` appears whole or not at all.
    Blocks worker threads only. Raises ``CheckpointCorrupt`` naming the file and key of data
    that does not match its checksum, ``UsageError`` if ``plan.out`` appeared meanwhile (nothing
    is replaced), and ``OSError``.
    """
    staging = await _staging(plan.out)
    try:
        for f in plan.files:
            await _write_file(plan.source, staging / f.name, f, progress)
        await LOCAL.seal(staging)
        if plan.directory:
            await LOCAL.commit(staging, plan.out, overwrite=False)
        else:
            await localfs.rename_noreplace(staging / plan.files[0].name, plan.out)
            await localfs.fsync_dir(plan.out.parent)
    except FileExistsError as exc:
        raise UsageError(f"{plan.out} appeared while exporting; nothing was replaced") from exc
    finally:
        with anyio.CancelScope(shield=True):
            await LOCAL.discard(staging)
    if not plan.directory:
        return [(plan.out, plan.files[0].size)]
    return [(plan.out / f.name, f.size) for f in plan.files]


async def _staging(out: Path) -> Path:
    """Create the hidden sibling ``out`` is written in (and ``out``'s missing parents): a random
    name, made by ``mkdir``, which fails on anything already there (a planted symlink too)."""
    await localfs.make_parents(out.parent)
    staging = localfs.temp_path(out, secrets.token_hex(16))
    await localfs.make_dir(staging)
    return staging


async def _write_file(
    ck: Checkpoint, path: Path, f: _File, progress: Callable[[int], None]
) -> None:
    """Create ``path`` and write ``f``'s parts in order, one whole tensor at a time; fsync."""
    async with LOCAL.create(path, direct=False) as sink:
        for offset, part in f.parts:
            if isinstance(part, bytes):
                await sink.write_at(offset, memoryview(part), len(part))
            elif part.nbytes:
                async with whole(ck, part) as data:
                    await sink.write_at(offset, data, part.nbytes)
                progress(part.nbytes)
        await sink.finish(f.size)
