"""Preparing a save: walk the state dict, stage what is not on the CPU, lay out the data file.

The layout is pure planning, no I/O: a ``Header`` (checksums still zero) and, per entry, the CPU
bytes to write. A contiguous tensor that shares its storage with no other tensor becomes an entry
of its own dtype and shape under its key path; every other storage becomes one uint8 entry and its
tensors views into it (element offset, shape, stride), so aliasing survives a round trip.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from .._core.buffers import source_bytes
from .._core.dtypes import ST_DTYPES
from .._core.storages import StoragePlan
from .._core.tree import TensorLeaf, Tree
from .codec import Entry, Header, Record, Source, round_up
from .placements import encode_placements, shard_box
from .structure import encode_skeleton, encode_value

__all__ = ["plan_file"]

#: aliased storages are stored as uint8 entries padded to this, and placed first
_SPAN_PAD = 64
_RESERVED = "__aiostage__/"


def plan_file(tree: Tree, plan: StoragePlan) -> tuple[Header, list[Source]]:
    """Lay out the tensors of ``tree`` (CPU data) as entries; checksums are left at zero.

    A contiguous tensor that shares its storage with no other tensor is stored as itself; every
    other storage is stored once, as uint8, and its tensors as views into it. Raises
    ``UnsupportedValueError`` naming the key of a leaf the format cannot store.
    """
    members = Counter(v.span for v in plan.views)
    plain = [
        i
        for i, (leaf, v) in enumerate(zip(tree.leaves, plan.views, strict=True))
        if v.dtype in ST_DTYPES
        and (leaf.data.numel() == 0 or (members[v.span] == 1 and leaf.data.is_contiguous()))
    ]
    plain.sort(key=lambda i: -tree.leaves[i].data.element_size())
    plain_set = set(plain)
    spans = sorted({v.span for i, v in enumerate(plan.views) if i not in plain_set} - {-1})
    entries: list[Entry] = []
    sources: list[Source] = []
    for s in spans:
        data = source_bytes(plan.sources[s], plan.spans[s])
        size = round_up(data.numel(), _SPAN_PAD)
        entries.append(_entry(f"{_RESERVED}span/{s}", "U8", (size,), size, entries))
        sources.append((data, size - data.numel()))
    names: set[str] = set()
    for i in plain:
        t = tree.leaves[i].data
        name = _entry_name(tree.leaves[i], i, names)
        entries.append(_entry(name, ST_DTYPES[t.dtype], tuple(t.shape), t.nbytes, entries))
        sources.append((t.reshape(-1).view(torch.uint8), 0))
    where = {("s", s): n for n, s in enumerate(spans)}
    where |= {("t", i): len(spans) + n for n, i in enumerate(plain)}
    records = [_record(leaf, plan, i, where) for i, leaf in enumerate(tree.leaves)]
    skeleton = encode_skeleton(tree.root)
    return Header(tuple(entries), tuple(records), skeleton, (0,) * len(entries)), sources


def _entry(
    name: str, dtype: str, shape: tuple[int, ...], nbytes: int, before: list[Entry]
) -> Entry:
    begin = before[-1].end if before else 0
    return Entry(name, dtype, shape, begin, begin + nbytes)


def _entry_name(leaf: TensorLeaf, i: int, taken: set[str]) -> str:
    name = leaf.key
    try:
        name.encode("utf-8")
        usable = name not in taken and not name.startswith(("__aiostage__", "__metadata__"))
    except UnicodeEncodeError:
        usable = False
    name = name if usable else f"{_RESERVED}tensor/{i}"
    taken.add(name)
    return name


def _record(
    leaf: TensorLeaf, plan: StoragePlan, i: int, where: dict[tuple[str, int], int]
) -> Record:
    v = plan.views[i]
    entry = where.get(("t", i), where.get(("s", v.span), -1))
    offset = 0 if ("t", i) in where else v.offset
    attrs = encode_value(leaf.attrs, leaf.path) if leaf.attrs else None
    spec = _encode_dtensor(leaf) if leaf.wrap == "dtensor" else None
    return Record(
        entry, offset, v.shape, v.stride, v.dtype, leaf.wrap, leaf.requires_grad, attrs, spec
    )


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
