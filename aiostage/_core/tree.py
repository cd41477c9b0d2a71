"""Pure flatten / unflatten of nested state dicts, key paths, and storage identity for aliasing.

No I/O and no CUDA calls here: a state dict is walked once into a ``Tree`` (a skeleton of
containers and non-tensor values, plus one ``TensorLeaf`` per tensor), and tensors are grouped by
the storage they share so that aliased bytes are copied, written or sent exactly once.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..errors import StagingError

__all__ = []

KeyPath = tuple[Hashable, ...]
Wrap = Literal["tensor", "parameter", "dtensor"]


def key_str(path: KeyPath) -> str:
    """Render a key path the way errors name it: ``optim.state.3.exp_avg`` (``<root>`` if empty)."""
    return ".".join(str(k) for k in path) or "<root>"


# ---------------------------------------------------------------- the skeleton


@dataclass(frozen=True, slots=True)
class Leaf:
    """A tensor position in the skeleton: ``index`` into ``Tree.leaves``."""

    index: int


@dataclass(frozen=True, slots=True)
class Value:
    """A non-tensor leaf, already deep-copied away from the caller's object."""

    value: Any


@dataclass(frozen=True, slots=True)
class MapNode:
    """A dict (or subclass: OrderedDict, defaultdict) with its keys in order."""

    cls: type
    keys: tuple[Hashable, ...]
    children: tuple[Node, ...]
    default_factory: Callable[[], Any] | None = None


@dataclass(frozen=True, slots=True)
class SeqNode:
    """A list, tuple or namedtuple (``named`` says to rebuild with positional fields)."""

    cls: type
    children: tuple[Node, ...]
    named: bool = False


@dataclass(frozen=True, slots=True)
class DataclassNode:
    """A dataclass instance, frozen or not; rebuilt without calling ``__init__``."""

    cls: type
    names: tuple[str, ...]
    children: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class ShardedNode:
    """A ``ShardedTensor``: its local shards are leaves, its global metadata is kept as is."""

    metadata: Any
    shard_metadata: tuple[Any, ...]
    children: tuple[Node, ...]
    process_group: Any


Node = Leaf | Value | MapNode | SeqNode | DataclassNode | ShardedNode


@dataclass(frozen=True, slots=True)
class TensorLeaf:
    """One tensor of the state dict: the plain local data plus how to wrap it back."""

    path: KeyPath
    data: torch.Tensor
    wrap: Wrap = "tensor"
    requires_grad: bool = False
    attrs: dict[str, Any] = field(default_factory=dict)
    spec: Any = None  # DTensor placement spec (mesh + placements + global meta)
    param: bool = False  # a DTensor that is an nn.Parameter (FSDP2's parameters)
    same_as: int | None = None  # the index of an earlier leaf that is this very tensor object

    @property
    def key(self) -> str:
        """The key path as a dotted string."""
        return key_str(self.path)


#: the ``data`` of a ``TensorLeaf`` described but not read yet (its bytes come later)
NO_DATA = torch.empty(0)


@dataclass(frozen=True, slots=True)
class Tree:
    """A flattened state dict: the skeleton and its tensors in walk order."""

    root: Node
    leaves: tuple[TensorLeaf, ...]


def flatten(obj: Any) -> Tree:
    """Walk ``obj`` once into a ``Tree``; raise ``StagingError`` naming the key of a bad leaf."""
    w = _Walk([])
    root = _walk(obj, (), w)
    return Tree(root, tuple(w.leaves))


@dataclass(slots=True)
class _Walk:
    """One flatten's state: its leaves, the containers on the current path (a cycle check) and
    the tensor objects seen so far (a tensor met again, like tied weights, is one object)."""

    leaves: list[TensorLeaf]
    active: set[int] = field(default_factory=set)
    seen: dict[int, int] = field(default_factory=dict)


def _walk(obj: Any, path: KeyPath, w: _Walk) -> Node:
    if isinstance(obj, torch.Tensor):
        return _walk_tensor(obj, path, w)
    if _is_container(obj):
        if id(obj) in w.active:
            raise StagingError("the state dict contains a reference cycle", key=key_str(path))
        w.active.add(id(obj))
        try:
            return _walk_container(obj, path, w)
        finally:
            w.active.discard(id(obj))
    try:
        return Value(copy.deepcopy(obj))
    except Exception as exc:
        raise StagingError(
            f"cannot copy a leaf of type {type(obj).__qualname__}: {exc}", key=key_str(path)
        ) from exc


def _is_container(obj: Any) -> bool:
    if isinstance(obj, dict | list | tuple):
        return not isinstance(obj, torch.Size)  # a Size is a value, not a sequence of leaves
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def _walk_container(obj: Any, path: KeyPath, w: _Walk) -> Node:
    def kids(items: Sequence[tuple[Hashable, Any]]) -> tuple[Node, ...]:
        return tuple(_walk(v, (*path, k), w) for k, v in items)

    if isinstance(obj, dict):
        factory = obj.default_factory if isinstance(obj, defaultdict) else None
        return MapNode(type(obj), tuple(obj), kids(list(obj.items())), factory)
    if isinstance(obj, list | tuple):
        named = isinstance(obj, tuple) and hasattr(type(obj), "_fields")
        return SeqNode(type(obj), kids(list(enumerate(obj))), named)
    names = tuple(f.name for f in dataclasses.fields(obj))
    return DataclassNode(type(obj), names, kids([(n, getattr(obj, n)) for n in names]))


def _walk_tensor(t: torch.Tensor, path: KeyPath, w: _Walk) -> Node:
    first = w.seen.get(id(t))
    if first is not None:  # the same tensor object again (tied weights): one object staged
        w.leaves.append(dataclasses.replace(w.leaves[first], path=path, same_as=first))
        return Leaf(len(w.leaves) - 1)
    kind = type(t)
    if kind is torch.nn.Parameter or kind is torch.Tensor:  # the common case first, cheaply
        wrap: Wrap = "parameter" if kind is torch.nn.Parameter else "tensor"
    elif _is_sharded_tensor(t):
        return _walk_sharded(t, path, w)
    elif _is_dtensor(t):
        local = t._local_tensor  # type: ignore[attr-defined]
        _check_plain_data(local, path)
        spec = t._spec  # type: ignore[attr-defined]
        param = isinstance(t, torch.nn.Parameter)
        w.leaves.append(TensorLeaf(path, local, "dtensor", t.requires_grad, spec=spec, param=param))
        w.seen[id(t)] = len(w.leaves) - 1
        return Leaf(len(w.leaves) - 1)
    else:
        raise StagingError(f"unsupported tensor subclass {kind.__qualname__}", key=key_str(path))
    _check_plain_data(t, path)
    attrs: dict[str, Any] = {}
    if t.__dict__:
        try:
            attrs = copy.deepcopy(dict(t.__dict__))
        except Exception as exc:
            raise StagingError(
                f"cannot copy the tensor's Python attributes: {exc}", key=key_str(path)
            ) from exc
    w.leaves.append(TensorLeaf(path, t.detach(), wrap, t.requires_grad, attrs))
    w.seen[id(t)] = len(w.leaves) - 1
    return Leaf(len(w.leaves) - 1)


def _walk_sharded(t: Any, path: KeyPath, w: _Walk) -> Node:
    shards = t.local_shards()
    children = []
    for i, shard in enumerate(shards):
        _check_plain_data(shard.tensor, (*path, i))
        w.leaves.append(
            TensorLeaf((*path, i), shard.tensor.detach(), "tensor", shard.tensor.requires_grad)
        )
        children.append(Leaf(len(w.leaves) - 1))
    metas = tuple(s.metadata for s in shards)
    return ShardedNode(t.metadata(), metas, tuple(children), t._process_group)


def _check_plain_data(t: torch.Tensor, path: KeyPath) -> None:
    if t.layout == torch.strided and not (t.is_meta or t.is_quantized or t.is_nested):
        return
    key = key_str(path)
    if t.is_meta:
        raise StagingError("a meta tensor has no data to stage; materialise it first", key=key)
    if t.layout != torch.strided:
        raise StagingError(
            f"tensor layout {t.layout} is not supported; use a dense tensor", key=key
        )
    raise StagingError("quantized and nested tensors are not supported", key=key)


def _is_dtensor(t: torch.Tensor) -> bool:
    cls = _optional_class("torch.distributed.tensor", "DTensor")
    return cls is not None and isinstance(t, cls)


def _is_sharded_tensor(t: torch.Tensor) -> bool:
    cls = _optional_class("torch.distributed._shard.sharded_tensor", "ShardedTensor")
    return cls is not None and isinstance(t, cls)


def _optional_class(module: str, name: str) -> type | None:
    """``module.name`` if ``module`` is already imported (never import torch.distributed)."""
    loaded = sys.modules.get(module)
    return getattr(loaded, name, None) if loaded is not None else None


# ---------------------------------------------------------------- rebuilding


def unflatten(tree: Tree, data: Sequence[torch.Tensor], *, copy_values: bool = True) -> Any:
    """Rebuild the state dict of ``tree`` with ``data[i]`` standing for leaf ``i``.

    Non-tensor values are deep-copied again (``copy_values``) so two rebuilt dicts never share a
    mutable leaf.
    """
    tensors: list[torch.Tensor] = []
    for leaf, d in zip(tree.leaves, data, strict=True):
        j = leaf.same_as  # tied weights: the object made for the first occurrence
        tensors.append(wrap_leaf(leaf, d) if j is None else tensors[j])
    return _build(tree.root, tensors, copy_values)


def wrap_leaf(leaf: TensorLeaf, data: torch.Tensor) -> torch.Tensor:
    """Give ``data`` the wrapper, ``requires_grad`` and Python attributes the original had."""
    out: torch.Tensor
    if leaf.wrap == "dtensor":
        from torch.distributed.tensor import DTensor

        out = DTensor(data, leaf.spec, requires_grad=leaf.requires_grad)  # type: ignore[no-untyped-call]
        return torch.nn.Parameter(out, requires_grad=leaf.requires_grad) if leaf.param else out
    if leaf.wrap == "parameter":
        out = torch.nn.Parameter(data, requires_grad=leaf.requires_grad)
    else:
        out = data.requires_grad_(True) if leaf.requires_grad else data
    if leaf.attrs:
        out.__dict__.update(copy.deepcopy(leaf.attrs))
    return out


def _build(node: Node, tensors: list[torch.Tensor], copy_values: bool) -> Any:
    if isinstance(node, Leaf):
        return tensors[node.index]
    if isinstance(node, Value):
        return copy.deepcopy(node.value) if copy_values else node.value
    kids = [_build(c, tensors, copy_values) for c in node.children]
    if isinstance(node, MapNode):
        return _build_map(node, kids)
    if isinstance(node, SeqNode):
        return node.cls(*kids) if node.named else node.cls(kids)
    if isinstance(node, DataclassNode):
        obj: Any = object.__new__(node.cls)
        for name, kid in zip(node.names, kids, strict=True):
            object.__setattr__(obj, name, kid)
        return obj
    return _build_sharded(node, kids)


def _build_map(node: MapNode, kids: list[Any]) -> Any:
    out = node.cls(node.default_factory) if node.default_factory is not None else node.cls()
    for k, v in zip(node.keys, kids, strict=True):
        out[k] = v
    return out


def _build_sharded(node: ShardedNode, kids: list[Any]) -> Any:
    from torch.distributed._shard.sharded_tensor import (  # type: ignore[attr-defined]
        Shard,
        ShardedTensor,
    )

    shards = [Shard(t, m) for t, m in zip(kids, node.shard_metadata, strict=True)]
    return ShardedTensor._init_from_local_shards_and_global_metadata(
        shards, node.metadata, process_group=node.process_group
    )
