"""Checking stored bytes: per-entry xxh3_64 digests of a mapped data region, chunk by chunk.

Used by ``load`` (which also pages the data in this way) and by ``aiostage verify``; one place
computes the digests and names the tensors of an entry that does not match.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

import anyio.to_thread
import xxhash

from .._core.tree import KeyPath, key_str
from .._format.codec import Header
from .pipeline import cut

__all__ = ["entry_keys", "hash_entries"]

_CHUNK = 16 << 20


async def hash_entries(
    data: memoryview,
    header: Header,
    only: Collection[int] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[int, int]:
    """The xxh3_64 of every entry of ``header`` (or each of ``only``) over ``data``, its data
    region, hashed in file order, ``_CHUNK`` bytes per worker-thread call (touching mapped pages
    brings them in on the kernel's readahead). ``progress`` hears of the bytes done."""
    entries = header.entries
    order = sorted(range(len(entries)) if only is None else only, key=lambda i: entries[i].begin)
    hashes = {i: xxhash.xxh3_64() for i in order}
    lengths = [entries[i].end - entries[i].begin for i in order]
    for pieces in cut(lengths, _CHUNK):
        spans = [(order[seg], entries[order[seg]].begin + at, n) for seg, at, n in pieces]
        await anyio.to_thread.run_sync(_hash, data, spans, hashes)
        if progress is not None:
            progress(sum(n for _, _, n in spans))
    return {i: h.intdigest() for i, h in hashes.items()}


def _hash(data: memoryview, spans: list[tuple[int, int, int]], hashes: dict[int, Any]) -> None:
    """Feed ``data[begin : begin + n]`` to entry ``index``'s hash for each span (worker thread)."""
    for index, begin, n in spans:
        hashes[index].update(data[begin : begin + n])


def entry_keys(header: Header, paths: Sequence[KeyPath], entry: int) -> list[str]:
    """The key paths of the tensors stored in ``entry`` (what a mismatch there damages)."""
    return [key_str(paths[t]) for t, r in enumerate(header.records) if r.entry == entry]
