"""The replica store: a received replica written as a checkpoint directory and swapped in atomically."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .._format.codec import Header
from .._storage.commit import write_checkpoint
from .._storage.local import LOCAL
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
    writer = DurableWriter(LOCAL)
    sources = frame_sources(header, data)
    await write_checkpoint(writer, target, header, sources, meta, overwrite=True, expected=expected)
