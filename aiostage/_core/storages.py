"""Storage identity: which tensors share bytes, the spans a staged copy keeps of each, and the
stamp that tells whether a plan still fits a later set of tensors."""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .breath import breathe

__all__ = []

#: byte alignment of a storage span's start; a multiple of every dtype's item size
SPAN_ALIGN = 64
#: items one C-level map of ``read_all`` reads (about a tenth of a millisecond for the dearest
#: reader, ~0.4 us a tensor)
SLICE = 256
#: tensors ``plan_storages`` plans between two looks at the clock (``breathe``)
_STEP = 32
#: reads one property of each item of a slice
Reader = Callable[[list[Any]], Iterable[Any]]


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


class Layout(tuple[tuple[str, int], ...]):
    """What buffers must look like to hold a plan: (device type, bytes) per span.

    Built once per plan in a worker thread; its total is summed then, and comparing a layout with
    itself (a reused plan's) is one identity check, so the loop never walks thousands of spans.
    """

    nbytes: int

    def __new__(cls, spans: Iterable[tuple[str, int]]) -> Layout:
        self = super().__new__(cls, spans)
        self.nbytes = sum(n for _, n in self)
        return self

    def __eq__(self, other: object) -> bool:
        return self is other or tuple.__eq__(self, other)

    __hash__ = tuple.__hash__


@dataclass(frozen=True, slots=True)
class StoragePlan:
    """Unique storage spans of a tree's tensors and each tensor's view into them; ``nbytes``: the
    bytes to copy (each shared storage once), ``layout``: the buffers it needs."""

    spans: tuple[Span, ...]
    holders: tuple[torch.Tensor, ...]  # a tensor over each span's storage (``source``)
    views: tuple[View, ...]
    layout: Layout
    nbytes: int

    def source(self, span: int) -> torch.UntypedStorage:
        """The storage span ``span`` is part of. Asked only where needed: the object made for a
        tensor's storage lives as long as the storage does, walked by every full collection."""
        return self.holders[span].untyped_storage()


def plan_storages(tensors: Sequence[torch.Tensor]) -> StoragePlan:
    """Group tensors by the storage they share and trim each storage to the bytes they cover.

    A view of a small part of a large storage costs only that part; aliased tensors (tied
    weights, views, slices) land in one span with their relative offsets and strides intact.
    """
    groups: dict[tuple[str, int | None, int], list[int]] = {}
    extents: list[tuple[int, int]] = []
    for i, t in enumerate(tensors):
        if not i % _STEP:
            breathe()
        lo, hi = _byte_extent(t)
        extents.append((lo, hi))
        if hi > lo:
            dev = t.device
            key = (dev.type, dev.index, t.data_ptr() - lo)  # its storage's address, no object
            groups.setdefault(key, []).append(i)
    spans: list[Span] = []
    holders: list[torch.Tensor] = []
    views: list[View | None] = [None] * len(tensors)
    for members in groups.values():
        breathe()
        start = min(extents[i][0] for i in members) // SPAN_ALIGN * SPAN_ALIGN
        end = max(extents[i][1] for i in members)
        first = tensors[members[0]]
        spans.append(Span(first.device, start, end - start))
        holders.append(first)
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
        if not i % _STEP:
            breathe()
        if views[i] is None:
            views[i] = View(-1, 0, tuple(t.shape), tuple(t.stride()), t.dtype)
    layout = Layout((s.device.type, s.nbytes) for s in spans)
    done = tuple(v for v in views if v is not None)
    return StoragePlan(tuple(spans), tuple(holders), done, layout, layout.nbytes)


def storage_address(t: torch.Tensor) -> int:
    """The address of ``t``'s storage, from the tensor alone: asking for ``untyped_storage()``
    makes an object that lives as long as the storage's memory, which every full collection
    then walks (one per tensor of a model, for the rest of its life)."""
    return t.data_ptr() - int(t.storage_offset()) * t.element_size()


def storage_addresses(tensors: Sequence[torch.Tensor]) -> list[int]:
    """``storage_address`` of each tensor, by C-level maps (no Python frame per tensor)."""
    ptrs = map(torch.Tensor.data_ptr, tensors)
    offsets = map(
        operator.mul,
        map(torch.Tensor.storage_offset, tensors),
        map(torch.Tensor.element_size, tensors),
    )
    return list(map(operator.sub, ptrs, offsets))


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


def view_tensor(
    view: View, storages: Sequence[torch.UntypedStorage | torch.Tensor]
) -> torch.Tensor:
    """Build the tensor ``view`` describes over ``storages[view.span]`` (a storage, or a tensor
    whose storage it is; a fresh empty if -1)."""
    if view.span < 0:
        return torch.empty_strided(view.shape, view.stride, dtype=view.dtype)
    source: Any = storages[view.span]  # torch's stubs lack ``set_(Tensor, offset, size, stride)``
    out = torch.empty(0, dtype=view.dtype, device=source.device)
    return out.set_(source, view.offset, view.shape, view.stride)


#: what a plan of a tensor depends on, each read by a C method (address and offset give the
#: storage's address; the device index and the address, its device)
_METADATA: tuple[Reader, ...] = tuple(
    functools.partial(map, read)
    for read in (
        torch.Tensor.data_ptr,
        torch.Tensor.storage_offset,
        torch.Tensor.size,
        torch.Tensor.stride,
        operator.attrgetter("dtype"),
        torch.Tensor.get_device,
    )
)


def stamp(tensors: list[torch.Tensor]) -> list[list[Any]]:
    """What ``plan_storages(tensors)`` depends on, one list per property: equal stamps plan
    equal spans and views. Raises what a tensor method raises for something that is not a plain
    strided tensor."""
    return read_all(_METADATA, tensors)


def read_all(readers: Sequence[Reader], items: list[Any]) -> list[list[Any]]:
    """``[list(read(items)) for read in readers]``, read a slice at a time: a worker thread
    reading thousands of tensors hands the GIL over by the clock (``breathe``) between slices,
    so an event loop waiting for it runs within a fraction of a millisecond, not after the
    interpreter's 5 ms switch interval. Each ``read`` maps a C function over its slice (one C
    call of at most ``SLICE`` items, no Python frame per item)."""
    out: list[list[Any]] = [[] for _ in readers]
    for at in range(0, len(items), SLICE):
        part = items[at : at + SLICE]
        for got, read in zip(out, readers, strict=True):
            breathe()
            got.extend(read(part))
    return out


def matches(readers: Sequence[Reader], items: list[Any], expected: Sequence[Sequence[Any]]) -> bool:
    """Whether ``read_all(readers, items) == expected`` (each expected a list, or an ``array``
    of what its reader reads), read and compared a slice at a time (``breathe`` between
    slices) and stopping at the first difference: no list of the whole is built, so none is
    freed in one long C call either."""
    if any(len(want) != len(items) for want in expected):
        return False
    for at in range(0, len(items), SLICE):
        part = items[at : at + SLICE]
        for want, read in zip(expected, readers, strict=True):
            breathe()
            if not _same(read(part), want[at : at + SLICE]):
                return False
    return True


def _same(got: Iterable[Any], want: Sequence[Any]) -> bool:
    """Whether ``got`` holds the items of ``want`` (a list, or an array of numbers)."""
    return list(got) == (want if type(want) is list else list(want))


def fits(tensors: list[torch.Tensor], stamped: Sequence[list[Any]]) -> bool:
    """Whether ``stamp(tensors) == stamped`` (``matches``): the plan of that stamp still fits.
    Raises what a tensor method raises for something that is not a plain strided tensor."""
    return matches(_METADATA, tensors, stamped)
