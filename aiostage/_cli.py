"""What the ``aiostage`` commands compute: listing, header reading, verification and export.

Nothing here prints; ``__main__`` parses the command line and renders what these return. Headers
are read without the tensor data; verification hashes every entry in worker threads, chunk by
chunk, reporting its progress in bytes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import torch
import xxhash

from ._core.dtypes import ST_DTYPES
from ._core.tree import KeyPath, MapNode, Node, SeqNode, Value, flatten, key_str
from ._format.codec import MANIFEST, FileInfo, Header, Manifest, decode_manifest
from ._storage import localfs, reader
from ._storage.reader import load, read_manifest
from .errors import CheckpointCorrupt, UsageError

__all__ = [
    "Found",
    "RankFile",
    "export",
    "read_checkpoint",
    "scan",
    "verify",
]

#: the step directories ``Checkpointer`` names ``f"step_{step:09d}"``
STEP_NAME = re.compile(r"^step_(?P<step>\d+)$")
_CHUNK = 16 << 20
#: called with a number of bytes just processed
Progress = Callable[[int], None]


# ---------------------------------------------------------------- ls


@dataclass(frozen=True, slots=True)
class Found:
    """One checkpoint (or what an interrupted save left) under a root directory.

    ``status`` is "committed" (a valid manifest whose files have the sizes it lists),
    "incomplete" (no manifest: a save was interrupted) or "corrupt"; ``note`` says why.
    """

    path: Path
    step: int | None
    status: str
    size: int
    mtime: float
    note: str = ""


async def scan(root: Path) -> list[Found]:
    """The checkpoints in ``root`` (and ``root`` itself if it is one), sorted by step.

    Lists step directories whatever their state, temporaries of interrupted saves, and any other
    subdirectory holding a manifest. Blocks a worker thread; raises ``OSError`` for a missing
    or unreadable ``root``.
    """
    return await anyio.to_thread.run_sync(_scan, root)


def _scan(root: Path) -> list[Found]:
    if not root.is_dir():
        err = errno.ENOTDIR if root.exists() else errno.ENOENT
        raise OSError(err, os.strerror(err), str(root))
    found = [_describe(root, root.resolve().name, None)] if (root / MANIFEST).exists() else []
    for child in sorted(root.iterdir()):
        if not child.is_dir() or child.is_symlink():
            continue
        tmp = localfs.TEMP_NAME.match(child.name)
        if tmp or STEP_NAME.match(child.name) or (child / MANIFEST).exists():
            try:
                found.append(_describe(child, tmp["name"] if tmp else child.name, tmp))
            except FileNotFoundError:
                continue  # it went while we looked: a save committed or a sweep removed it
    return sorted(found, key=lambda f: (f.step is None, f.step or 0, f.path.name))


def _describe(path: Path, name: str, tmp: re.Match[str] | None) -> Found:
    step_match = STEP_NAME.match(name)
    step = int(step_match["step"]) if step_match else None
    size, mtime = _tree_size(path)
    if tmp is not None:
        why = "an interrupted overwrite" if tmp["kind"] == "old" else "an interrupted save"
        note = f"left by {why} of {name}; aiostage.sweep removes it"
        return Found(path, step, "incomplete", size, mtime, note)
    status, note = _manifest_status(path)
    if status != "incomplete":
        mtime = (path / MANIFEST).stat().st_mtime
    return Found(path, step, status, size, mtime, note)


def _manifest_status(path: Path) -> tuple[str, str]:
    """("committed" | "incomplete" | "corrupt", why) from the manifest and the file sizes."""
    try:
        raw = (path / MANIFEST).read_bytes()
    except FileNotFoundError:
        return "incomplete", f"no {MANIFEST}"
    try:
        manifest = decode_manifest(raw, str(path / MANIFEST))
    except CheckpointCorrupt as exc:
        return "corrupt", str(exc)
    for info in manifest.files:
        file = path / info.name
        size = file.stat().st_size if file.exists() else None
        if size is None:
            return "corrupt", f"{file}: listed in the manifest but missing"
        if size != info.size:
            return "corrupt", f"{file}: {size} bytes on disk, the manifest says {info.size}"
    return "committed", ""


def _tree_size(path: Path) -> tuple[int, float]:
    """Bytes of the files under ``path`` and the latest modification time found."""
    size, mtime = 0, path.stat().st_mtime
    for folder, _, names in os.walk(path):
        for name in names:
            st = os.stat(os.path.join(folder, name), follow_symlinks=False)
            size, mtime = size + st.st_size, max(mtime, st.st_mtime)
    return size, mtime


# ---------------------------------------------------------------- inspect


@dataclass(frozen=True, slots=True)
class RankFile:
    """A data file's header, decoded: its tensors' records and the state dict's skeleton."""

    path: Path
    size: int
    header: Header
    root: Node
    paths: list[KeyPath]


async def read_checkpoint(path: Path) -> tuple[Manifest, list[RankFile]]:
    """The manifest and every data file's decoded header; no tensor data is read.

    Raises ``CheckpointNotFound`` (no manifest), ``CheckpointCorrupt`` naming the file (sizes,
    header checksum or header contents that do not match) and ``PersistenceError`` (unreadable).
    """
    manifest = await read_manifest(path)
    return manifest, [
        await read_header(path, info, rank) for rank, info in enumerate(manifest.files)
    ]


async def read_header(directory: Path, info: FileInfo, rank: int) -> RankFile:
    """Read and check the header of ``directory/info.name`` against the manifest's ``info``."""
    file = directory / info.name
    header, root, paths = await reader.read_header(file, info, True, rank)
    return RankFile(file, info.size, header, root, paths)


# ---------------------------------------------------------------- verify


async def verify(path: Path, progress: Progress) -> tuple[list[RankFile], list[CheckpointCorrupt]]:
    """Check every data file of the checkpoint at ``path``: sizes, headers and data checksums.

    Returns the files whose headers could be read and every problem found (each names its file
    and, for data, the key of a tensor in the corrupt entry). Hashes the data in worker threads,
    calling ``progress`` with the bytes done. Raises ``CheckpointNotFound`` (no manifest) and
    ``CheckpointCorrupt`` (a manifest that cannot be decoded).
    """
    manifest = await read_manifest(path)
    files: list[RankFile] = []
    problems: list[CheckpointCorrupt] = []
    for rank, info in enumerate(manifest.files):
        try:
            rf = await read_header(path, info, rank)
        except CheckpointCorrupt as exc:
            problems.append(exc)
            continue
        files.append(rf)
        digests = await _hash_entries(rf, progress)
        problems += _mismatches(rf, digests)
    return files, problems


async def _hash_entries(rf: RankFile, progress: Progress) -> list[int]:
    """xxh3_64 of each entry's bytes, hashed chunk by chunk in worker threads."""
    entries = rf.header.entries
    start = rf.size - rf.header.data_bytes
    hashes = [xxhash.xxh3_64() for _ in entries]
    order = sorted(range(len(entries)), key=lambda i: entries[i].begin)
    lengths = [entries[i].end - entries[i].begin for i in order]
    mapping = await localfs.map_private(rf.path, rf.size)
    try:
        with memoryview(mapping) as data:
            for pieces in localfs.cut(lengths, _CHUNK):
                spans = [(order[s], start + entries[order[s]].begin + at, n) for s, at, n in pieces]
                await anyio.to_thread.run_sync(_hash, data, spans, hashes)
                progress(sum(n for _, _, n in spans))
    finally:
        with contextlib.suppress(BufferError):  # a cancelled hash still holds a view
            mapping.close()
    return [h.intdigest() for h in hashes]


def _hash(data: memoryview, spans: list[tuple[int, int, int]], hashes: list[Any]) -> None:
    for index, begin, n in spans:
        hashes[index].update(data[begin : begin + n])


def _mismatches(rf: RankFile, digests: list[int]) -> list[CheckpointCorrupt]:
    out = []
    header = rf.header
    for i, (want, got) in enumerate(zip(header.checksums, digests, strict=True)):
        if want != got:
            keys = [key_str(rf.paths[t]) for t, r in enumerate(header.records) if r.entry == i]
            what = f"tensor {', '.join(keys)}" if keys else f"entry {header.entries[i].name}"
            out.append(
                CheckpointCorrupt(
                    f"{rf.path}: checksum mismatch in {what}: the data is corrupt",
                    path=rf.path,
                    key=keys[0] if keys else header.entries[i].name,
                )
            )
    return out


# ---------------------------------------------------------------- export


async def export(path: Path, fmt: str, out: Path, progress: Progress) -> int:
    """Write the single-rank checkpoint at ``path`` as one ``fmt`` file ("safetensors" or
    "torch") at ``out``; return its size.

    Verifies the data first (``progress`` hears of the bytes hashed), then loads it and writes
    the file under a temporary name that is renamed into place. Blocks worker threads only.
    Raises ``UsageError`` (a multi-rank checkpoint, ``out`` exists, safetensors not installed,
    a tensor safetensors cannot hold), the first ``CheckpointCorrupt`` found, and what
    ``aiostage.load`` raises.
    """
    if await anyio.Path(out).exists():
        raise UsageError(f"{out} exists; remove it or choose another output path")
    manifest = await read_manifest(path)
    if manifest.world_size != 1:
        raise UsageError(
            f"{path} was saved by {manifest.world_size} ranks; export writes single-rank "
            "checkpoints only: load it with aiostage.load(path, pg=...) on that many ranks and "
            "save each rank's state dict"
        )
    write = _writer(fmt)
    _, problems = await verify(path, progress)
    if problems:
        raise problems[0]
    state = await load(path, verify=False)
    tmp = out.with_name(f".{out.name}.partial")
    try:
        await anyio.to_thread.run_sync(write, state, manifest.metadata, tmp)
        await anyio.to_thread.run_sync(os.replace, tmp, out)
    finally:
        await anyio.to_thread.run_sync(lambda: tmp.unlink(missing_ok=True))
    return await localfs.file_size(out)


def _writer(fmt: str) -> Callable[[Any, dict[str, Any], Path], None]:
    if fmt == "torch":
        return lambda state, _meta, out: torch.save(state, out)
    try:
        import safetensors.torch  # noqa: F401 - a test dependency, not a runtime one
    except ImportError as exc:
        raise UsageError(
            "export --to safetensors needs the safetensors package: pip install safetensors"
        ) from exc
    return _save_safetensors


def _save_safetensors(state: Any, metadata: dict[str, Any], out: Path) -> None:
    """One flat safetensors file: tensors under their dotted key paths, values as metadata."""
    import safetensors.torch

    tree = flatten(state)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for leaf in tree.leaves:
        key = leaf.key
        if key in tensors:
            raise UsageError(f"{key}: two tensors flatten to this key; export --to torch instead")
        if leaf.data.dtype not in ST_DTYPES:
            raise UsageError(f"{key}: safetensors cannot hold {leaf.data.dtype}; use --to torch")
        t = leaf.data.detach().contiguous()
        ptr = t.untyped_storage().data_ptr()
        tensors[key] = t.clone() if ptr in seen and t.numel() else t  # safetensors refuses aliases
        seen.add(ptr)
    extra = {"aiostage.metadata": json.dumps(metadata)}
    extra.update(_values(tree.root, ()))
    safetensors.torch.save_file(tensors, out, metadata=extra)


def _values(node: Node, path: KeyPath) -> dict[str, str]:
    """Non-tensor leaves as ``{dotted key: JSON}`` (what safetensors' metadata can hold)."""
    if isinstance(node, Value):
        return {key_str(path): json.dumps(node.value, default=repr)}
    out: dict[str, str] = {}
    if isinstance(node, MapNode | SeqNode):
        keys = node.keys if isinstance(node, MapNode) else range(len(node.children))
        for k, child in zip(keys, node.children, strict=True):
            out.update(_values(child, (*path, k)))
    return out
