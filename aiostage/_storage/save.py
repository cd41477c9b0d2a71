"""``aiostage.save``: stage, lay out, write and commit a checkpoint, from one rank or from many.

One rank: the data file and then the manifest go into a temporary sibling directory, which is
renamed into place (``docs/persistence.md``). With a ProcessGroup, rank 0 picks the temporary
directory, every rank writes its own file into it, a gather tells rank 0 whether every rank
succeeded, rank 0 writes the manifest and commits, and a broadcast tells every rank the outcome.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._core import dist
from .._format.codec import MANIFEST, FileInfo, Manifest, check_metadata, rank_file
from .._staging import AsyncStager
from ..errors import CheckpointWriteError
from . import localfs
from .commit import attempt, check_target, commit, failure
from .prepare import Prepared, prepare
from .writer import DurableWriter, WrittenFile

__all__ = ["SaveReport", "save", "save_with"]

PathLike = str | os.PathLike[str]


@dataclass(frozen=True, slots=True)
class SaveReport:
    """What ``save`` did on this rank: bytes and files written, and seconds spent per phase.

    ``stage_seconds``: copying non-CPU tensors to the CPU; ``write_seconds``: writing the data
    file (checksums included); ``fsync_seconds``: its fsync; ``commit_seconds``: manifest,
    directory fsyncs, renames and, with a ProcessGroup, waiting for the other ranks.
    """

    path: Path
    bytes_written: int
    files: tuple[str, ...]
    stage_seconds: float
    write_seconds: float
    fsync_seconds: float
    commit_seconds: float
    total_seconds: float
    rank: int = 0
    world_size: int = 1

    @property
    def gb_per_second(self) -> float:
        """``bytes_written`` per second of ``total_seconds``, in GB/s (1e9 bytes)."""
        return self.bytes_written / self.total_seconds / 1e9 if self.total_seconds else 0.0


async def save(
    state_dict: Any,
    path: PathLike,
    *,
    pg: Any = None,
    overwrite: bool = False,
    metadata: dict[str, Any] | None = None,
    stager: AsyncStager | None = None,
    pg_timeout: float = 600.0,
) -> SaveReport:
    """Write ``state_dict`` as a checkpoint directory at ``path``, durably and atomically.

    Non-CPU tensors are staged to the CPU first (through ``stager`` if given, which then stages
    every tensor and gets its copy released afterwards); CPU tensors are written straight from
    their memory, so do not modify them until ``save`` returns. ``metadata`` (JSON) goes into
    the manifest. With ``pg`` (a gloo group; every rank calls ``save`` with the same ``path``),
    each rank writes its own file and no rank returns success unless the whole checkpoint was
    committed; ``pg_timeout`` bounds each wait for the other ranks.

    Blocks on nothing: file I/O runs in worker threads, collectives are polled. Raises
    ``FileExistsError`` if ``path`` exists and ``overwrite`` is false (or ``path`` is not an
    aiostage checkpoint), ``UnsupportedValueError`` naming the key of a leaf the format cannot
    store, and ``CheckpointWriteError`` when writing fails (nothing is committed then and an
    existing checkpoint at ``path`` is untouched).
    """
    return await save_with(
        DurableWriter(),
        state_dict,
        path,
        pg=pg,
        overwrite=overwrite,
        metadata=metadata,
        stager=stager,
        pg_timeout=pg_timeout,
    )


async def save_with(
    writer: DurableWriter,
    state_dict: Any,
    path: PathLike,
    *,
    pg: Any = None,
    overwrite: bool = False,
    metadata: dict[str, Any] | None = None,
    stager: AsyncStager | None = None,
    pg_timeout: float = 600.0,
) -> SaveReport:
    """``save`` through a given ``DurableWriter`` (its options and fault-injection hook)."""
    target, meta = Path(path), check_metadata(metadata)
    if pg is None:
        return await _save_alone(writer, state_dict, target, overwrite, meta, stager)
    return await _save_together(writer, state_dict, target, overwrite, meta, stager, pg, pg_timeout)


async def _save_alone(
    writer: DurableWriter,
    state_dict: Any,
    target: Path,
    overwrite: bool,
    meta: dict[str, Any],
    stager: AsyncStager | None,
) -> SaveReport:
    began = time.perf_counter()
    await check_target(target, overwrite)
    prep = await prepare(state_dict, stager)
    tmp = localfs.temp_path(target, uuid.uuid4().hex)
    try:
        async with attempt(tmp, target):
            await localfs.make_parents(target.parent)
            await localfs.make_dir(tmp)
            written = await writer.write_file(tmp / rank_file(0), prep.header, prep.sources)
            committing = time.perf_counter()
            manifest = Manifest(1, (written.info,), meta)
            manifest_bytes = await writer.write_manifest(tmp, manifest)
            await commit(tmp, target, overwrite)
    finally:
        prep.release()
    return _report(target, prep, written, committing, began, manifest_bytes)


def _report(
    target: Path,
    prep: Prepared,
    written: WrittenFile,
    committing: float,
    began: float,
    manifest_bytes: int,
    rank: int = 0,
    world: int = 1,
) -> SaveReport:
    """This rank's ``SaveReport``, the clock stopped now."""
    now = time.perf_counter()
    files = (written.info.name, MANIFEST) if manifest_bytes else (written.info.name,)
    size = written.info.size + manifest_bytes
    return SaveReport(
        target, size, files, prep.stage_seconds, written.write_seconds, written.fsync_seconds,
        now - committing, now - began, rank, world,
    )  # fmt: skip


async def _save_together(
    writer: DurableWriter,
    state_dict: Any,
    target: Path,
    overwrite: bool,
    meta: dict[str, Any],
    stager: AsyncStager | None,
    pg: Any,
    pg_timeout: float,
) -> SaveReport:
    rank, world = dist.rank_and_size(pg)
    began = time.perf_counter()
    tmp = localfs.temp_path(target, await _agree(pg, target, overwrite, rank, pg_timeout))
    prep: Prepared | None = None
    try:
        prep = await prepare(state_dict, stager)
        await localfs.make_parents(tmp)
        header = dataclasses.replace(prep.header, rank=rank, world_size=world)
        written = await writer.write_file(tmp / rank_file(rank), header, prep.sources)
        mine, error = [0, written.info.size, _signed(written.info.header_xxh3)], None
    except Exception as exc:
        mine, error = [1, 0, 0], exc
    finally:
        if prep is not None:
            prep.release()
    committing = time.perf_counter()
    rows = await _collective(dist.all_gather_ints, pg, mine, pg_timeout, "gather", target)
    manifest_bytes = await _finish(
        writer, pg, rows, tmp, target, overwrite, meta, error, pg_timeout
    )
    assert prep is not None  # _finish raised unless this rank wrote its file
    return _report(target, prep, written, committing, began, manifest_bytes, rank, world)


async def _agree(pg: Any, target: Path, overwrite: bool, rank: int, pg_timeout: float) -> str:
    """Rank 0 checks ``target`` and picks the token; every rank learns both."""
    status, problem = b"\0", None
    if rank == 0:
        try:
            await check_target(target, overwrite)
        except OSError as exc:  # FileExistsError, or the target cannot even be inspected
            status, problem = (b"\1" if isinstance(exc, FileExistsError) else b"\2"), exc
    message = status + uuid.uuid4().bytes
    got = await _collective(dist.broadcast_bytes, pg, message, pg_timeout, "broadcast", target)
    if problem is not None:
        raise problem
    if got[0] == 1:
        why = "rank 0 found it exists (pass overwrite=True to replace a checkpoint)"
        raise FileExistsError(errno.EEXIST, f"cannot save to {target}: {why}", str(target))
    if got[0]:
        raise CheckpointWriteError(f"rank 0 cannot inspect {target}; see its error", path=target)
    return bytes(got[1:]).hex()


async def _collective(
    fn: Callable[..., Any], pg: Any, arg: Any, pg_timeout: float, what: str, target: Path
) -> Any:
    try:
        return await fn(pg, arg, pg_timeout=pg_timeout, what=f"the {what} while saving {target}")
    except (TimeoutError, RuntimeError) as exc:
        raise CheckpointWriteError(f"{exc}; nothing was committed", path=target) from exc


async def _finish(
    writer: DurableWriter,
    pg: Any,
    rows: list[list[int]],
    tmp: Path,
    target: Path,
    overwrite: bool,
    meta: dict[str, Any],
    error: Exception | None,
    pg_timeout: float,
) -> int:
    """Rank 0 commits if every rank wrote its file; every rank learns the outcome.

    Returns the size of the manifest this rank wrote (0 on ranks other than 0).
    """
    rank, world = dist.rank_and_size(pg)
    failed = [r for r, row in enumerate(rows) if row[0]]
    manifest_bytes, problem = 0, None
    if rank == 0:
        manifest_bytes, problem = await _commit_for_all(writer, rows, tmp, target, overwrite, meta)
    flag = bytes([problem is not None])
    outcome = await _collective(dist.broadcast_bytes, pg, flag, pg_timeout, "outcome", target)
    if error is not None:
        raise _as_write_error(error, target)
    if failed:
        raise CheckpointWriteError(
            f"rank(s) {failed} of {world} failed to write their part of {target}; nothing was "
            "committed",
            path=target,
        )
    if problem is not None:
        raise problem
    if outcome[0]:
        raise CheckpointWriteError(f"rank 0 could not commit {target}; see its error", path=target)
    return manifest_bytes


async def _commit_for_all(
    writer: DurableWriter,
    rows: list[list[int]],
    tmp: Path,
    target: Path,
    overwrite: bool,
    meta: dict[str, Any],
) -> tuple[int, Exception | None]:
    if any(row[0] for row in rows):
        await localfs.remove_tree(tmp)
        return 0, None
    files = tuple(
        FileInfo(rank_file(r), size, h % (1 << 64)) for r, (_, size, h) in enumerate(rows)
    )
    manifest = Manifest(len(rows), files, meta)
    try:
        async with attempt(tmp, target):
            size = await writer.write_manifest(tmp, manifest)
            await commit(tmp, target, overwrite)
    except (CheckpointWriteError, FileExistsError) as exc:
        return 0, exc
    return size, None


def _signed(digest: int) -> int:
    """A 64-bit digest as an int64 (the gather carries int64)."""
    return digest - (1 << 64) if digest >= 1 << 63 else digest


def _as_write_error(error: Exception, target: Path) -> Exception:
    if failure(error) is None:
        return error
    wrapped = CheckpointWriteError(
        f"writing {target} failed: {error}; nothing was committed", path=target
    )
    wrapped.__cause__ = error
    return wrapped
