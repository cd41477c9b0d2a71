"""Committing a save: check the target, rename the finished temporary directory into place, sweep leftovers."""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.to_thread

from .._format.codec import (
    MANIFEST,
)
from ..errors import AiostageError, CheckpointWriteError
from . import localfs

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup


__all__ = ["attempt", "check_target", "commit", "failure", "sweep"]


async def check_target(target: Path, overwrite: bool) -> None:
    """``FileExistsError`` unless ``save`` may write ``target``: absent, or replaceable."""
    kind = await localfs.path_kind(target, MANIFEST)
    if kind == "absent" or (overwrite and kind != "other"):
        return
    why = "it is not an aiostage checkpoint; refusing to replace it" if kind == "other" else (
        "a checkpoint exists there; pass overwrite=True to replace it"
    )  # fmt: skip
    raise FileExistsError(errno.EEXIST, f"cannot save to {target}: {why}", str(target))


async def commit(tmp: Path, target: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` into place and make that durable (the commit point).

    Raises ``FileExistsError`` if ``target`` appeared meanwhile (without ``overwrite``), and
    ``CheckpointWriteError`` if the rename happened but the parent could not be fsynced.
    """
    replace_old = overwrite and await localfs.path_kind(target, MANIFEST) != "absent"
    if replace_old:
        await localfs.exchange(tmp, target)
    else:
        await localfs.rename_noreplace(tmp, target)
    try:
        await localfs.fsync_dir(target.parent)
    except OSError as exc:
        raise CheckpointWriteError(
            f"{target} is in place but its parent directory could not be fsynced ({exc}); it "
            "may not survive a power loss",
            path=target,
        ) from exc
    if replace_old:
        await localfs.remove_tree(tmp)  # now the previous checkpoint


@contextlib.asynccontextmanager
async def attempt(tmp: Path, target: Path) -> AsyncIterator[None]:
    """On any failure remove ``tmp``; report OS errors as ``CheckpointWriteError``."""
    try:
        yield
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            await localfs.remove_tree(tmp)
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


async def sweep(root: str | os.PathLike[str]) -> list[Path]:
    """Remove what interrupted saves left in directory ``root``; return the removed paths.

    First finishes an overwrite that was cut between its renames (only where the file system
    has no atomic exchange): the new checkpoint goes into place if its manifest was written,
    else the old one goes back. Then every ``.{name}.aiostage-tmp-*`` / ``-old-*`` sibling is
    removed and ``root`` fsynced. Run it when no save into ``root`` is in progress (it would
    remove that save's temporary directory). Blocks on a worker thread; raises ``OSError`` if
    ``root`` cannot be listed.
    """
    return await anyio.to_thread.run_sync(localfs.sweep_now, Path(root), MANIFEST)
