"""Which non-tensor values and dict keys aiostage copies, and how it reads containers, without
running any code of the objects it reads.

A state dict is someone else's object graph: its values may define ``__deepcopy__``,
``__reduce__``, ``__eq__`` or ``__hash__``, its containers may override ``items`` or
``__iter__``, and any of them may return a substitute. So types are told by ``type(obj)``
(``isinstance`` would ask an object's ``__class__``), containers are read through their base
class (``dict.items``, ``tuple.__iter__``), values are immutable built-ins kept as they are
(``VALUE_TYPES``; a bytearray is copied), keys have built-in hashing (``KEY_TYPES``), and
containers nest at most ``MAX_DEPTH`` deep; anything else is an ``UnsupportedValueError``
naming its key path. Subclasses of dict, list and tuple are read, and rebuilt, through their
base class, so their own methods (and ``__init__``) never run and instance attributes of a
container are not kept.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict, defaultdict
from collections.abc import Hashable, Iterable
from typing import Any

import torch

from ..errors import UnsupportedValueError

__all__ = []

KeyPath = tuple[Hashable, ...]
#: how deep containers may nest (the root is 1): the one limit that staging, ``save``, metadata
#: and every reader enforce alike, so whatever is saved can be read back (``_format.structure``
#: re-exports it for the format; it lives here because ``_core`` cannot import ``_format``)
MAX_DEPTH = 100
#: the non-tensor values staged, stored and sent: immutable built-ins, kept as they are
VALUE_TYPES: frozenset[type] = frozenset(
    {type(None), bool, int, float, str, bytes, torch.dtype, torch.Size}
)
#: the dict keys staged (``save`` stores str and int): built-in hashing and equality only
KEY_TYPES: frozenset[type] = frozenset({str, int, float, bool, type(None), bytes})
#: the ``id`` of each of those types: membership asks no type for its hash (a metaclass's own)
VALUE_IDS = frozenset(map(id, VALUE_TYPES))
KEY_IDS = frozenset(map(id, KEY_TYPES))
_VALUES_HINT = (
    "use None, bool, int, float, str, bytes, torch.dtype, torch.Size, or dicts, lists, tuples, "
    "namedtuples and dataclasses of them"
)


def key_str(path: KeyPath) -> str:
    """Render a key path the way errors name it: ``optim.state.3.exp_avg`` (``<root>`` if empty)."""
    return ".".join(str(k) for k in path) or "<root>"


def short_key(path: KeyPath, keep: int = 3) -> str:
    """``key_str`` of a path that may be long: its first and last ``keep`` parts around a count
    of the parts left out (``a.a.a.<95 more>.a.a.a``), each part cut to 40 characters."""
    parts = [str(k) if len(str(k)) <= 40 else f"{str(k)[:37]}..." for k in path]
    if len(parts) > 2 * keep + 1:
        parts = [*parts[:keep], f"<{len(parts) - 2 * keep} more>", *parts[-keep:]]
    return ".".join(parts) or "<root>"


# ---------------------------------------------------------------- what is staged


def unsupported_value(v: object, path: KeyPath) -> UnsupportedValueError:
    """The error for a non-tensor value aiostage does not copy (its type is not in
    ``VALUE_TYPES`` nor a container); names the type, never the value (no ``repr`` runs)."""
    kind = type(v)
    return UnsupportedValueError(
        f"cannot copy, store or send a {kind.__module__}.{kind.__qualname__} without running its "
        f"own code (pickle, __deepcopy__, __reduce__); {_VALUES_HINT}",
        key=key_str(path),
    )


def too_deep(path: KeyPath) -> UnsupportedValueError:
    """The error for a container nested deeper than ``MAX_DEPTH`` at ``path``."""
    return UnsupportedValueError(
        f"containers nest deeper than {MAX_DEPTH} levels here; aiostage stages, stores and reads "
        f"at most {MAX_DEPTH} (flatten the structure, e.g. with dotted keys)",
        key=short_key(path),
    )


def check_key(key: object, path: KeyPath) -> None:
    """Raise ``UnsupportedValueError`` for a dict key at ``path`` whose type is not in
    ``KEY_TYPES`` (hashing or comparing it would run its own code)."""
    kind = type(key)
    if id(kind) not in KEY_IDS:
        raise UnsupportedValueError(
            f"a dict key of type {kind.__module__}.{kind.__qualname__} cannot be copied, stored or "
            "sent; use str or int keys",
            key=key_str(path),
        )


def plain_keys(keys: Iterable[object]) -> bool:
    """Whether every key's type is one of ``KEY_TYPES`` (a C-level pass over the keys)."""
    return KEY_IDS.issuperset(map(id, map(type, keys)))


def copy_plain(v: Any, path: KeyPath) -> Any:
    """A copy of ``v`` made of ``VALUE_TYPES`` (kept as they are), bytearrays (copied: staging
    keeps them; the format does not store them) and plain (exact) dicts, lists and tuples of
    them, as tensor attributes and decoded values are; ``UnsupportedValueError`` names anything
    else."""
    kind = type(v)
    if id(kind) in VALUE_IDS:
        return v
    if kind is bytearray:
        return bytearray(v)
    if kind is not dict and kind is not list and kind is not tuple:
        raise unsupported_value(v, path)
    if len(path) >= MAX_DEPTH:
        raise too_deep(path)
    if kind is dict:
        out = {}
        for k, x in v.items():
            check_key(k, path)
            out[k] = copy_plain(x, (*path, k))
        return out
    items = [copy_plain(x, (*path, i)) for i, x in enumerate(v)]
    return items if kind is list else tuple(items)


def map_base(kind: type) -> type[dict[Any, Any]]:
    """The class a dict subclass is read through: ``OrderedDict`` (which keeps its own order) or
    ``dict``."""
    return OrderedDict if issubclass(kind, OrderedDict) else dict


def map_items(obj: dict[Any, Any]) -> list[tuple[Any, Any]]:
    """The (key, value) pairs of a dict or dict subclass, read through ``map_base``: a
    subclass's own ``items`` or ``__iter__`` never runs."""
    return list(map_base(type(obj)).items(obj))


def seq_items(obj: Any) -> Iterable[Any]:
    """The items of a list or tuple (or a subclass: a namedtuple), read through the base class."""
    return list.__iter__(obj) if issubclass(type(obj), list) else tuple.__iter__(obj)


def field_items(obj: Any) -> list[tuple[str, Any]]:
    """The (name, value) fields of a dataclass instance, read with ``object.__getattribute__``
    (a class's own ``__getattribute__`` or ``__getattr__`` never runs)."""
    get = object.__getattribute__
    return [(f.name, get(obj, f.name)) for f in dataclasses.fields(type(obj))]


def factory_of(obj: Any) -> Any:
    """The ``default_factory`` of a defaultdict (or subclass), read through ``defaultdict``."""
    member: Any = vars(defaultdict)["default_factory"]  # the C slot, not a subclass's property
    return member.__get__(obj)


def is_container(kind: type) -> bool:
    """Whether values of type ``kind`` are walked into (dict, list, tuple, namedtuple or
    dataclass, and their subclasses), not kept as values."""
    if issubclass(kind, dict | list | tuple):
        return kind is not torch.Size  # a Size is a value, not a sequence of leaves
    return dataclasses.is_dataclass(kind)
