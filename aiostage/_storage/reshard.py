"""Fitting a checkpoint into existing tensors: the checks, which saved shards serve each target.

Loading into a different layout is geometry (``placements``): each target box is covered by the saved
boxes that intersect it, one replica per distinct saved box, and only the intersections are
copied. Pure planning and CPU copies; no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, is_dataclass
from typing import Any

import torch

from .._core.tree import NO_DATA, KeyPath, Node, TensorLeaf, Tree, key_str, unflatten
from .._format.codec import Record
from .._format.placements import (
    Box,
    encode_placements,
    full_box,
    global_shape,
    saved_box,
    target_box,
)
from ..errors import CheckpointCorrupt, StateDictMismatch

__all__ = [
    "Piece",
    "Saved",
    "check_local",
    "copy_pieces",
    "into_result",
    "key_problems",
    "needs_reshard",
    "plan_pieces",
]


def key_problems(mine: Iterable[KeyPath], theirs: Iterable[KeyPath]) -> list[str]:
    """Keys only in the target (``mine``) or only in the checkpoint (``theirs``)."""
    a, b = list(mine), list(theirs)
    sa, sb = set(a), set(b)
    out = [
        f"missing key {key_str(p)}: in the target, not in the checkpoint" for p in a if p not in sb
    ]
    return out + [
        f"unexpected key {key_str(p)}: in the checkpoint, not in the target"
        for p in b
        if p not in sa
    ]


def _mismatch(where: str, problems: list[str]) -> StateDictMismatch:
    return StateDictMismatch(
        f"{where}: the target differs from the checkpoint in {len(problems)} place(s):\n  "
        + "\n  ".join(problems),
        path=where,
        problems=problems,
    )


def check_local(
    leaves: Sequence[TensorLeaf], paths: Sequence[KeyPath], records: Sequence[Record], where: str
) -> list[torch.Tensor]:
    """The target tensor for each record, shapes compared shard to shard (``needs_reshard``
    found the layouts the same).

    Raises ``StateDictMismatch`` listing every difference.
    """
    mine = {leaf.path: leaf for leaf in leaves}
    problems = key_problems(mine, paths)
    for p, r in zip(paths, records, strict=True):
        if p in mine:
            problems += _differences(key_str(p), r, mine[p])
    if problems:
        raise _mismatch(where, problems)
    return [mine[p].data for p in paths]


def _differences(key: str, r: Record, leaf: TensorLeaf) -> list[str]:
    out = []
    if tuple(leaf.data.shape) != r.shape:
        out.append(
            f"shape mismatch at {key}: checkpoint {list(r.shape)}, target {list(leaf.data.shape)}"
        )
    if leaf.data.dtype != r.dtype:
        out.append(f"dtype mismatch at {key}: checkpoint {r.dtype}, target {leaf.data.dtype}")
    return out


def needs_reshard(
    leaves: Sequence[TensorLeaf], paths: Sequence[KeyPath], records: Sequence[Record]
) -> bool:
    """Whether loading into ``leaves`` (in the saving world) needs more than this rank's own
    file, shard for shard: a target DTensor laid out unlike the saved one or saved plain, or a
    saved DTensor loaded into a plain tensor shaped unlike its local shard (its full tensor)."""
    mine = {leaf.path: leaf for leaf in leaves}
    return any(
        not _same_layout(mine[p], r) for p, r in zip(paths, records, strict=True) if p in mine
    )


def _same_layout(leaf: TensorLeaf, r: Record) -> bool:
    if leaf.wrap != "dtensor":  # a plain target takes a plain tensor or a local shard as is
        return r.wrap != "dtensor" or tuple(leaf.data.shape) == r.shape
    if r.wrap != "dtensor" or tuple(leaf.data.shape) != r.shape:
        return False
    spec, saved = leaf.spec, r.dtensor
    return isinstance(saved, dict) and (
        saved.get("mesh") == spec.mesh.mesh.tolist()
        and saved.get("placements") == encode_placements(spec.placements, leaf.key)
        and saved.get("shape") == list(spec.tensor_meta.shape)
    )


# ---------------------------------------------------------------- planning the reads


@dataclass(frozen=True, slots=True)
class Saved:
    """What one saving rank's file holds: key path and record per tensor."""

    rank: int
    paths: Sequence[KeyPath]
    records: Sequence[Record]
    where: str


@dataclass(frozen=True, slots=True)
class Piece:
    """One copy: region ``part`` from record ``record`` of file ``file`` into target ``target``.

    ``src`` and ``dst`` are the boxes the saved record and the target tensor hold.
    """

    target: int
    file: int
    record: int
    src: Box
    dst: Box
    part: Box


def plan_pieces(
    leaves: Sequence[TensorLeaf], saved: Sequence[Saved], home: int, rank: int
) -> list[Piece]:
    """The copies that fill this rank's part of every target from the saved shards.

    ``saved[home]`` is the file whose keys, plain tensors and values this rank loads; the
    boxes of DTensor records come from every file. A saved box held by several files (replicas)
    is read from one: the home file if it holds it, else the one picked by ``rank``, so replicas
    share the reads. Raises ``StateDictMismatch`` listing every key, dtype or global-shape
    difference, ``CheckpointCorrupt`` if the saved shards do not cover a target.
    """
    first = saved[home]
    problems = key_problems((leaf.path for leaf in leaves), first.paths)
    mine = {leaf.path: leaf for leaf in leaves}
    for p, r in zip(first.paths, first.records, strict=True):
        if p in mine:
            problems += _global_differences(key_str(p), r, mine[p], first.where)
    if problems:
        raise _mismatch(first.where, problems)
    holders: dict[KeyPath, list[tuple[int, int]]] = {}
    for s in saved:
        for i, p in enumerate(s.paths):
            holders.setdefault(p, []).append((s.rank, i))
    out: list[Piece] = []
    for j, leaf in enumerate(leaves):
        out += _pieces(j, leaf, holders[leaf.path], saved, home, rank)
    return out


def _global_differences(key: str, r: Record, leaf: TensorLeaf, where: str) -> list[str]:
    out = []
    ours = tuple(leaf.spec.tensor_meta.shape) if leaf.wrap == "dtensor" else tuple(leaf.data.shape)
    theirs = global_shape(r, key, where)
    if ours != theirs:
        out.append(f"shape mismatch at {key}: checkpoint {list(theirs)}, target {list(ours)}")
    if leaf.data.dtype != r.dtype:
        out.append(f"dtype mismatch at {key}: checkpoint {r.dtype}, target {leaf.data.dtype}")
    return out


def _pieces(
    j: int,
    leaf: TensorLeaf,
    holders: list[tuple[int, int]],
    saved: Sequence[Saved],
    home: int,
    rank: int,
) -> list[Piece]:
    """The copies for target ``j``; ``CheckpointCorrupt`` unless they cover its box."""
    dst = target_box(leaf) if leaf.wrap == "dtensor" else full_box(leaf.data.shape)
    if dst is None or not dst.volume:
        return []
    want = tuple(leaf.spec.tensor_meta.shape) if leaf.wrap == "dtensor" else dst.shape
    replicas: dict[Box, list[tuple[int, int]]] = {}
    for f, i in holders:
        r, where = saved[f].records[i], saved[f].where
        if r.wrap != "dtensor" and f != home:
            continue  # a plain tensor is this rank's own value: the home file's copy
        if r.dtype != leaf.data.dtype or global_shape(r, leaf.key, where) != want:
            raise CheckpointCorrupt(
                f"{where}: {leaf.key} is not the {list(want)} {leaf.data.dtype} tensor that "
                f"{saved[home].where} holds",
                path=where,
                key=leaf.key,
            )
        box = saved_box(r, f, leaf.key, where)
        if box is not None:
            replicas.setdefault(box, []).append((f, i))
    out = []
    for box, members in replicas.items():
        part = box.intersect(dst)
        if part is not None:
            f, i = _pick(members, home, rank)
            out.append(Piece(j, f, i, box, dst, part))
    _check_cover(leaf.key, dst, out, saved[home].where)
    return out


def _pick(members: list[tuple[int, int]], home: int, rank: int) -> tuple[int, int]:
    """The replica to read: the home file's, else one chosen by ``rank`` to spread the reads."""
    for m in members:
        if m[0] == home:
            return m
    return sorted(members)[rank % len(members)]


def _check_cover(key: str, dst: Box, pieces: list[Piece], where: str) -> None:
    """Distinct saved boxes of one tensor are disjoint, so their overlaps must add up."""
    got = sum(p.part.volume for p in pieces)
    if got != dst.volume:
        raise CheckpointCorrupt(
            f"{where}: the saved shards of {key} cover {got} of the {dst.volume} elements "
            f"at offset {list(dst.offset)} shape {list(dst.shape)} this rank loads",
            path=where,
            key=key,
        )


# ---------------------------------------------------------------- copying


def copy_pieces(
    pieces: Sequence[Piece],
    targets: Sequence[torch.Tensor],
    source: Callable[[int, int], torch.Tensor],
) -> None:
    """Copy each piece from ``source(file, record)`` into its target (worker thread).

    Only the elements of ``part`` are read, so only the pages under them are touched.
    """
    with torch.no_grad():
        for p in pieces:
            src = _region(source(p.file, p.record), p.src, p.part)
            _region(targets[p.target], p.dst, p.part).copy_(src)


def _region(t: torch.Tensor, box: Box, part: Box) -> torch.Tensor:
    """The elements of ``part`` inside ``t``, which holds ``box`` (a view, no copy)."""
    for d, (at, start, n) in enumerate(zip(box.offset, part.offset, part.shape, strict=True)):
        t = t.narrow(d, start - at, n)
    return t


def into_result(root: Node, paths: Sequence[KeyPath], into: Any) -> Any:
    """The checkpoint's structure (``root``) holding ``into``'s own tensor objects."""
    objs = [_lookup(into, p) for p in paths]
    leaves = tuple(TensorLeaf(p, NO_DATA) for p in paths)
    return unflatten(Tree(root, leaves), objs, copy_values=False)


def _lookup(obj: Any, path: KeyPath) -> Any:
    for k in path:
        obj = getattr(obj, str(k)) if is_dataclass(obj) else obj[k]
    return obj
