"""A state dict as a frame and back: its outgoing layout (``Planned``) and its rebuild (``Frame``).

Outgoing, a CPU state dict is laid out exactly like a data file (``_format.plan.plan_file``), a
ShardedTensor as the list of its local shards; a state dict that cannot be sent from its own
memory is ``NeedsStaging``. Incoming, each record becomes a view into the one
buffer the frame landed in (aliasing kept), and the receiver's own state dict of the same
structure (the template) gives DTensors their spec and ShardedTensors their global metadata.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .._core import dist, gc_pause
from .._core.storages import plan_storages
from .._core.tree import (
    NO_DATA,
    KeyPath,
    MapNode,
    Node,
    SeqNode,
    ShardedNode,
    TensorLeaf,
    Tree,
    Wrap,
    flatten,
    unflatten,
    wrap_leaf,
)
from .._format.codec import Header, Source
from .._format.plan import plan_file
from .._format.records import check_attrs
from .._format.structure import decode_skeleton
from ..errors import CheckpointCorrupt, ReplicationError

__all__ = [
    "Frame",
    "NeedsStaging",
    "Planned",
    "expected_header",
    "frame_sources",
    "frame_views",
    "plan_cpu_frame",
    "plan_frame",
    "rebuild",
]


@dataclass(frozen=True, slots=True, eq=False)
class Frame:
    """A received state: its validated header, the buffer its data region landed in, and the
    per-entry digests its sender computed (``None``: not kept, the bytes are hashed when used)."""

    header: Header
    data: torch.Tensor
    digests: Sequence[int] | None

    def sources(self) -> list[Source]:
        """Its entries as sources, to send it on or write it (``frame_sources``)."""
        return frame_sources(self.header, self.data)


@dataclass(frozen=True, slots=True)
class Planned:
    """A state dict laid out as a frame sent from its tensors' own memory: its flattened tree
    (the template its receiver rebuilds with), the header, and one source per entry."""

    tree: Tree
    header: Header
    sources: list[Source]


@dataclass(frozen=True, slots=True)
class NeedsStaging:
    """A state dict that cannot be sent from its own memory (a tensor is not on the CPU, or the
    caller asked for a snapshot): stage a CPU copy first and plan that (``plan_cpu_frame``)."""


def frame_sources(header: Header, data: torch.Tensor) -> list[Source]:
    """The entries of a received frame as sources (padding included, so none added)."""
    return [(data[e.begin : e.end], 0) for e in header.entries]


def plan_frame(state: Any, in_place: bool = True) -> Planned | NeedsStaging:
    """Flatten a state dict and lay it out as a frame sent from the tensors' own memory (worker
    thread); ``NeedsStaging`` when a tensor is not on the CPU or ``in_place`` is false.

    Raises ``UnsupportedValueError`` naming the key of a leaf the format cannot hold.
    """
    with gc_pause.paused():
        tree = flatten(state)
        if not in_place or any(leaf.data.device.type != "cpu" for leaf in tree.leaves):
            return NeedsStaging()
        portable = Tree(_portable(tree.root), tree.leaves)
        header, sources = plan_file(portable, plan_storages([leaf.data for leaf in tree.leaves]))
        return Planned(tree, header, sources)


def expected_header(tree: Tree) -> Header:
    """The header a state dict flattened as ``tree`` is sent with, planned without reading or
    copying its tensors (on any device): what a receiver expects from a peer whose state is like
    it (worker thread). Raises ``UnsupportedValueError`` as ``plan_frame`` does."""
    with gc_pause.paused():
        portable = Tree(_portable(tree.root), tree.leaves)
        plan = plan_storages([leaf.data for leaf in tree.leaves])
        return plan_file(portable, plan, flat=False)[0]


def plan_cpu_frame(state: Any) -> Planned:
    """``plan_frame`` for a state dict known to be in CPU memory (a staged or loaded copy).

    Raises ``ValueError`` if a tensor is elsewhere (a bug in the caller), and what
    ``plan_frame`` raises.
    """
    planned = plan_frame(state, True)
    if isinstance(planned, NeedsStaging):
        raise ValueError("a staged copy holds a tensor that is not in CPU memory")
    return planned


def _portable(node: Node) -> Node:
    """The skeleton with each ShardedTensor as the list of its local shards."""
    if isinstance(node, ShardedNode):
        return SeqNode(list, node.children)
    if isinstance(node, MapNode):
        kids = tuple(_portable(c) for c in node.children)
        return MapNode(node.cls, node.keys, kids, node.default_factory)
    if isinstance(node, SeqNode):
        return SeqNode(node.cls, tuple(_portable(c) for c in node.children), node.named)
    return node


def rebuild(
    header: Header, data: torch.Tensor, template: Tree | None, sender: int, owner: Any
) -> Any:
    """The state dict of a frame as views into ``data`` (worker thread).

    Where ``template`` (this rank's own flattened state dict) has a DTensor or a ShardedTensor
    at the same key, the tensors are wrapped with its spec or global metadata; ``owner`` is
    ``(global rank, pg)`` of the rank whose state it is. Raises ``ReplicationError`` naming
    ``sender`` (phase ``"header"``) for a structure that does not decode or fit.
    """
    with gc_pause.paused(), _as_replication_error(sender):
        return _rebuild(header, data, template, sender, owner)


@contextlib.contextmanager
def _as_replication_error(peer: int) -> Iterator[None]:
    """Turn whatever decoding a peer's frame raises into ``ReplicationError(peer, "header")``:
    a malformed frame trips on anything (a bad attribute, a view that does not fit)."""
    try:
        yield
    except ReplicationError:
        raise
    except Exception as exc:
        raise ReplicationError(
            f"its frame does not decode: {type(exc).__name__}: {exc}", peer=peer, phase="header"
        ) from exc


def frame_views(
    header: Header, data: torch.Tensor, peer: int
) -> list[tuple[KeyPath, torch.Tensor]]:
    """Each tensor of a received frame by key path, a view into ``data``: the whole structure
    decoded and every view checked, so a frame that passes can be installed (worker thread).
    Raises ``ReplicationError(peer, "header")`` for anything malformed."""
    with gc_pause.paused(), _as_replication_error(peer):
        _, leaves = frame_leaves(header, peer)
        tensors = frame_tensors(header, data)
        return [(leaf.path, t) for leaf, t in zip(leaves, tensors, strict=True)]


def _rebuild(
    header: Header, data: torch.Tensor, template: Tree | None, sender: int, owner: Any
) -> Any:
    root, leaves = frame_leaves(header, sender)
    mine = {leaf.path: leaf for leaf in template.leaves} if template is not None else {}
    tensors = frame_tensors(header, data)
    for i, leaf in enumerate(leaves):
        t = mine.get(leaf.path)
        if t is not None and t.wrap == "dtensor":
            tensors[i] = wrap_leaf(t, tensors[i])
    out = unflatten(Tree(root, tuple(leaves)), tensors, copy_values=False)
    sharded = _sharded(template.root, ()) if template is not None else {}
    try:
        for path, node in sharded.items():
            _replace_sharded(out, path, node, *owner)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ReplicationError(f"a ShardedTensor: {exc}", peer=sender, phase="header") from exc
    return out


def frame_tensors(header: Header, data: torch.Tensor) -> list[torch.Tensor]:
    """One tensor per record, a view into ``data`` (entries sharing bytes share storage)."""
    base = data.storage_offset()
    typed: dict[torch.dtype, torch.Tensor] = {}
    out = []
    for r in header.records:
        if r.entry < 0 or r.numel == 0:
            out.append(torch.empty_strided(r.shape, r.stride, dtype=r.dtype))
            continue
        whole = typed.get(r.dtype)
        if whole is None:  # as_strided on one typed view per dtype: ~5x faster than set_
            n = data.numel() // r.dtype.itemsize * r.dtype.itemsize
            whole = typed[r.dtype] = data[:n].view(r.dtype)
        at = (base + header.entries[r.entry].begin) // r.dtype.itemsize + r.offset
        out.append(whole.as_strided(r.shape, r.stride, at))
    return out


def frame_leaves(header: Header, peer: int) -> tuple[Node, list[TensorLeaf]]:
    """The skeleton and one (data-less) leaf per record; ``ReplicationError(peer, "header")``."""
    where = f"frame from rank {peer}"
    try:
        root, paths = decode_skeleton(header.skeleton, len(header.records), where)
        leaves = []
        for path, r in zip(paths, header.records, strict=True):
            attrs = check_attrs(r.attrs) if r.attrs is not None else {}
            wrap: Wrap = "parameter" if r.wrap == "parameter" else "tensor"
            leaves.append(TensorLeaf(path, NO_DATA, wrap, r.requires_grad, attrs))
    except (CheckpointCorrupt, ValueError) as exc:
        raise ReplicationError(str(exc), peer=peer, phase="header") from exc
    return root, leaves


def _sharded(node: Node, path: KeyPath) -> dict[KeyPath, ShardedNode]:
    if isinstance(node, ShardedNode):
        return {path: node}
    out: dict[KeyPath, ShardedNode] = {}
    if isinstance(node, MapNode):
        for k, c in zip(node.keys, node.children, strict=True):
            out |= _sharded(c, (*path, k))
    elif isinstance(node, SeqNode):
        for i, c in enumerate(node.children):
            out |= _sharded(c, (*path, i))
    return out


def _replace_sharded(out: Any, path: KeyPath, node: ShardedNode, owner: int, pg: Any) -> None:
    """Swap the list of shards at ``path`` in ``out`` for a ShardedTensor (dict/list parents)."""
    parent: Any = out
    for k in path[:-1]:
        parent = parent[k]
    key: Any = path[-1]
    shards = parent[key]
    if isinstance(parent, dict | list) and isinstance(shards, list):
        parent[key] = dist.foreign_sharded_tensor(shards, node.metadata, owner, pg)
