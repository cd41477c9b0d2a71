"""``aiostage.save``: stage, lay out, write and commit a checkpoint, from one rank or from many.

One rank: the data file and then the manifest go into a staging location of the storage (a
temporary sibling directory on a local disk), which is committed into place
(``docs/persistence.md``). With a ProcessGroup, rank 0 picks the staging location, every rank
writes its own file into it, a gather tells rank 0 whether every rank
succeeded, rank 0 writes the manifest and commits, and a broadcast tells every rank the outcome.
"""

from __future__ import annotations

import errno
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path, PurePath
from typing import Any

from .._core import dist, gc_pause
from .._core.timeouts import DEFAULT_TIMEOUT, seconds
from .._format.codec import (
    MANIFEST,
    FileInfo,
    Manifest,
    as_int64,
    as_uint64,
    check_metadata,
    rank_file,
)
from .._staging import AsyncStager
from .._train_state import as_state_dict
from ..errors import CheckpointWriteError
from .backend import Storage
from .commit import attempt, check_target, failure, write_checkpoint
from .locate import PathLike, locate
from .prepare import Prepared, prepare
from .writer import DurableWriter, WriteOptions, WrittenFile

__all__ = ["SaveReport", "save"]


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
    timeout: float | timedelta = DEFAULT_TIMEOUT,
    write_options: WriteOptions | None = None,
) -> SaveReport:
    """Write ``state_dict`` as a checkpoint directory at ``path``, durably and atomically.

    Non-CPU tensors are staged to the CPU first (through ``stager`` if given, which then stages
    every tensor and gets its copy released afterwards); CPU tensors are written straight from
    their memory, so do not modify them until ``save`` returns. ``metadata`` (JSON) goes into
    the manifest. With ``pg`` (a gloo group; every rank calls ``save`` with the same ``path``),
    each rank writes its own file and no rank returns success unless the whole checkpoint was
    committed. ``timeout`` (seconds or a ``timedelta``, default 600) is the longest any one
    wait for another rank may take (a collective); past it the save fails with
    ``CheckpointWriteError``. ``write_options`` tunes the writes (chunk size, buffers, direct
    I/O).

    Blocks on nothing: file I/O runs in worker threads, collectives are polled. Raises
    ``FileExistsError`` if ``path`` exists and ``overwrite`` is false (or ``path`` is not an
    aiostage checkpoint), ``UnsupportedValueError`` naming the key of a leaf the format cannot
    store, ``CheckpointWriteError`` when writing fails (nothing is committed then and an
    existing checkpoint at ``path`` is untouched), and ``ValueError`` for a bad ``timeout``.
    """
    limit = seconds(timeout)
    storage, target = locate(path)
    meta = check_metadata(metadata)
    request = _Request(DurableWriter(storage, write_options), target, overwrite, meta, stager)
    state_dict = await as_state_dict(state_dict)
    # no automatic collection from the walk until the per-tensor objects are freed: they are
    # born and die in the young generation, never walked (a collection while they live holds
    # the GIL for tens of ms at thousands of tensors, and promotes them towards full ones)
    with gc_pause.paused():
        if pg is None:
            return await _save_alone(request, state_dict)
        return await _save_together(request, state_dict, pg, limit)


@dataclass(frozen=True, slots=True)
class _Request:
    """One ``save``'s settled arguments: where and how to write, what to do with an old one."""

    writer: DurableWriter
    target: Path
    overwrite: bool
    meta: dict[str, Any]
    stager: AsyncStager | None


# ---------------------------------------------------------------- one rank


async def _save_alone(request: _Request, state_dict: Any) -> SaveReport:
    began = time.perf_counter()
    writer, target, overwrite = request.writer, request.target, request.overwrite
    await check_target(writer.storage, target, overwrite)
    prep = await prepare(state_dict, request.stager)
    try:
        written, committing, manifest_bytes = await write_checkpoint(
            writer, target, prep.header, prep.sources, request.meta, overwrite=overwrite
        )
    finally:
        prep.release()
    await prep.free()
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


# ---------------------------------------------------------------- many ranks


async def _save_together(
    request: _Request, state_dict: Any, pg: Any, pg_timeout: float
) -> SaveReport:
    writer, target, overwrite = request.writer, request.target, request.overwrite
    rank, world = dist.rank_and_size(pg)
    began = time.perf_counter()
    storage = writer.storage
    token = await _agree(storage, pg, target, overwrite, rank, pg_timeout)
    tmp = storage.staging(target, token)
    prep: Prepared | None = None
    try:
        prep = await prepare(state_dict, request.stager, rank, world)
        await storage.begin(target, token)
        written = await writer.write_file(tmp / rank_file(rank), prep.header, prep.sources)
        mine, error = [0, written.info.size, as_int64(written.info.header_xxh3)], None
    except Exception as exc:
        mine, error = [1, 0, 0], exc
    finally:
        if prep is not None:
            prep.release()
    if prep is not None:
        await prep.free()
    committing = time.perf_counter()
    rows = await _collective(dist.all_gather_ints, pg, mine, pg_timeout, "gather", target)
    manifest_bytes = await _finish(request, pg, rows, tmp, error, pg_timeout)
    assert prep is not None  # _finish raised unless this rank wrote its file
    return _report(target, prep, written, committing, began, manifest_bytes, rank, world)


async def _agree(
    storage: Storage, pg: Any, target: Path, overwrite: bool, rank: int, pg_timeout: float
) -> str:
    """Rank 0 checks ``target`` and picks the token; every rank learns both."""
    status, problem = b"\0", None
    if rank == 0:
        try:
            await check_target(storage, target, overwrite)
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
    request: _Request,
    pg: Any,
    rows: list[list[int]],
    tmp: PurePath,
    error: Exception | None,
    pg_timeout: float,
) -> int:
    """Rank 0 commits if every rank wrote its file; every rank learns the outcome.

    Returns the size of the manifest this rank wrote (0 on ranks other than 0).
    """
    rank, world = dist.rank_and_size(pg)
    target = request.target
    failed = [r for r, row in enumerate(rows) if row[0]]
    manifest_bytes, problem = 0, None
    if rank == 0:
        manifest_bytes, problem = await _commit_for_all(request, rows, tmp)
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
    request: _Request, rows: list[list[int]], tmp: PurePath
) -> tuple[int, Exception | None]:
    writer, target = request.writer, request.target
    if any(row[0] for row in rows):
        await writer.storage.discard(tmp)
        return 0, None
    files = tuple(FileInfo(rank_file(r), size, as_uint64(h)) for r, (_, size, h) in enumerate(rows))
    manifest = Manifest(len(rows), files, request.meta)
    try:
        async with attempt(writer.storage, tmp, target):
            size = await writer.write_manifest(tmp, manifest)
            await writer.storage.commit(tmp, target, overwrite=request.overwrite)
    except (CheckpointWriteError, FileExistsError) as exc:
        return 0, exc
    return size, None


def _as_write_error(error: Exception, target: Path) -> Exception:
    if failure(error) is None:
        return error
    wrapped = CheckpointWriteError(
        f"writing {target} failed: {error}; nothing was committed", path=target
    )
    wrapped.__cause__ = error
    return wrapped
