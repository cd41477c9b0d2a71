"""Storage identity: which tensors share bytes, and the spans a staged copy keeps of each."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = []

#: byte alignment of a storage span's start; a multiple of every dtype's item size
SPAN_ALIGN = 64


@dataclass(frozen=True, slots=True)
class Span:
    """A byte range of one source storage that the state dict's tensors cover."""

    device: torch.device
    start: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class View:
    """How a tensor sits in its span: element offset, shape, stride and dtype (span -1: empty)."""

    span: int
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True, slots=True)
class StoragePlan:
    """Unique storage spans of a tree's tensors and each tensor's view into them."""

    spans: tuple[Span, ...]
    sources: tuple[torch.UntypedStorage, ...]
    views: tuple[View, ...]

    @property
    def nbytes(self) -> int:
        """Bytes to copy: each shared storage counted once."""
        return sum(s.nbytes for s in self.spans)

    @property
    def layout(self) -> tuple[tuple[str, int], ...]:
        """What buffers must look like to hold this plan: (device type, bytes) per span."""
        return tuple((s.device.type, s.nbytes) for s in self.spans)


def plan_storages(tensors: Sequence[torch.Tensor]) -> StoragePlan:
    """Group tensors by the storage they share and trim each storage to the bytes they cover.

    A view of a small part of a large storage costs only that part; aliased tensors (tied
    weights, views, slices) land in one span with their relative offsets and strides intact.
    """
    groups: dict[tuple[str, int | None, int], list[int]] = {}
    extents: list[tuple[int, int]] = []
    for i, t in enumerate(tensors):
        lo, hi = _byte_extent(t)
        extents.append((lo, hi))
        if hi > lo:
            dev = t.device
            key = (dev.type, dev.index, t.untyped_storage().data_ptr())
            groups.setdefault(key, []).append(i)
    spans: list[Span] = []
    sources: list[torch.UntypedStorage] = []
    views: list[View | None] = [None] * len(tensors)
    for members in groups.values():
        start = min(extents[i][0] for i in members) // SPAN_ALIGN * SPAN_ALIGN
        end = max(extents[i][1] for i in members)
        first = tensors[members[0]]
        spans.append(Span(first.device, start, end - start))
        sources.append(first.untyped_storage())
        for i in members:
            t = tensors[i]
            views[i] = View(
                len(spans) - 1,
                (extents[i][0] - start) // t.element_size(),
                tuple(t.shape),
                tuple(t.stride()),
                t.dtype,
            )
    for i, t in enumerate(tensors):
        if views[i] is None:
            views[i] = View(-1, 0, tuple(t.shape), tuple(t.stride()), t.dtype)
    return StoragePlan(tuple(spans), tuple(sources), tuple(v for v in views if v is not None))


def _byte_extent(t: torch.Tensor) -> tuple[int, int]:
    """The [start, end) bytes of ``t``'s storage that its elements touch (empty if no elements)."""
    n = int(t.numel())
    if n == 0:
        return (0, 0)
    size = t.element_size()
    start = int(t.storage_offset()) * size
    if t.is_contiguous():
        return (start, start + n * size)
    last = sum((int(d) - 1) * int(s) for d, s in zip(t.shape, t.stride(), strict=True))
    return (start, start + (last + 1) * size)


def view_tensor(view: View, storages: Sequence[torch.UntypedStorage]) -> torch.Tensor:
    """Build the tensor ``view`` describes over ``storages[view.span]`` (a fresh empty if -1)."""
    if view.span < 0:
        return torch.empty_strided(view.shape, view.stride, dtype=view.dtype)
    out = torch.empty(0, dtype=view.dtype, device=storages[view.span].device)
    return out.set_(storages[view.span], view.offset, view.shape, view.stride)
