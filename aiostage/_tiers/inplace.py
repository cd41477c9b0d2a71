"""A partner's copy laid out for a restore and landed in place: the giver sends each large
tensor as an entry of its own (``plan_apart``), so the receiver lands each of its messages
straight in the tensor of ``into`` it restores (``InPlace``), no buffer and copy after."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import anyio.to_thread
import torch

from .._core.storages import storage_address
from .._core.tree import flatten, unflatten
from .._format.codec import Header
from .._replication.frames import Planned, frame_leaves, plan_cpu_frame
from .._replication.wire import SMALL
from .._storage.reshard import check_local
from ..errors import ReplicationError, StateDictMismatch

__all__ = ["InPlace", "plan_apart"]


def plan_apart(state: Any) -> Planned:
    """``state`` laid out as a frame in which the tensors of a storage that holds a large one
    (``SMALL`` bytes or more: a message of its own) are entries of their own, not views into
    one entry for the whole storage (worker thread): its receiver lands each large one straight
    in its own tensor of ``into``. Tensors whose bytes overlap stay together (one entry for
    their bytes, aliasing kept); storages of small tensors only stay as they are."""
    tree = flatten(state)
    tensors = [leaf.data for leaf in tree.leaves]
    moved = _apart(tensors)
    if not moved:
        return plan_cpu_frame(state)
    own = [moved.get(i, t) for i, t in enumerate(tensors)]
    return plan_cpu_frame(unflatten(tree, own, copy_values=False))


def _apart(tensors: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    """By leaf index, each tensor of a CPU storage holding a large one, moved onto a storage of
    its own over the same memory (no copy), one per run of overlapping tensors."""
    groups: dict[int, list[int]] = {}
    for i, t in enumerate(tensors):
        if t.device.type == "cpu" and t.numel():
            groups.setdefault(storage_address(t), []).append(i)
    out: dict[int, torch.Tensor] = {}
    for members in groups.values():
        if any(tensors[i].nbytes >= SMALL for i in members):
            out.update(_runs(tensors, members))
    return out


def _runs(tensors: list[torch.Tensor], members: list[int]) -> dict[int, torch.Tensor]:
    """``members`` (tensors of one storage) cut into runs of overlapping byte extents, each run
    a storage of its own with its tensors as views into it; nothing when one does not fit (a
    negative stride, an extent not aligned to its element)."""
    extents = []
    for i in members:
        t = tensors[i]
        if any(st < 0 for st in t.stride()):
            return {}
        n = 1 + sum((d - 1) * st for d, st in zip(t.shape, t.stride(), strict=True))
        extents.append((t.data_ptr(), t.data_ptr() + n * t.element_size(), i))
    extents.sort()
    out: dict[int, torch.Tensor] = {}
    k = 0
    while k < len(extents):
        lo, hi, first = extents[k]
        run = [first]
        k += 1
        while k < len(extents) and extents[k][0] < hi:
            hi = max(hi, extents[k][1])
            run.append(extents[k][2])
            k += 1
        storage = tensors[first].untyped_storage()
        span = torch.empty(0, dtype=torch.uint8).set_(
            storage, lo - storage.data_ptr(), (hi - lo,), (1,)
        )
        own = torch.from_numpy(span.numpy())  # the same memory, a storage of its own
        for i in run:
            t, off = tensors[i], tensors[i].data_ptr() - lo
            size = t.element_size()
            if off % size:
                return {}
            n = (hi - lo - off) // size * size
            out[i] = own[off : off + n].view(t.dtype).as_strided(t.shape, t.stride())
    return out


class InPlace:
    """Where a partner's frame lands: a message holding one tensor's bytes (or a slice of
    them) straight in the tensor of ``into`` it restores, the rest in the buffer. ``landed``:
    the records whose bytes all landed in place (their copy is skipped)."""

    def __init__(self, into: Any, holder: int) -> None:
        self.into, self.holder = into, holder
        self.landed: frozenset[int] = frozenset()

    async def targets(
        self, header: Header, ranges: list[tuple[int, int]]
    ) -> list[torch.Tensor | None]:
        """``recv_frame``'s ``direct``: planned in a worker thread."""
        return await anyio.to_thread.run_sync(self._plan, header, ranges)

    def _plan(self, header: Header, ranges: list[tuple[int, int]]) -> list[torch.Tensor | None]:
        """Nothing in place when ``into`` does not match the frame (the copy after landing
        reports how, as before); else each message inside one eligible entry, in place."""
        try:
            _, leaves = frame_leaves(header, self.holder)
            paths = [leaf.path for leaf in leaves]
            targets = check_local(flatten(self.into).leaves, paths, header.records, "")
        except (ReplicationError, StateDictMismatch):
            return [None] * len(ranges)
        places = _places(header, targets)
        places_bytes = {record: view.numel() for _, record, view in places.values()}
        begins = sorted(places)
        out: list[torch.Tensor | None] = []
        covered: dict[int, int] = {}
        for a, b in ranges:
            k = bisect.bisect_right(begins, a) - 1
            place = places.get(begins[k]) if k >= 0 else None
            if place is None or b > place[0] + place[2].numel():
                out.append(None)
                continue
            begin, record, view = place
            out.append(view[a - begin : b - begin])
            covered[record] = covered.get(record, 0) + b - a
        self.landed = frozenset(r for r, n in covered.items() if n == places_bytes[r])
        return out


def _places(
    header: Header, targets: Sequence[torch.Tensor]
) -> dict[int, tuple[int, int, torch.Tensor]]:
    """By entry begin: ``(begin, record, bytes of its target)`` for each entry that is the
    whole of one record's tensor whose target is a contiguous CPU tensor of the same dtype and
    shape, no other target sharing its memory."""
    users: dict[int, int] = {}
    for r in header.records:
        users[r.entry] = users.get(r.entry, 0) + 1
    seen: set[int] = set()
    out: dict[int, tuple[int, int, torch.Tensor]] = {}
    for i, (r, t) in enumerate(zip(header.records, targets, strict=True)):
        if r.entry < 0 or users[r.entry] != 1 or r.offset != 0:
            continue
        e = header.entries[r.entry]
        ok = t.device.type == "cpu" and t.dtype == r.dtype and tuple(t.shape) == r.shape
        if not ok or not t.is_contiguous() or t.stride() != r.stride:
            continue
        if t.nbytes != e.end - e.begin or t.nbytes == 0 or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        out[e.begin] = (e.begin, i, t.detach().reshape(-1).view(torch.uint8))
    return out
