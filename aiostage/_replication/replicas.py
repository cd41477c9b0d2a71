"""The replica store: a received replica written as a checkpoint directory and swapped in atomically."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .._format.codec import Header, Manifest, rank_file
from .._storage import localfs
from .._storage.commit import attempt, check_target, commit
from .._storage.writer import DurableWriter
from .frames import frame_sources

__all__ = ["write_replica"]


async def write_replica(
    target: Path,
    header: Header,
    data: torch.Tensor,
    meta: dict[str, Any],
    expected: Sequence[int] | None = None,
) -> None:
    """Write a received frame as a one-rank checkpoint at ``target``, replacing the previous one
    atomically (temporary sibling, fsyncs, exchange). ``expected``: the sender's digests, checked
    as the bytes are written. Raises ``CheckpointWriteError``, ``CheckpointCorrupt``."""
    await check_target(target, overwrite=True)
    tmp = localfs.temp_path(target, uuid.uuid4().hex)
    async with attempt(tmp, target):
        await localfs.make_parents(target.parent)
        await localfs.make_dir(tmp)
        writer = DurableWriter()
        written = await writer.write_file(
            tmp / rank_file(0), header, frame_sources(header, data), expected
        )
        await writer.write_manifest(tmp, Manifest(1, (written.info,), meta))
        await commit(tmp, target, overwrite=True)
