"""State-dict skeletons and non-tensor values as plain JSON: no pickle, no import of user code.

A skeleton node is a one-key JSON object naming its kind (``{"dict": [[key, node], ...]}``,
``{"list": [...]}``, ``{"tensor": 3}``, ``{"value": ...}``); dict keys are tagged with their type
(``["s", "lr"]``, ``["i", 3]``) so int keys come back as ints. Namedtuples come back as a
namedtuple class rebuilt from its name and fields; dataclasses come back as plain dicts of their
fields, and dict subclasses other than ``OrderedDict`` as plain dicts (recreating user classes
would mean importing code named by the file).
"""

from __future__ import annotations

import base64
import collections
import functools
import math
from typing import Any

import torch

from .._core.dtypes import dtype_from_name, dtype_name
from .._core.tree import DataclassNode, KeyPath, Leaf, MapNode, Node, SeqNode, Value, key_str
from ..errors import CheckpointCorrupt, UnsupportedValueError

__all__ = ["decode_skeleton", "decode_value", "encode_key", "encode_skeleton", "encode_value"]

Json = Any
_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_SCALARS = (bool, int, str)
_CONTAINERS = ("dict", "odict", "list", "tuple", "namedtuple", "dataclass")


def encode_key(key: object, path: KeyPath) -> Json:
    """A dict key as ``["s", key]`` or ``["i", key]``; other key types cannot be stored."""
    if type(key) is str:
        return ["s", key]
    if type(key) is int:
        return ["i", key]
    raise UnsupportedValueError(
        f"dict key {key!r} of type {type(key).__qualname__} cannot be stored; use str or int keys",
        key=key_str(path),
    )


def encode_value(v: object, path: KeyPath) -> Json:
    """A non-tensor leaf as JSON; raises ``UnsupportedValueError`` naming ``path`` otherwise."""
    if v is None or type(v) in _SCALARS:
        return v
    if type(v) is float:
        return v if math.isfinite(v) else {"float": repr(v)}
    if type(v) is bytes:
        return {"bytes": base64.b64encode(v).decode("ascii")}
    if isinstance(v, torch.dtype):
        return {"dtype": dtype_name(v)}
    if type(v) is torch.Size:
        return {"size": list(v)}
    if type(v) is list or type(v) is tuple:
        return {type(v).__name__: [encode_value(x, (*path, i)) for i, x in enumerate(v)]}
    if type(v) is dict:
        return {"dict": [[encode_key(k, path), encode_value(x, (*path, k))] for k, x in v.items()]}
    raise UnsupportedValueError(
        f"a {type(v).__module__}.{type(v).__qualname__} cannot be stored without pickle; store "
        "None, bool, int, float, str, bytes, torch.dtype, torch.Size or lists/tuples/dicts of them",
        key=key_str(path),
    )


def decode_key(j: Json) -> str | int:
    """The inverse of ``encode_key``; raises ``ValueError`` on anything else."""
    if isinstance(j, list) and len(j) == 2:
        tag, key = j
        if (tag == "s" and type(key) is str) or (tag == "i" and type(key) is int):
            return key
    raise ValueError(f"malformed dict key {j!r}")


def decode_value(j: Json) -> Any:
    """The inverse of ``encode_value``; raises ``ValueError`` on anything malformed."""
    if j is None or type(j) in (*_SCALARS, float):
        return j
    if not (isinstance(j, dict) and len(j) == 1):
        raise ValueError(f"malformed value {j!r:.80}")
    [(tag, body)] = j.items()
    if tag == "float" and body in _FLOATS:
        return _FLOATS[body]
    if tag == "bytes" and isinstance(body, str):
        return base64.b64decode(body, validate=True)
    if tag == "dtype":
        return dtype_from_name(body)
    if tag == "size" and isinstance(body, list) and all(type(n) is int for n in body):
        return torch.Size(body)
    if tag in ("list", "tuple") and isinstance(body, list):
        items = [decode_value(x) for x in body]
        return items if tag == "list" else tuple(items)
    if tag == "dict" and isinstance(body, list):
        return {decode_key(_pair(p)[0]): decode_value(_pair(p)[1]) for p in body}
    raise ValueError(f"malformed value {j!r:.80}")


def _pair(p: Json) -> tuple[Json, Json]:
    if not (isinstance(p, list) and len(p) == 2):
        raise ValueError(f"expected a [key, value] pair, got {p!r:.80}")
    return p[0], p[1]


# ---------------------------------------------------------------- skeletons


def encode_skeleton(node: Node, path: KeyPath = ()) -> Json:
    """The skeleton of a ``_core.tree.Tree`` as JSON; ``UnsupportedValueError`` names a key."""
    if isinstance(node, Leaf):
        return {"tensor": node.index}
    if isinstance(node, Value):
        return {"value": encode_value(node.value, path)}
    if isinstance(node, MapNode):
        kind = "odict" if issubclass(node.cls, collections.OrderedDict) else "dict"
        pairs = zip(node.keys, node.children, strict=True)
        return {kind: [[encode_key(k, path), encode_skeleton(c, (*path, k))] for k, c in pairs]}
    if isinstance(node, SeqNode):
        kids = [encode_skeleton(c, (*path, i)) for i, c in enumerate(node.children)]
        if node.named:
            return {"namedtuple": kids, "name": node.cls.__name__, "fields": list(node.cls._fields)}  # type: ignore[attr-defined]
        return {"tuple" if issubclass(node.cls, tuple) else "list": kids}
    if isinstance(node, DataclassNode):
        kids = [
            encode_skeleton(c, (*path, n)) for n, c in zip(node.names, node.children, strict=True)
        ]
        return {"dataclass": kids, "name": node.cls.__qualname__, "fields": list(node.names)}
    raise UnsupportedValueError(
        "a ShardedTensor cannot be stored by aiostage; convert it to a DTensor", key=key_str(path)
    )


def decode_skeleton(j: Json, n_tensors: int, where: str) -> tuple[Node, list[KeyPath]]:
    """Rebuild a skeleton; return it and the key path of each tensor index.

    Every index in ``range(n_tensors)`` must appear exactly once. Raises ``CheckpointCorrupt``
    (``where`` names the file) on anything malformed.
    """
    paths: list[KeyPath | None] = [None] * n_tensors
    try:
        root = _decode_node(j, (), paths, 0)
    except (ValueError, TypeError, KeyError, RecursionError) as exc:
        raise CheckpointCorrupt(f"{where}: malformed state-dict structure: {exc}") from exc
    if any(p is None for p in paths):
        raise CheckpointCorrupt(f"{where}: the structure does not place every tensor")
    return root, [p for p in paths if p is not None]


def _decode_node(j: Json, path: KeyPath, paths: list[KeyPath | None], depth: int) -> Node:
    if depth > 200 or not (isinstance(j, dict) and 1 <= len(j) <= 3):
        raise ValueError(f"malformed node at {key_str(path)}")
    if "tensor" in j:
        i = j["tensor"]
        if type(i) is not int or not 0 <= i < len(paths) or paths[i] is not None:
            raise ValueError(f"bad tensor index {i!r} at {key_str(path)}")
        paths[i] = path
        return Leaf(i)
    if "value" in j:
        return Value(decode_value(j["value"]))
    kind = next((k for k in _CONTAINERS if k in j), "")
    body = j.get(kind)
    if not isinstance(body, list):
        raise ValueError(f"malformed node {kind!r} at {key_str(path)}")
    if kind in ("dict", "odict"):
        return _decode_map(kind, body, path, paths, depth)
    return _decode_seq(kind, j, body, path, paths, depth)


def _decode_map(
    kind: str, body: list[Json], path: KeyPath, paths: list[KeyPath | None], depth: int
) -> Node:
    keys = tuple(decode_key(_pair(p)[0]) for p in body)
    kids = tuple(
        _decode_node(p[1], (*path, k), paths, depth + 1) for p, k in zip(body, keys, strict=True)
    )
    return MapNode(collections.OrderedDict if kind == "odict" else dict, keys, kids)


def _decode_seq(
    kind: str, j: Json, body: list[Json], path: KeyPath, paths: list[KeyPath | None], depth: int
) -> Node:
    names = j.get("fields", range(len(body)))
    if len(names) != len(body):
        raise ValueError(f"{kind} fields do not match its items at {key_str(path)}")
    positions: Any = names if kind == "dataclass" else range(len(body))  # as flatten names them
    kids = tuple(
        _decode_node(c, (*path, k), paths, depth + 1) for k, c in zip(positions, body, strict=True)
    )
    if kind == "namedtuple":
        return SeqNode(_namedtuple(j.get("name"), tuple(names)), kids, named=True)
    if kind == "dataclass":
        return MapNode(dict, tuple(_field_names(names)), kids)
    return SeqNode(list if kind == "list" else tuple, kids)


def _field_names(names: Json) -> list[str]:
    if not all(isinstance(n, str) for n in names):
        raise ValueError(f"field names must be strings, got {names!r:.80}")
    return list(names)


@functools.lru_cache(maxsize=256)
def _namedtuple(name: Json, fields: tuple[Any, ...]) -> type:
    """A namedtuple class with this name and fields (``ValueError`` on bad identifiers)."""
    if not isinstance(name, str):
        raise ValueError(f"namedtuple name must be a string, got {name!r:.80}")
    return collections.namedtuple(name, _field_names(fields))
