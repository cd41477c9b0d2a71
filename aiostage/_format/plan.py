"""Preparing a save: walk the state dict, stage what is not on the CPU, lay out the data file.

The layout is pure planning, no I/O: a ``Header`` (checksums still zero) and, per entry, the CPU
bytes to write. A contiguous tensor that shares its storage with no other tensor becomes an entry
of its own dtype and shape under its key path; every other storage becomes one uint8 entry and its
tensors views into it (element offset, shape, stride), so aliasing survives a round trip.
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import accumulate, repeat
from typing import Any

import torch

from .._core.buffers import source_bytes
from .._core.dtypes import ST_DTYPES
from .._core.storages import StoragePlan, View, plan_storages, storage_addresses
from .._core.tree import TensorLeaf, Tree
from .codec import Entry, Header, Record, Source, round_up
from .placements import encode_placements, shard_box
from .structure import encode_skeleton, encode_value

__all__ = ["plan_file"]

#: aliased storages are stored as uint8 entries padded to this, and placed first
_SPAN_PAD = 64
_RESERVED = "__aiostage__/"


def plan_file(
    tree: Tree, plan: StoragePlan | None = None, skeleton: Any = None, *, flat: bool = True
) -> tuple[Header, list[Source]]:
    """Lay out the tensors of ``tree`` (CPU data) as entries; checksums are left at zero.

    A contiguous tensor that shares its storage with no other tensor is stored as itself; every
    other storage is stored once, as uint8, and its tensors as views into it. ``plan``:
    ``plan_storages`` of the leaves' data, if the caller has it; without it only the tensors
    that are not stored as themselves are planned storage by storage (thousands of lone tensors
    cost one pass of C calls). ``skeleton``: ``encode_skeleton(tree.root)`` when the caller
    already has it. ``flat=False``: a tensor stored as itself is its own source (contiguous, of
    its own dtype and shape), not a flat uint8 view of it, which saves two tensor operations per
    tensor for a consumer that reads bytes by address (``DurableWriter``). Raises
    ``UnsupportedValueError`` naming the key of a leaf the format cannot store.
    """
    tensors = [leaf.data for leaf in tree.leaves]
    if plan is None:
        rest = [i for i, alone in enumerate(_alone(tensors)) if not alone]
        plan = plan_storages([tensors[i] for i in rest])
        views = dict(zip(rest, plan.views, strict=True))
    else:
        views = _spanned(plan, tensors)
    sizes = list(map(_ITEMSIZE, tensors))
    plain = [i for i in range(len(tensors)) if i not in views]
    plain.sort(key=sizes.__getitem__, reverse=True)  # stable: equal sizes keep their order
    spans = sorted({v.span for v in views.values()} - {-1})
    entries, sources = _span_entries(plan, spans)
    shapes = list(map(tuple, map(torch.Tensor.size, tensors)))
    dtypes = list(map(_DTYPE, tensors))
    entries += _plain_entries(tree.leaves, plain, shapes, dtypes, entries)
    picked: Iterable[torch.Tensor] = [tensors[i] for i in plain]
    if flat:
        picked = map(torch.Tensor.view, map(torch.Tensor.reshape, picked, repeat(-1)), repeat(_U8))
    sources += zip(picked, repeat(0, len(plain)), strict=True)
    where = _where(len(tensors), views, spans, plain)
    records = _records(tree.leaves, where, shapes, map(torch.Tensor.stride, tensors), dtypes)
    skeleton = encode_skeleton(tree.root) if skeleton is None else skeleton
    return Header(tuple(entries), tuple(records), skeleton, (0,) * len(entries)), sources


def _plain_entries(
    leaves: Sequence[TensorLeaf],
    plain: list[int],
    shapes: list[tuple[int, ...]],
    dtypes: list[torch.dtype],
    before: list[Entry],
) -> list[Entry]:
    """The entries of the tensors stored as themselves, placed after ``before``: built by
    ``map`` over C calls, one Python frame per tensor only where a name needs one."""
    at = before[-1].end if before else 0
    names = _entry_names(leaves, plain)
    sizes = [math.prod(shapes[i]) * dtypes[i].itemsize for i in plain]
    ends = list(accumulate(sizes, initial=at))
    dtype_names = [ST_DTYPES[dtypes[i]] for i in plain]
    fields = zip(names, dtype_names, [shapes[i] for i in plain], ends[:-1], ends[1:], strict=True)
    return list(map(tuple.__new__, repeat(Entry), fields))


def _entry_names(leaves: Sequence[TensorLeaf], plain: list[int]) -> list[str]:
    """Each plain leaf's entry name (``_entry_name``): in one pass when every key path is
    distinct, unreserved and ASCII (the usual case), else leaf by leaf."""
    names = [".".join(map(str, leaves[i].path)) for i in plain]
    if (
        len(set(names)) == len(names)
        and "".join(names).isascii()
        and not any(map(operator.methodcaller("startswith", _RESERVED_PREFIXES), names))
        and "" not in names
    ):
        return names
    taken: set[str] = set()
    return [_entry_name(leaves[i], i, taken) for i in plain]


def _where(
    n: int, views: dict[int, View], spans: list[int], plain: list[int]
) -> list[tuple[int, int]]:
    """Each leaf's entry and element offset in it: a view into its span's entry (spans are
    placed first), or an entry of its own (-1: no elements and no bytes)."""
    entry_of = {s: k for k, s in enumerate(spans)}
    where = [(-1, 0)] * n
    for i, v in views.items():
        where[i] = (entry_of.get(v.span, -1), v.offset)
    for k, i in enumerate(plain):
        where[i] = (len(spans) + k, 0)
    return where


def _records(
    leaves: Sequence[TensorLeaf],
    where: list[tuple[int, int]],
    shapes: list[tuple[int, ...]],
    strides: Iterable[tuple[int, ...]],
    dtypes: list[torch.dtype],
) -> list[Record]:
    """One record per leaf: its entry and element offset (``where``), shape, stride, dtype;
    built by ``map`` over C calls, plus the extras of a leaf with attributes or a DTensor."""
    wraps = list(map(_WRAP, leaves))
    fields = zip(
        map(_FIRST, where), map(_SECOND, where), shapes, strides, dtypes, wraps,
        map(_REQUIRES_GRAD, leaves), repeat(None), repeat(None),
    )  # fmt: skip
    out = list(map(tuple.__new__, repeat(Record), fields))
    for i, leaf in enumerate(leaves):
        if leaf.attrs or wraps[i] == "dtensor":
            out[i] = out[i]._replace(**dict(zip(("attrs", "dtensor"), _extras(leaf), strict=True)))
    return out


def _alone(tensors: list[torch.Tensor]) -> list[bool]:
    """Which tensors are stored as themselves: a safetensors dtype, and no elements or alone in
    a contiguous storage. Gathered by ``map`` over C methods, no Python frame per tensor."""
    numels = list(map(torch.Tensor.numel, tensors))
    ptrs = storage_addresses(tensors)  # no storage object made per tensor
    users = Counter(p for p, n in zip(ptrs, numels, strict=True) if n)
    contiguous = map(torch.Tensor.is_contiguous, tensors)
    dtypes = map(_DTYPE, tensors)
    return [
        d in ST_DTYPES and (not n or (c and users[p] == 1))
        for d, n, p, c in zip(dtypes, numels, ptrs, contiguous, strict=True)
    ]


_DTYPE = operator.attrgetter("dtype")
_WRAP = operator.attrgetter("wrap")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_FIRST, _SECOND = operator.itemgetter(0), operator.itemgetter(1)
_RESERVED_PREFIXES = ("__aiostage__", "__metadata__")
_ITEMSIZE = operator.attrgetter("itemsize")
_U8 = torch.uint8


def _spanned(plan: StoragePlan, tensors: list[torch.Tensor]) -> dict[int, View]:
    """The views of ``plan`` that are not stored as themselves (see ``_alone``), by leaf."""
    members = Counter(v.span for v in plan.views)
    return {
        i: v
        for i, (v, t) in enumerate(zip(plan.views, tensors, strict=True))
        if v.dtype not in ST_DTYPES
        or (v.span >= 0 and (members[v.span] > 1 or not t.is_contiguous()))
    }


def _span_entries(plan: StoragePlan, spans: list[int]) -> tuple[list[Entry], list[Source]]:
    """One uint8 entry per storage span, its bytes padded to ``_SPAN_PAD``, placed first."""
    entries: list[Entry] = []
    sources: list[Source] = []
    at = 0
    for s in spans:
        data = source_bytes(plan.source(s), plan.spans[s])
        size = round_up(data.numel(), _SPAN_PAD)
        entries.append(Entry(f"{_RESERVED}span/{s}", "U8", (size,), at, at + size))
        sources.append((data, size - data.numel()))
        at += size
    return entries, sources


def _entry_name(leaf: TensorLeaf, i: int, taken: set[str]) -> str:
    """The leaf's key path joined with dots (as ``key_str`` does), unless another entry has
    that name, it is reserved, or it cannot be encoded as UTF-8: then a reserved name."""
    name = ".".join(map(str, leaf.path)) or "<root>"  # key_str, without a frame per part
    usable = name not in taken and not name.startswith(_RESERVED_PREFIXES)
    if usable and not name.isascii():
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            usable = False
    name = name if usable else f"{_RESERVED}tensor/{i}"
    taken.add(name)
    return name


def _extras(leaf: TensorLeaf) -> tuple[Any, Any]:
    """A record's optional fields: the tensor's attributes and its DTensor spec, encoded."""
    attrs = encode_value(leaf.attrs, leaf.path) if leaf.attrs else None
    return attrs, _encode_dtensor(leaf) if leaf.wrap == "dtensor" else None


def _encode_dtensor(leaf: TensorLeaf) -> dict[str, Any]:
    """Mesh, placements, global shape and stride of a DTensor, and where its local shard sits
    in the global tensor (``offset``, omitted for a rank outside the mesh or a Partial one)."""
    spec = leaf.spec
    placements = encode_placements(spec.placements, leaf.key)
    shape = list(spec.tensor_meta.shape)
    out = {
        "device_type": spec.mesh.device_type,
        "mesh": spec.mesh.mesh.tolist(),
        "dim_names": list(spec.mesh.mesh_dim_names or ()),
        "placements": placements,
        "shape": shape,
        "stride": list(spec.tensor_meta.stride),
        "param": leaf.param,
    }
    coord = spec.mesh.get_coordinate()
    if coord is not None and all(p[0] != "partial" for p in placements):
        out["offset"] = list(shard_box(shape, spec.mesh.mesh.shape, placements, coord).offset)
    return out
