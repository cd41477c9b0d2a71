"""State-dict skeletons and non-tensor values as plain JSON: no pickle, no import of user code.

A skeleton node is a one-key JSON object naming its kind (``{"dict": [[key, node], ...]}``,
``{"list": [...]}``, ``{"tensor": 3}``, ``{"value": ...}``); dict keys are tagged with their type
(``["s", "lr"]``, ``["i", 3]``) so int keys come back as ints. Namedtuples come back as a
namedtuple class rebuilt from its name and fields; dataclasses come back as plain dicts of their
fields, and dict subclasses other than ``OrderedDict`` as plain dicts (recreating user classes
would mean importing code named by the file).

Containers nest at most ``MAX_DEPTH`` deep (the root is 1), in a skeleton, in a value and in
metadata alike: the encoders refuse deeper input with ``UnsupportedValueError`` naming the key
path, the decoders refuse it as malformed, and none of them recurses past it. Nothing here runs
code of the objects it encodes (``_core.values``).
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
from .._core.values import (
    KEY_IDS,
    MAX_DEPTH,
    map_items,
    seq_items,
    short_key,
    too_deep,
    unsupported_value,
)
from ..errors import CheckpointCorrupt, UnsupportedValueError

__all__ = [
    "MAX_DEPTH",
    "check_depth",
    "decode_skeleton",
    "decode_value",
    "encode_key",
    "encode_skeleton",
    "encode_value",
    "json_copy",
]

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
    shown = f"{key!r:.40} " if id(type(key)) in KEY_IDS else ""  # a built-in repr, nobody's own
    raise UnsupportedValueError(
        f"dict key {shown}of type {type(key).__qualname__} cannot be stored; use str or int keys",
        key=key_str(path),
    )


def encode_value(v: Any, path: KeyPath) -> Json:
    """A non-tensor leaf as JSON; raises ``UnsupportedValueError`` naming ``path`` otherwise
    (lists, tuples and dicts nested past ``MAX_DEPTH`` too). Told by exact type: no method of
    ``v`` runs."""
    kind = type(v)
    if v is None or kind is bool or kind is int or kind is str:
        return v
    if kind is float:
        return v if math.isfinite(v) else {"float": repr(v)}
    if kind is bytes:
        return {"bytes": base64.b64encode(v).decode("ascii")}
    if kind is torch.dtype:
        return {"dtype": dtype_name(v)}
    if kind is torch.Size:
        return {"size": list(v)}
    if kind is list or kind is tuple or kind is dict:
        if len(path) >= MAX_DEPTH:
            raise too_deep(path)
        if kind is dict:
            return {
                "dict": [[encode_key(k, path), encode_value(x, (*path, k))] for k, x in v.items()]
            }
        return {kind.__name__: [encode_value(x, (*path, i)) for i, x in enumerate(v)]}
    if kind is bytearray:  # staged in memory, not stored
        raise UnsupportedValueError("a bytearray cannot be stored; use bytes", key=key_str(path))
    raise unsupported_value(v, path)


def decode_key(j: Json) -> str | int:
    """The inverse of ``encode_key``; raises ``ValueError`` on anything else."""
    if isinstance(j, list) and len(j) == 2:
        tag, key = j
        if (tag == "s" and type(key) is str) or (tag == "i" and type(key) is int):
            return key
    raise ValueError(f"malformed dict key {j!r}")


def decode_value(j: Json, depth: int = 0) -> Any:
    """The inverse of ``encode_value``; raises ``ValueError`` on anything malformed, and on lists
    and dicts nested past ``MAX_DEPTH`` (``depth``: the containers around ``j``)."""
    if j is None or type(j) in (*_SCALARS, float):
        return j
    if not (isinstance(j, dict) and len(j) == 1):
        raise ValueError(f"malformed value {j!r:.80}")
    [(tag, body)] = j.items()
    if tag == "float" and type(body) is str and body in _FLOATS:
        return _FLOATS[body]
    if tag == "bytes" and isinstance(body, str):
        return base64.b64decode(body, validate=True)
    if tag == "dtype":
        return dtype_from_name(body)
    if tag == "size" and isinstance(body, list) and all(_is_int64(n) for n in body):
        return torch.Size(body)
    if tag in ("list", "tuple", "dict") and depth >= MAX_DEPTH:
        raise ValueError(f"values nest deeper than {MAX_DEPTH} levels")
    if tag in ("list", "tuple") and isinstance(body, list):
        items = [decode_value(x, depth + 1) for x in body]
        return items if tag == "list" else tuple(items)
    if tag == "dict" and isinstance(body, list):
        return {decode_key(_pair(p)[0]): decode_value(_pair(p)[1], depth + 1) for p in body}
    raise ValueError(f"malformed value {j!r:.80}")


def _is_int64(n: Json) -> bool:
    """Whether ``n`` is an integer a ``torch.Size`` holds (an int64)."""
    return type(n) is int and -(1 << 63) <= n < 1 << 63


def json_copy(obj: Any, what: str, path: KeyPath = ()) -> Json:
    """A copy of ``obj`` (``what``: ``"metadata"``) that ``json.dumps`` writes without running
    any code of it: dicts (of str, int, float, bool or None keys), lists and tuples, read
    through their base class (``OrderedDict`` and namedtuples too), become plain dicts and lists;
    str, int and float (numpy's float64 too) become exact built-ins. Raises
    ``UnsupportedValueError`` naming the key path of anything else, or of containers nested
    deeper than ``MAX_DEPTH`` (``obj`` itself is 1 deep).
    """
    kind = type(obj)
    if obj is None or kind is bool:
        return obj
    if issubclass(kind, str | int | float):  # their own type's repr: what json.dumps writes
        return _exact_scalar(obj)
    if not issubclass(kind, dict | list | tuple):
        raise UnsupportedValueError(
            f"{what} must be JSON (dicts, lists, str, int, float, bool, None), not a "
            f"{kind.__module__}.{kind.__qualname__}",
            key=key_str((what, *path)),
        )
    if len(path) >= MAX_DEPTH:
        raise too_deep((what, *path))
    if issubclass(kind, dict):
        out = {}
        for k, v in map_items(obj):
            if not (k is None or type(k) is bool or issubclass(type(k), str | int | float)):
                raise UnsupportedValueError(
                    f"{what} keys must be str, int, float, bool or None, not a "
                    f"{type(k).__module__}.{type(k).__qualname__}",
                    key=key_str((what, *path)),
                )
            key = k if k is None or type(k) is bool else _exact_scalar(k)
            out[key] = json_copy(v, what, (*path, key))
        return out
    return [json_copy(v, what, (*path, i)) for i, v in enumerate(seq_items(obj))]


def _exact_scalar(v: Any) -> str | int | float:
    """``v`` as an exact str, int or float, through the base type (no method of a subclass)."""
    if issubclass(type(v), str):
        return str.__str__(v)
    if issubclass(type(v), int):
        return int.__int__(v)
    return float.__float__(v)


def check_depth(j: Json, what: str) -> Json:
    """``j`` (decoded JSON, ``what`` names it) if its lists and objects nest at most
    ``MAX_DEPTH`` deep (``j`` itself is 1 deep); ``ValueError`` otherwise. A loop, no recursion."""
    level: list[tuple[Json, int]] = [(j, 1)]
    while level:
        node, depth = level.pop()
        kids = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for kid in kids:
            if isinstance(kid, dict | list):
                if depth >= MAX_DEPTH:
                    raise ValueError(f"{what} nests deeper than {MAX_DEPTH} levels")
                level.append((kid, depth + 1))
    return j


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
    if not (isinstance(j, dict) and 1 <= len(j) <= 3):
        raise ValueError(f"malformed node at {short_key(path)}")
    if "tensor" in j:
        i = j["tensor"]
        if type(i) is not int or not 0 <= i < len(paths) or paths[i] is not None:
            raise ValueError(f"bad tensor index {i!r} at {short_key(path)}")
        paths[i] = path
        return Leaf(i)
    if "value" in j:
        return Value(decode_value(j["value"], depth))
    if depth >= MAX_DEPTH:
        raise ValueError(f"containers nest deeper than {MAX_DEPTH} levels at {short_key(path)}")
    kind = next((k for k in _CONTAINERS if k in j), "")
    body = j.get(kind)
    if not isinstance(body, list):
        raise ValueError(f"malformed node {kind!r} at {short_key(path)}")
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
        raise ValueError(f"{kind} fields do not match its items at {short_key(path)}")
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
