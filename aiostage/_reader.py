"""``aiostage.load``: open a checkpoint, verify it, and rebuild the state dict or fill one in place.

The manifest says which files make the checkpoint and how big they are; a data file's header is
validated against its real size before anything is allocated. The data is mapped copy-on-write
and paged in by hashing it in worker threads (faster here than reading into fresh memory, and no
copy); every stored entry becomes one storage, every tensor a view into it, so aliasing survives.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import torch
import xxhash

from . import _dist, _fs
from ._format import (
    MANIFEST,
    FileInfo,
    Header,
    Manifest,
    Record,
    decode_header,
    decode_manifest,
    header_length,
)
from ._skeleton import decode_skeleton, decode_value
from ._tree import (
    KeyPath,
    Node,
    TensorLeaf,
    Tree,
    View,
    Wrap,
    flatten,
    key_str,
    unflatten,
    view_tensor,
)
from .errors import (
    CheckpointCorrupt,
    CheckpointNotFound,
    PersistenceError,
    StateDictMismatch,
    UsageError,
)

__all__ = ["load", "load_metadata", "read_manifest"]

_CHUNK = 16 << 20
_MAX_MANIFEST = 64 << 20
_NO_DATA = torch.empty(0)


async def load(
    path: str | os.PathLike[str],
    *,
    into: Any = None,
    map_location: str | torch.device = "cpu",
    verify: bool = True,
    pg: Any = None,
) -> Any:
    """Read the checkpoint at ``path`` and return its state dict.

    Tensors that shared storage when saved share it again; DTensors come back as their local
    tensor. With ``into`` (a state dict of existing tensors, e.g. ``model.state_dict()``),
    every tensor is first checked against the checkpoint, then copied in place, and the result
    holds ``into``'s own tensor objects (and the checkpoint's non-tensor values);
    ``map_location`` is then ignored. With ``pg``, each rank reads the file it wrote.

    Blocks on nothing: reads, hashing and copies run in worker threads. Raises
    ``CheckpointNotFound`` (no manifest at ``path``), ``CheckpointCorrupt`` naming the file and
    key (a checksum, size or header that does not match; ``verify=False`` skips the checksum
    comparison, to salvage a damaged checkpoint), ``StateDictMismatch`` listing every
    difference from ``into`` (before anything is copied) and ``UsageError`` when the world size
    differs from the saving one.
    """
    target, device = Path(path), torch.device(map_location)
    rank, info = await _my_file(target, pg)
    file = target / info.name
    header, root, paths = await _read_header(file, info, verify, rank)
    targets = None
    if into is not None:
        targets = await anyio.to_thread.run_sync(_targets, into, paths, header.records, file)
    data, digests = await _map_data(file, header, info.size - header.data_bytes, verify)
    _check_sums(digests, header, paths, file)
    if targets is None:
        return await anyio.to_thread.run_sync(_build, data, header, root, paths, file, device)
    return await anyio.to_thread.run_sync(_fill_into, data, header, targets, root, paths, into)


async def _my_file(target: Path, pg: Any) -> tuple[int, FileInfo]:
    """This rank and the manifest's entry for its data file."""
    manifest = await read_manifest(target)
    rank, world = _dist.rank_and_size(pg) if pg is not None else (0, 1)
    if manifest.world_size != world:
        raise UsageError(
            f"{target} was saved by {manifest.world_size} rank(s); load it from a process group "
            f"of that size (pg=...), not from {world}"
        )
    return rank, manifest.files[rank]


async def load_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``metadata`` the checkpoint at ``path`` was saved with (its manifest's copy).

    Reads only ``manifest.json``; raises ``CheckpointNotFound`` and ``CheckpointCorrupt``.
    """
    return (await read_manifest(Path(path))).metadata


async def read_manifest(target: Path) -> Manifest:
    """Read and validate ``target/manifest.json`` (``CheckpointNotFound`` if there is none)."""
    file = target / MANIFEST
    try:
        raw = await _fs.read_at(file, 0, _MAX_MANIFEST + 1)
    except (FileNotFoundError, NotADirectoryError) as exc:
        hint = await _recoverable(target)
        raise CheckpointNotFound(
            f"no checkpoint at {target} (no {MANIFEST}){hint}", path=target
        ) from exc
    except OSError as exc:
        raise PersistenceError(f"cannot read {file}: {exc}", path=file) from exc
    if len(raw) > _MAX_MANIFEST:
        raise CheckpointCorrupt(f"{file}: larger than {_MAX_MANIFEST} bytes", path=file)
    return decode_manifest(raw, str(file))


async def _recoverable(target: Path) -> str:
    """A hint when an interrupted overwrite left the checkpoint under a temporary name."""
    try:
        names = await _fs.list_dir(target.parent)
    except OSError:
        return ""
    for name in names:
        m = _fs.TEMP_NAME.match(name)
        if m and m["name"] == target.name and m["kind"] == "old":
            root = str(target.parent)
            return f"; an interrupted overwrite left it beside: run aiostage.sweep({root!r})"
    return ""


async def _read_header(
    file: Path, info: FileInfo, verify: bool, rank: int
) -> tuple[Header, Node, list[KeyPath]]:
    """Read, check and decode the header of ``file`` (decoding in a worker thread)."""
    try:
        size = await _fs.file_size(file)
        if size != info.size:
            raise CheckpointCorrupt(
                f"{file}: {size} bytes on disk but the manifest says {info.size} (truncated or "
                "replaced)",
                path=file,
            )
        first = await _fs.read_at(file, 0, 8)
        body = await _fs.read_at(file, 8, header_length(first, size, str(file)))
    except FileNotFoundError as exc:
        raise CheckpointCorrupt(f"{file}: listed in the manifest but missing", path=file) from exc
    except OSError as exc:
        raise PersistenceError(f"cannot read {file}: {exc}", path=file) from exc
    if verify and xxhash.xxh3_64_intdigest(first + body) != info.header_xxh3:
        raise CheckpointCorrupt(f"{file}: the header does not match its checksum", path=file)
    return await anyio.to_thread.run_sync(_decode, body, size - 8 - len(body), file, rank)


def _decode(
    body: bytes, data_len: int, file: Path, rank: int
) -> tuple[Header, Node, list[KeyPath]]:
    header = decode_header(body, data_len, str(file))
    if header.rank != rank:
        raise CheckpointCorrupt(f"{file}: written by rank {header.rank}, not {rank}", path=file)
    root, paths = decode_skeleton(header.skeleton, len(header.records), str(file))
    return header, root, paths


async def _map_data(
    file: Path, header: Header, start: int, verify: bool
) -> tuple[memoryview, list[int] | None]:
    """Map ``file`` copy-on-write and return its data (from byte ``start``), paged in.

    Every entry is hashed (xxh3_64) chunk by chunk in worker threads, which is also what brings
    its pages in (sequential faults ride the kernel's readahead): afterwards touching a tensor
    never blocks on the disk. Returns the digests when ``verify``.
    """
    try:
        mapping = await _fs.map_private(file, start + header.data_bytes)
    except OSError as exc:
        raise PersistenceError(f"cannot map {file}: {exc}", path=file) from exc
    data = memoryview(mapping)[start:]
    entries = header.entries
    order = sorted(range(len(entries)), key=lambda i: (entries[i].begin, entries[i].end))
    hashes = [xxhash.xxh3_64() for _ in entries]
    lengths = [entries[i].end - entries[i].begin for i in order]
    for pieces in _fs.cut(lengths, _CHUNK):
        spans = [(order[seg], entries[order[seg]].begin + at, n) for seg, at, n in pieces]
        await anyio.to_thread.run_sync(_hash, data, spans, hashes)
    return data, [h.intdigest() for h in hashes] if verify else None


def _hash(data: memoryview, spans: list[tuple[int, int, int]], hashes: list[Any]) -> None:
    """Feed ``data[begin : begin + n]`` to entry ``index``'s hash for each span (worker thread)."""
    for index, begin, n in spans:
        hashes[index].update(data[begin : begin + n])


def _check_sums(
    digests: list[int] | None, header: Header, paths: list[KeyPath], file: Path
) -> None:
    if digests is None:
        return
    for i, (e, want, got) in enumerate(zip(header.entries, header.checksums, digests, strict=True)):
        if want != got:
            keys = [key_str(paths[t]) for t, r in enumerate(header.records) if r.entry == i]
            raise CheckpointCorrupt(
                f"{file}: checksum mismatch in entry {e.name!r} (tensor {', '.join(keys)}): the "
                "data is corrupt; load an earlier checkpoint",
                path=file,
                key=keys[0] if keys else e.name,
            )


def _tensors(data: memoryview, header: Header, device: torch.device) -> list[torch.Tensor]:
    """One storage per entry (moved to ``device``), one view per record (worker thread)."""
    flats = [
        torch.frombuffer(data[e.begin : e.end], dtype=torch.uint8)
        if e.end > e.begin
        else torch.empty(0, dtype=torch.uint8)
        for e in header.entries
    ]
    if device.type != "cpu":
        flats = [t.to(device) for t in flats]
    storages = [t.untyped_storage() for t in flats]
    out = []
    for r in header.records:
        view = View(r.entry if r.numel else -1, r.offset, r.shape, r.stride, r.dtype)
        t = view_tensor(view, storages)
        out.append(t if t.device == device else t.to(device))
    return out


def _build(
    data: memoryview,
    header: Header,
    root: Node,
    paths: list[KeyPath],
    file: Path,
    device: torch.device,
) -> Any:
    """The loaded state dict (worker thread)."""
    leaves = [_leaf(p, r, file) for p, r in zip(paths, header.records, strict=True)]
    return unflatten(Tree(root, tuple(leaves)), _tensors(data, header, device), copy_values=False)


def _leaf(path: KeyPath, r: Record, file: Path) -> TensorLeaf:
    """How to wrap record ``r``: a DTensor comes back as its local shard (a Parameter if it was)."""
    was_param = r.wrap == "dtensor" and isinstance(r.dtensor, dict) and r.dtensor.get("param")
    wrap: Wrap = "parameter" if r.wrap == "parameter" or was_param else "tensor"
    try:
        attrs = decode_value(r.attrs) if r.attrs is not None else {}
        if not isinstance(attrs, dict) or not all(isinstance(k, str) for k in attrs):
            raise ValueError("tensor attributes must be a dict with str keys")
    except ValueError as exc:
        raise CheckpointCorrupt(f"{file}: {exc}", path=file, key=key_str(path)) from exc
    return TensorLeaf(path, _NO_DATA, wrap, r.requires_grad, attrs)


# ---------------------------------------------------------------- loading in place


def _targets(
    into: Any, paths: list[KeyPath], records: Sequence[Record], file: Path
) -> list[torch.Tensor]:
    """The tensor of ``into`` for each record; ``StateDictMismatch`` listing every difference."""
    mine = {leaf.path: leaf for leaf in flatten(into).leaves}
    theirs = dict(zip(paths, records, strict=True))
    problems = [
        f"missing key {key_str(p)}: in the target, not in the checkpoint"
        for p in mine
        if p not in theirs
    ]
    problems += [
        f"unexpected key {key_str(p)}: in the checkpoint, not in the target"
        for p in theirs
        if p not in mine
    ]
    for p, r in theirs.items():
        if p in mine:
            problems += _differences(key_str(p), r, mine[p])
    if problems:
        raise StateDictMismatch(
            f"{file}: the target differs from the checkpoint in {len(problems)} place(s):\n  "
            + "\n  ".join(problems),
            path=file,
            problems=problems,
        )
    return [mine[p].data for p in paths]


def _differences(key: str, r: Record, leaf: TensorLeaf) -> list[str]:
    out = []
    if tuple(leaf.data.shape) != r.shape:
        out.append(
            f"shape mismatch at {key}: checkpoint {list(r.shape)}, target {list(leaf.data.shape)}"
        )
    if leaf.data.dtype != r.dtype:
        out.append(f"dtype mismatch at {key}: checkpoint {r.dtype}, target {leaf.data.dtype}")
    if leaf.wrap == "dtensor" and isinstance(r.dtensor, dict):
        ours, theirs = list(leaf.spec.tensor_meta.shape), r.dtensor.get("shape")
        if ours != theirs:
            out.append(f"global shape mismatch at {key}: checkpoint {theirs}, target {ours}")
    return out


def _fill_into(
    data: memoryview,
    header: Header,
    targets: Sequence[torch.Tensor],
    root: Node,
    paths: list[KeyPath],
    into: Any,
) -> Any:
    """Copy each loaded tensor into its target; the checkpoint's structure holding ``into``'s
    own tensor objects (worker thread)."""
    with torch.no_grad():
        for dst, src in zip(targets, _tensors(data, header, torch.device("cpu")), strict=True):
            dst.copy_(src)
    objs = [_lookup(into, p) for p in paths]
    leaves = tuple(TensorLeaf(p, _NO_DATA) for p in paths)
    return unflatten(Tree(root, leaves), objs, copy_values=False)


def _lookup(obj: Any, path: KeyPath) -> Any:
    for k in path:
        obj = getattr(obj, str(k)) if is_dataclass(obj) else obj[k]
    return obj
