"""Pure flatten / unflatten of nested state dicts, key paths, and storage identity for aliasing.

No I/O and no CUDA calls here: a state dict is walked once into a ``Tree`` (a skeleton of
containers and non-tensor values, plus one ``TensorLeaf`` per tensor), and tensors are grouped by
the storage they share so that aliased bytes are copied, written or sent exactly once.

The walk runs no code of the objects it walks: types are told by ``type(obj)`` (never
``isinstance``, which asks an object's ``__class__``), containers are read and rebuilt through
their base class (``dict.items``, ``tuple.__iter__``, ``list.extend``), and non-tensor values are
immutable built-ins (``VALUE_TYPES``) kept as they are, never deep-copied, pickled or compared
by their own ``__eq__``; anything else is an ``UnsupportedValueError`` naming its key.
"""

from __future__ import annotations

import dataclasses
import sys
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..errors import StagingError
from . import gc_pause
from .values import (
    MAX_DEPTH,
    VALUE_IDS,
    check_key,
    copy_plain,
    factory_of,
    field_items,
    is_container,
    map_items,
    plain_keys,
    seq_items,
    too_deep,
    unsupported_value,
)
from .values import KeyPath as KeyPath
from .values import key_str as key_str

__all__ = []

#: tensors walked between two hand-overs of the GIL to a waiting event loop (about a millisecond)
_BREATHE = 256
Wrap = Literal["tensor", "parameter", "dtensor"]


# ---------------------------------------------------------------- the skeleton


@dataclass(frozen=True, slots=True)
class Leaf:
    """A tensor position in the skeleton: ``index`` into ``Tree.leaves``."""

    index: int


@dataclass(frozen=True, slots=True)
class Value:
    """A non-tensor leaf: one of ``VALUE_TYPES`` (immutable, kept as it is) or a copied
    bytearray when walked; a decoded one may also be a list, tuple or dict of them."""

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
    """Walk ``obj`` once into a ``Tree`` without running any of its objects' own code (see the
    module docstring). Raises ``StagingError`` naming the key of a tensor that cannot be staged
    or of a reference cycle, ``UnsupportedValueError`` (a ``StagingError``) for a value or key
    type that is not copied, or for containers nested deeper than ``MAX_DEPTH``."""
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
    kind = type(obj)
    if kind is torch.Tensor or kind is torch.nn.Parameter or issubclass(kind, torch.Tensor):
        return _walk_tensor(obj, kind, path, w)
    if id(kind) in VALUE_IDS or kind is bytearray:
        return Value(copy_plain(obj, path))
    if not is_container(kind):
        raise unsupported_value(obj, path)
    if len(path) >= MAX_DEPTH:
        raise too_deep(path)
    if id(obj) in w.active:
        raise StagingError("the state dict contains a reference cycle", key=key_str(path))
    w.active.add(id(obj))
    try:
        return _walk_container(obj, kind, path, w)
    finally:
        w.active.discard(id(obj))


def _walk_container(obj: Any, kind: type, path: KeyPath, w: _Walk) -> Node:
    """The node of a container, its children walked (a loop, not a comprehension: two frames
    per level of nesting keep ``MAX_DEPTH`` far from Python's recursion limit)."""
    items: list[tuple[Any, Any]]
    if issubclass(kind, dict):
        items = map_items(obj)
        if not plain_keys([k for k, _ in items]):
            for k, _ in items:
                check_key(k, path)
    elif issubclass(kind, list | tuple):
        items = list(enumerate(seq_items(obj)))
    else:
        items = field_items(obj)
    kids: list[Node] = []
    for k, v in items:
        kids.append(_walk(v, (*path, k), w))
    if issubclass(kind, dict):
        factory = factory_of(obj) if issubclass(kind, defaultdict) else None
        return MapNode(kind, tuple([k for k, _ in items]), tuple(kids), factory)
    if issubclass(kind, list | tuple):
        return SeqNode(kind, tuple(kids), issubclass(kind, tuple) and hasattr(kind, "_fields"))
    return DataclassNode(kind, tuple([k for k, _ in items]), tuple(kids))


def _walk_tensor(t: torch.Tensor, kind: type, path: KeyPath, w: _Walk) -> Node:
    if not len(w.leaves) % _BREATHE:
        gc_pause.hand_over()
    first = w.seen.get(id(t))
    if first is not None:  # the same tensor object again (tied weights): one object staged
        w.leaves.append(dataclasses.replace(w.leaves[first], path=path, same_as=first))
        return Leaf(len(w.leaves) - 1)
    if kind is torch.nn.Parameter or kind is torch.Tensor:  # the common case first, cheaply
        wrap: Wrap = "parameter" if kind is torch.nn.Parameter else "tensor"
    elif _is_sharded_tensor(kind):
        return _walk_sharded(t, path, w)
    elif _is_dtensor(kind):
        local = t._local_tensor  # type: ignore[attr-defined]
        _check_plain_data(local, path)
        spec = t._spec  # type: ignore[attr-defined]
        param = isinstance(t, torch.nn.Parameter)  # Parameter(DTensor): a DTensor, _is_param set
        w.leaves.append(TensorLeaf(path, local, "dtensor", t.requires_grad, spec=spec, param=param))
        w.seen[id(t)] = len(w.leaves) - 1
        return Leaf(len(w.leaves) - 1)
    else:
        raise StagingError(f"unsupported tensor subclass {kind.__qualname__}", key=key_str(path))
    _check_plain_data(t, path)
    attrs: dict[str, Any] = copy_plain(t.__dict__, path) if t.__dict__ else {}
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


def _is_dtensor(kind: type) -> bool:
    cls = _optional_class("torch.distributed.tensor", "DTensor")
    return cls is not None and issubclass(kind, cls)


def _is_sharded_tensor(kind: type) -> bool:
    cls = _optional_class("torch.distributed._shard.sharded_tensor", "ShardedTensor")
    return cls is not None and issubclass(kind, cls)


def _optional_class(module: str, name: str) -> type | None:
    """``module.name`` if ``module`` is already imported (never import torch.distributed)."""
    loaded = sys.modules.get(module)
    return getattr(loaded, name, None) if loaded is not None else None


# ---------------------------------------------------------------- rebuilding


def unflatten(tree: Tree, data: Sequence[torch.Tensor], *, copy_values: bool = True) -> Any:
    """Rebuild the state dict of ``tree`` with ``data[i]`` standing for leaf ``i``.

    Containers are rebuilt through their base class (a subclass's ``__init__``, ``__new__`` or
    ``__setitem__`` never runs). A walked value is immutable; a decoded one may be a list or
    dict, copied again (``copy_values``) so two rebuilt dicts never share a mutable leaf.
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
        out.__dict__.update(copy_plain(leaf.attrs, leaf.path))
    return out


def _build(node: Node, tensors: list[torch.Tensor], copy_values: bool) -> Any:
    if isinstance(node, Leaf):
        return tensors[node.index]
    if isinstance(node, Value):
        return copy_plain(node.value, ()) if copy_values else node.value
    return assemble(node, [_build(c, tensors, copy_values) for c in node.children])


def assemble(node: Node, kids: list[Any]) -> Any:
    """The container ``node`` stands for, holding ``kids``, built through its base class."""
    if isinstance(node, MapNode):
        return _build_map(node, kids)
    if isinstance(node, SeqNode):
        return _build_seq(node.cls, kids)
    if isinstance(node, DataclassNode):
        obj: Any = object.__new__(node.cls)
        for name, kid in zip(node.names, kids, strict=True):
            object.__setattr__(obj, name, kid)
        return obj
    assert isinstance(node, ShardedNode)
    return _build_sharded(node, kids)


def _build_seq(cls: type, kids: list[Any]) -> Any:
    if cls is list:
        return kids  # a fresh list of the caller's
    if cls is tuple:
        return tuple(kids)
    if issubclass(cls, tuple):  # a namedtuple: its own __new__ never runs
        return tuple.__new__(cls, kids)
    out: Any = list.__new__(cls)
    list.extend(out, kids)
    return out


def _build_map(node: MapNode, kids: list[Any]) -> Any:
    cls: Any = node.cls
    pairs = zip(node.keys, kids, strict=True)
    if cls is dict:
        return dict(pairs)
    if cls is OrderedDict:
        return OrderedDict(pairs)
    if issubclass(cls, OrderedDict):  # its order is its own: set each item through OrderedDict
        ordered: Any = OrderedDict.__new__(cls)
        for k, v in pairs:
            OrderedDict.__setitem__(ordered, k, v)
        return ordered
    out: Any = dict.__new__(cls)
    if node.default_factory is not None:
        defaultdict.__init__(out, node.default_factory)
    dict.update(out, pairs)
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
