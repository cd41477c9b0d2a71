"""Skeletons kept across stages: walk a later state dict of a known structure, and rebuild it.

``tree.flatten`` checks and describes every leaf, which costs microseconds per tensor. A state
dict staged again usually has the same structure; ``regather`` walks it along the skeleton the
first flatten left, taking the tensors of each container of tensors in one C-level call and
the other values (immutable: kept as they are), and ``rebuild`` puts a staged copy back together
the same way. Like ``flatten`` it runs no code of the objects it walks (``values``): containers
are read through their base class, and keys are compared only once their types are known to be
built-in. The caller checks the tensors themselves (``storages.stamp``). Plain sync code: run it
in a worker.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from operator import is_
from typing import Any

from .breath import breathe
from .tree import (
    DataclassNode,
    Leaf,
    MapNode,
    Node,
    SeqNode,
    ShardedNode,
    Tree,
    Value,
    assemble,
)
from .values import VALUE_IDS, factory_of, map_base, seq_items

__all__ = []


@dataclass(frozen=True, slots=True)
class Skeleton:
    """A flattened state dict's skeleton, kept to walk later state dicts of the same structure
    cheaply: ``runs`` maps the id of each container of tensors only to its first leaf's index,
    so their tensors are taken (and put back) in one C-level call, not one Python call each;
    ``key_types`` maps the id of each dict node to the types of its keys."""

    root: Node
    runs: dict[int, int]
    key_types: dict[int, tuple[type, ...]]


def skeleton(tree: Tree) -> Skeleton | None:
    """The ``Skeleton`` of ``tree``; ``None`` if it holds a ShardedTensor (planned every time)."""
    sk = Skeleton(tree.root, {}, {})
    return sk if _index_runs(tree.root, sk) else None


def _index_runs(node: Node, sk: Skeleton) -> bool:
    if isinstance(node, ShardedNode):
        return False
    if isinstance(node, Leaf | Value):
        return True
    if isinstance(node, MapNode):
        sk.key_types[id(node)] = tuple(map(type, node.keys))
    breathe()
    runs = sk.runs
    kids = node.children
    first = kids[0].index if kids and isinstance(kids[0], Leaf) else -1
    if first >= 0 and all(isinstance(c, Leaf) and c.index == first + i for i, c in enumerate(kids)):
        runs[id(node)] = first
    return all(_index_runs(c, sk) for c in kids)


class _Changed(Exception):
    """The state dict walked no longer has the skeleton's structure."""


def regather(sk: Skeleton, obj: Any) -> tuple[list[Any], list[Any]] | None:
    """Walk ``obj`` along ``sk``: the objects at its tensor leaves (in leaf order, whatever they
    are now) and its other values (in walk order), or ``None`` if a container's type, keys or
    length changed or a value is no longer one of ``VALUE_TYPES`` (``flatten`` then says why).

    The caller checks the tensor leaves (``storages.stamp``); ``rebuild`` reverses this.
    """
    tensors: list[Any] = []
    values: list[Any] = []
    try:
        _regather(sk.root, obj, sk, tensors, values)
    except _Changed:
        return None
    return tensors, values


def _regather(node: Node, obj: Any, sk: Skeleton, tensors: list[Any], out: list[Any]) -> None:
    if isinstance(node, Leaf):
        tensors.append(obj)
        return
    if isinstance(node, Value):
        kind = type(obj)
        if id(kind) in VALUE_IDS:
            out.append(obj)  # immutable: kept as it is
        elif kind is bytearray:
            out.append(bytearray(obj))
        else:  # flatten names a bad value, or walks a new structure
            raise _Changed
        return
    breathe()  # a worker's walk of thousands of containers lets the loop in every ~0.3 ms
    items = _items(node, obj, sk)
    if id(node) in sk.runs:
        tensors.extend(items)
        return
    for child, item in zip(node.children, items, strict=True):
        _regather(child, item, sk, tensors, out)


def _items(node: Node, obj: Any, sk: Skeleton) -> Any:
    """The children of container ``obj`` if it still matches ``node``; raises ``_Changed``."""
    cls = type(obj)
    if cls is not getattr(node, "cls", None):
        raise _Changed
    if isinstance(node, MapNode):
        if cls is dict:  # the common case: nothing of a subclass to avoid
            keys, values = tuple(obj), obj.values()
        else:
            base = map_base(cls)
            keys, values = tuple(base.keys(obj)), base.values(obj)
            if issubclass(cls, defaultdict) and factory_of(obj) is not node.default_factory:
                raise _Changed
        kinds = sk.key_types[id(node)]  # types first, by identity: no key's own __eq__ runs
        if len(keys) != len(kinds) or not all(map(is_, map(type, keys), kinds)):
            raise _Changed
        if keys != node.keys:
            raise _Changed
        return values
    if isinstance(node, SeqNode):
        items = obj if cls is list or cls is tuple else tuple(seq_items(obj))
        if len(items) != len(node.children):
            raise _Changed
        return items
    assert isinstance(node, DataclassNode)
    get = object.__getattribute__
    return [get(obj, n) for n in node.names]


def rebuild(sk: Skeleton, tensors: list[Any], values: list[Any]) -> Any:
    """The state dict of ``sk`` with ``tensors[i]`` at leaf ``i`` and ``values`` (as ``regather``
    returned them, used as they are) at the other leaves."""
    return _rebuild(sk.root, tensors, iter(values), sk.runs)


def _rebuild(node: Node, tensors: list[Any], values: Iterator[Any], runs: dict[int, int]) -> Any:
    if isinstance(node, Leaf):
        return tensors[node.index]
    if isinstance(node, Value):
        return next(values)
    breathe()
    first = runs.get(id(node))
    if first is not None:
        kids = tensors[first : first + len(node.children)]
    else:
        kids = [_rebuild(c, tensors, values, runs) for c in node.children]
    return assemble(node, kids)
