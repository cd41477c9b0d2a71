"""Committing a save through the storage seam: check the target, write a one-file checkpoint,
commit or discard, and map failures to ``CheckpointWriteError``; ``sweep`` clears leftovers."""

from __future__ import annotations

import contextlib
import errno
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path, PurePath
from typing import Any

import anyio

from .._format.codec import Header, Manifest, Source, rank_file
from ..errors import AiostageError, CheckpointWriteError
from .backend import Storage
from .locate import PathLike, locate
from .writer import DurableWriter, WrittenFile

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = ["attempt", "check_target", "failure", "sweep", "write_checkpoint"]


async def check_target(storage: Storage, target: PurePath, overwrite: bool) -> None:
    """``FileExistsError`` unless ``save`` may write ``target``: absent, or replaceable."""
    kind = await storage.kind(target)
    if kind == "absent" or (overwrite and kind in ("checkpoint", "empty")):
        return
    if kind in ("other", "file"):
        why = "it is not an aiostage checkpoint; refusing to replace it"
    else:
        why = "a checkpoint exists there; pass overwrite=True to replace it"
    raise FileExistsError(errno.EEXIST, f"cannot save to {target}: {why}", str(target))


@contextlib.asynccontextmanager
async def attempt(storage: Storage, staging: PurePath, target: PurePath) -> AsyncIterator[None]:
    """On any failure discard ``staging``; report OS errors as ``CheckpointWriteError``."""
    try:
        yield
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            await storage.discard(staging)
        cause = failure(exc)
        if cause is None:
            raise
        raise CheckpointWriteError(
            f"writing {target} failed: {type(cause).__name__}: {cause}; nothing was committed "
            "and an existing checkpoint there is untouched",
            path=target,
        ) from exc


def failure(exc: BaseException) -> BaseException | None:
    """The first unexpected failure in ``exc`` (``None``: cancellation or a deliberate error)."""
    if isinstance(exc, BaseExceptionGroup):
        return next((f for e in exc.exceptions if (f := failure(e)) is not None), None)
    if isinstance(exc, FileExistsError | AiostageError) or not isinstance(exc, Exception):
        return None
    return exc


async def write_checkpoint(
    writer: DurableWriter,
    target: PurePath,
    header: Header,
    sources: Sequence[Source],
    metadata: dict[str, Any],
    *,
    overwrite: bool,
    expected: Sequence[int] | None = None,
) -> tuple[WrittenFile, float, int]:
    """Write a one-rank checkpoint at ``target`` (which ``check_target`` allowed) and commit it.

    Returns its data file, when committing (manifest, commit) began, and the manifest's size.
    ``expected``: the producer's digests, checked as the bytes are written. Raises
    ``FileExistsError`` (``target`` appeared meanwhile and not ``overwrite``),
    ``CheckpointWriteError`` and ``CheckpointCorrupt``; nothing is committed then and what was
    at ``target`` is untouched.
    """
    storage = writer.storage
    token = uuid.uuid4().hex
    staging = storage.staging(target, token)
    async with attempt(storage, staging, target):
        await storage.begin(target, token)
        written = await writer.write_file(staging / rank_file(0), header, sources, expected)
        committing = time.perf_counter()
        manifest_bytes = await writer.write_manifest(
            staging, Manifest(1, (written.info,), metadata)
        )
        await storage.commit(staging, target, overwrite=overwrite)
    return written, committing, manifest_bytes


async def sweep(root: PathLike) -> list[Path]:
    """Remove what interrupted saves left in directory ``root``; return the removed paths.

    First finishes an overwrite that was cut between its renames (only where the file system
    has no atomic exchange): the new checkpoint goes into place if its manifest was written,
    else the old one goes back. Then every ``.{name}.aiostage-tmp-*`` / ``-old-*`` sibling is
    removed and ``root`` fsynced. Run it when no save into ``root`` is in progress (it would
    remove that save's temporary directory). Blocks on a worker thread; raises ``OSError`` if
    ``root`` cannot be listed, ``UsageError`` for a location no backend serves.
    """
    storage, where = locate(root)
    return [p if isinstance(p, Path) else Path(p) for p in await storage.sweep(where)]  # URLs stay
