"""Whether the checkpoint format can store a state dict: a quick walk before anything is staged.

``aiostage.save`` finds an unstorable value while it lays out the file; a ``Checkpointer`` stages
first and writes later, so it asks here up front, and refuses the save while the caller still
sees it, with the error ``aiostage.save`` raises: the staging walk's checks (``_core.values``:
value and key types, depth) then the format's (``structure``), in the same order. Only keys and
non-tensor values are looked at (about 1.4 ms for 4,000 tensors), and no code of the objects
walked runs; staging itself reports bad tensors and reference cycles.
"""

from __future__ import annotations

from typing import Any

import torch

from .._core.tree import KeyPath
from .._core.values import (
    MAX_DEPTH,
    VALUE_IDS,
    check_key,
    copy_plain,
    field_items,
    is_container,
    map_items,
    seq_items,
    too_deep,
)
from .structure import encode_key, encode_value

__all__ = ["check_storable"]


def check_storable(obj: Any) -> None:
    """Raise ``UnsupportedValueError`` naming the first dict key, non-tensor value or tensor
    attribute of ``obj`` the format cannot store, or containers nested deeper than
    ``MAX_DEPTH`` (a worker thread: it walks the whole dict)."""
    _walk(obj, (), set())


def _walk(obj: Any, path: KeyPath, active: set[int]) -> None:
    kind = type(obj)
    if id(kind) in VALUE_IDS:
        return
    if issubclass(kind, torch.Tensor):
        if (kind is torch.Tensor or kind is torch.nn.Parameter) and obj.__dict__:
            encode_value(copy_plain(obj.__dict__, path), path)  # attributes set on the tensor
        return
    if not is_container(kind):
        encode_value(copy_plain(obj, path), path)  # flatten's error, or the format's (bytearray)
        return
    if len(path) >= MAX_DEPTH:
        raise too_deep(path)
    if id(obj) in active:  # a reference cycle: staging names it
        return
    active.add(id(obj))
    mapping = issubclass(kind, dict)
    items = map_items(obj) if mapping else _sequence_or_fields(obj, kind)
    for key, value in items:
        if mapping:
            check_key(key, path)
            encode_key(key, path)
        _walk(value, (*path, key), active)
    active.discard(id(obj))


def _sequence_or_fields(obj: Any, kind: type) -> list[tuple[Any, Any]]:
    if issubclass(kind, list | tuple):
        return list(enumerate(seq_items(obj)))
    return field_items(obj)
