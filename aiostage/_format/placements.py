"""The geometry of DTensor layouts: which box of the global tensor each shard holds.

A box is the region (offset, shape) of a global tensor that one tensor holds: a plain tensor holds
all of it, a DTensor's local shard the chunk torch's rule gives its mesh coordinate (``torch.chunk``
sizes per ``Shard`` placement, mesh dimensions left to right, uneven and empty chunks included).
Placements are handled in their stored JSON form; pure functions, no I/O, no collectives.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .._core.tree import TensorLeaf
from ..errors import CheckpointCorrupt, UnsupportedValueError, UsageError
from .codec import Record

__all__ = [
    "Box",
    "encode_placements",
    "full_box",
    "global_shape",
    "saved_box",
    "shard_box",
    "target_box",
]

Json = Any


@dataclass(frozen=True, slots=True)
class Box:
    """The region of a global tensor one tensor holds: where it starts and its shape."""

    offset: tuple[int, ...]
    shape: tuple[int, ...]

    @property
    def volume(self) -> int:
        """Elements in the box."""
        return math.prod(self.shape)

    def intersect(self, other: Box) -> Box | None:
        """The common region of two boxes of one tensor, ``None`` if they share no element."""
        lo = [max(a, b) for a, b in zip(self.offset, other.offset, strict=True)]
        ends = zip(self.offset, self.shape, other.offset, other.shape, strict=True)
        hi = [min(a + n, b + m) for a, n, b, m in ends]
        if any(h <= low for low, h in zip(lo, hi, strict=True)) or not self.volume:
            return None
        return Box(tuple(lo), tuple(h - low for low, h in zip(lo, hi, strict=True)))


def full_box(shape: Sequence[int]) -> Box:
    """The box of a whole tensor of ``shape``."""
    return Box((0,) * len(shape), tuple(shape))


# ---------------------------------------------------------------- placements and chunks


def encode_placements(placements: Iterable[Any], key: str) -> list[Json]:
    """DTensor placements as JSON: ``["shard", dim]``, ``["replicate"]``, ``["partial", op]``.

    Raises ``UnsupportedValueError`` naming ``key`` for any other placement (``_StridedShard``).
    """
    out: list[Json] = []
    for p in placements:
        if p.is_shard():
            out.append(["shard", p.dim])
        elif p.is_replicate():
            out.append(["replicate"])
        elif p.is_partial():
            out.append(["partial", str(p.reduce_op)])
        else:
            raise UnsupportedValueError(f"DTensor placement {p!r} cannot be stored", key=key)
    return out


def shard_box(
    shape: Sequence[int],
    mesh_shape: Sequence[int],
    placements: Sequence[Json],
    coord: Sequence[int],
) -> Box:
    """The box the rank at mesh coordinate ``coord`` holds of a tensor of global ``shape``.

    Per ``["shard", d]`` placement, left to right over the mesh dimensions, dimension ``d`` of
    what is left is cut as ``torch.chunk`` cuts it (chunks of ``ceil(n / k)``; the last ones may
    be short or empty), as DTensor does; other placements do not cut.
    """
    size, offset = list(shape), [0] * len(shape)
    for mesh_dim, p in enumerate(placements):
        if p[0] != "shard":
            continue
        d, n, k = p[1], size[p[1]], mesh_shape[mesh_dim]
        chunk = -(-n // k)
        start = min(n, chunk * coord[mesh_dim])
        offset[d] += start
        size[d] = min(n, start + chunk) - start
    return Box(tuple(offset), tuple(size))


@dataclass(frozen=True, slots=True)
class _Meta:
    """A stored DTensor record's layout, validated."""

    shape: tuple[int, ...]
    placements: list[Json]
    mesh: torch.Tensor
    offset: tuple[int, ...] | None


def _meta(r: Record, key: str, where: str) -> _Meta:
    """Parse ``r.dtensor``; ``CheckpointCorrupt`` naming the file and key if it is malformed."""
    d = r.dtensor
    try:
        shape = tuple(int(n) for n in d["shape"])
        placements = list(d["placements"])
        mesh = torch.tensor(d["mesh"], dtype=torch.int64)
        offset = d.get("offset")
        offset = tuple(int(n) for n in offset) if offset is not None else None
        ok = len(shape) == len(r.shape) and len(placements) == mesh.dim()
        ok = ok and all(_placement_ok(p, len(shape)) for p in placements)
        if not ok or (offset is not None and len(offset) != len(shape)):
            raise ValueError("its shape, mesh and placements do not agree")
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError) as exc:
        raise CheckpointCorrupt(f"{where}: bad DTensor layout: {exc}", path=where, key=key) from exc
    return _Meta(shape, placements, mesh, offset)


def _placement_ok(p: Json, ndim: int) -> bool:
    if p == ["replicate"] or (isinstance(p, list) and p[:1] == ["partial"]):
        return True
    return isinstance(p, list) and len(p) == 2 and p[0] == "shard" and p[1] in range(ndim)


def global_shape(r: Record, key: str, where: str) -> tuple[int, ...]:
    """The shape of the whole tensor a record holds (of a DTensor: its global shape)."""
    return _meta(r, key, where).shape if r.wrap == "dtensor" else r.shape


def saved_box(r: Record, rank: int, key: str, where: str) -> Box | None:
    """The box record ``r`` of the file saved by ``rank`` holds (``None``: rank not in the mesh).

    The offset stored with the record is used; a checkpoint written before it was stored falls
    back on the saving rank's coordinate in the saved mesh (its group rank taken as global rank).
    """
    if r.wrap != "dtensor":
        return full_box(r.shape)
    m = _meta(r, key, where)
    if any(p[0] == "partial" for p in m.placements):
        raise UsageError(
            f"{key} was saved with a Partial placement and cannot be resharded; redistribute "
            "it to Shard or Replicate before saving, or load it into the same layout"
        )
    if m.offset is not None:
        box = Box(m.offset, r.shape)
    else:
        coord = (m.mesh == rank).nonzero()
        if not len(coord):
            return None
        box = shard_box(m.shape, tuple(m.mesh.shape), m.placements, coord[0].tolist())
    ends = zip(box.offset, box.shape, m.shape, strict=True)
    if box.shape != r.shape or not all(o >= 0 and o + n <= g for o, n, g in ends):
        raise CheckpointCorrupt(
            f"{where}: {key} holds a {list(r.shape)} shard that is not rank {rank}'s part of the "
            f"{list(m.shape)} tensor",
            path=where,
            key=key,
        )
    return box


def target_box(leaf: TensorLeaf) -> Box | None:
    """The box a target DTensor's local shard holds (``None``: this rank is not in its mesh)."""
    spec = leaf.spec
    coord = spec.mesh.get_coordinate()
    if coord is None:
        return None
    placements = encode_placements(spec.placements, leaf.key)
    if any(p[0] == "partial" for p in placements):
        raise UsageError(f"cannot load into {leaf.key}: it has a Partial placement")
    shape = tuple(spec.tensor_meta.shape)
    box = shard_box(shape, tuple(spec.mesh.mesh.shape), placements, coord)
    if box.shape != tuple(leaf.data.shape):
        raise UsageError(
            f"cannot load into {leaf.key}: its local shard {list(leaf.data.shape)} is not the "
            f"{list(box.shape)} torch's chunking gives it"
        )
    return box
