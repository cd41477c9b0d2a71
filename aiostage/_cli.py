"""What the ``aiostage`` commands compute: listing, header reading, verification and export.

Nothing here prints; ``__main__`` parses the command line and renders what these return. Headers
are read without the tensor data; verification hashes every entry in worker threads, chunk by
chunk, reporting its progress in bytes; export streams whole tensors (``_storage/export.py``).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread

from ._core.tree import KeyPath, Node
from ._format.codec import MANIFEST, STEP_NAME, FileInfo, Header, Manifest
from ._storage.backend import Leftover, Storage
from ._storage.digests import entry_keys, hash_entries
from ._storage.export import ExportPlan, plan_export, write_export
from ._storage.local import LOCAL
from ._storage.locate import locate
from ._storage.reader import read_header, read_manifest
from ._tiers.policy import local_holder
from .errors import CheckpointCorrupt, CheckpointNotFound

__all__ = [
    "ExportPlan",
    "Found",
    "RankFile",
    "checkpoint_manifest",
    "export",
    "plan",
    "read_checkpoint",
    "scan",
    "scan_local",
    "verify",
]

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

    Lists step directories whatever their state, leftovers of interrupted saves, and any other
    entry holding a manifest. Raises ``OSError`` for a missing or unreadable ``root``.
    """
    storage, where = locate(root)
    kind = await storage.kind(where)
    if kind == "absent":
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(root))
    entries = await storage.scan(where, leftovers=True)
    # a checkpoint, or a link the user made to one (the links inside are never followed)
    is_one = kind == "checkpoint" or (kind == "file" and any(n == MANIFEST for n, _ in entries))
    # a link's target's name (asked of the file system in a worker); a URL's own
    local = storage is LOCAL
    name = (await anyio.to_thread.run_sync(where.resolve)).name if local else where.name
    found = [await _describe(storage, where, name)] if is_one else []
    for name, kind in entries:
        left = storage.leftover(name)
        if kind == "file" or not (left or STEP_NAME.match(name) or kind == "checkpoint"):
            continue
        try:
            found.append(await _describe(storage, where / name, left.name if left else name, left))
        except FileNotFoundError:
            continue  # it went while we looked: a save committed or a sweep removed it
    return sorted(found, key=lambda f: (f.step is None, f.step or 0, f.path.name))


async def scan_local(local_dir: Path) -> list[tuple[str, Found]]:
    """A node's local tier (a ``Checkpointer``'s ``local_dir``): ``("local", found)`` for each
    rank's own copies (``rank_NNNNN/``), ``("replica", found)`` for the replicas it received
    (``replica_of_rank_NNNNN/``), each directory listed as ``scan`` lists a root. Raises
    ``OSError`` for a missing or unreadable ``local_dir``."""
    storage, where = locate(local_dir)
    if await storage.kind(where) == "absent":
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(local_dir))
    out: list[tuple[str, Found]] = []
    for name, kind in await storage.scan(where):
        holder = local_holder(name)
        if holder is None or kind == "file":
            continue
        try:
            out += [(holder[0], found) for found in await scan(where / name)]
        except FileNotFoundError:
            continue  # it went while we looked
    return out


async def _describe(storage: Storage, path: Path, name: str, left: Leftover | None = None) -> Found:
    step_match = STEP_NAME.match(name)
    step = int(step_match["step"]) if step_match else None
    size, mtime = await storage.usage(path)
    if left is not None:
        why = (
            "an interrupted overwrite" if left.interrupted == "overwrite" else "an interrupted save"
        )
        note = f"left by {why} of {name}; aiostage.sweep removes it"
        return Found(path, step, "incomplete", size, mtime, note)
    status, note = await _manifest_status(storage, path)
    if status == "committed":  # a sound manifest, read as a regular file: the commit's time
        mtime = (await storage.usage(path / MANIFEST))[1]
    return Found(path, step, status, size, mtime, note)


async def _manifest_status(storage: Storage, path: Path) -> tuple[str, str]:
    """("committed" | "incomplete" | "corrupt", why) from the manifest and the file sizes; a
    file that is not a regular one (a link, a FIFO, a directory) is corrupt, never opened."""
    try:
        manifest = await read_manifest(storage, path)
    except CheckpointNotFound:
        return "incomplete", f"no {MANIFEST}"
    except CheckpointCorrupt as exc:
        return "corrupt", str(exc)
    for info in manifest.files:
        file = path / info.name
        try:
            size = await storage.size(file)
        except FileNotFoundError:
            return "corrupt", f"{file}: listed in the manifest but missing"
        except CheckpointCorrupt as exc:
            return "corrupt", str(exc)
        if size != info.size:
            return "corrupt", f"{file}: {size} bytes on disk, the manifest says {info.size}"
    return "committed", ""


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
    storage, where = locate(path)
    manifest = await read_manifest(storage, where)
    return manifest, [
        await _read_header(storage, where, info, rank) for rank, info in enumerate(manifest.files)
    ]


async def checkpoint_manifest(path: Path) -> Manifest:
    """The validated manifest of the checkpoint at ``path`` (``CheckpointNotFound``,
    ``CheckpointCorrupt``)."""
    return await read_manifest(*locate(path))


async def _read_header(storage: Storage, directory: Path, info: FileInfo, rank: int) -> RankFile:
    """Read and check the header of ``directory/info.name`` against the manifest's ``info``."""
    file = directory / info.name
    header, root, paths = await read_header(storage, file, info, True, rank)
    return RankFile(file, info.size, header, root, paths)


# ---------------------------------------------------------------- verify


async def verify(path: Path, progress: Progress) -> tuple[list[RankFile], list[CheckpointCorrupt]]:
    """Check every data file of the checkpoint at ``path``: sizes, headers and data checksums.

    Returns the files whose headers could be read and every problem found (each names its file
    and, for data, the key of a tensor in the corrupt entry). Hashes the data in worker threads,
    calling ``progress`` with the bytes done. Raises ``CheckpointNotFound`` (no manifest) and
    ``CheckpointCorrupt`` (a manifest that cannot be decoded).
    """
    storage, where = locate(path)
    manifest = await read_manifest(storage, where)
    files: list[RankFile] = []
    problems: list[CheckpointCorrupt] = []
    for rank, info in enumerate(manifest.files):
        try:
            rf = await _read_header(storage, where, info, rank)
        except CheckpointCorrupt as exc:
            problems.append(exc)
            continue
        files.append(rf)
        data = (await storage.map(rf.path, rf.size))[rf.size - rf.header.data_bytes :]
        digests = await hash_entries(data, rf.header, progress=progress)
        problems += _mismatches(rf, digests)
    return files, problems


def _mismatches(rf: RankFile, digests: dict[int, int]) -> list[CheckpointCorrupt]:
    out = []
    header = rf.header
    for i, want in enumerate(header.checksums):
        if want != digests[i]:
            keys = entry_keys(header, rf.paths, i)
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


async def plan(
    path: Path, fmt: str, out: Path, *, only: str | None, max_shard_size: int | None
) -> ExportPlan:
    """What ``aiostage export`` will write (see ``_storage.export.plan_export``); reads headers
    only, so the command can size its progress bar before any tensor is read."""
    return await plan_export(path, fmt, out, only=only, max_shard_size=max_shard_size)


async def export(todo: ExportPlan, progress: Progress) -> list[tuple[Path, int]]:
    """Write ``todo`` (a ``plan``): whole tensors assembled one at a time from a checkpoint of any world
    size, each entry read verified; ``progress`` hears of the bytes written. Returns the files
    written and their sizes; raises what ``_storage.export.write_export`` raises."""
    return await write_export(todo, progress)
