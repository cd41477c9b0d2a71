"""What a data file or a frame holds, entry by entry and tensor by tensor, and the one decoder
that validates a tensor record whole: every reader (``load``, ``load_metadata``, ``verify``,
``inspect``, ``ls``, ``export``) and every receiver of a peer's frame decodes through it.

A record that passes can be turned into a tensor without torch raising: its dtype is one
``save`` writes, its element count fits in int64, its view lies inside its entry, its tensor
attributes decode to a dict of str keys and its DTensor layout is well formed. Pure Python over
decoded JSON; errors are ``ValueError`` naming what is wrong (the callers add the file or peer).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from .._core.dtypes import STORABLE_DTYPES, dtype_from_name
from .checks import Json, json_int, json_list, json_object
from .structure import decode_value

__all__ = [
    "DIM_MAX",
    "MAX_DIMS",
    "MAX_ELEMENTS",
    "Entry",
    "Record",
    "check_elements",
    "decode_dims",
    "decode_record",
    "decode_records",
]

#: the largest size, stride or offset a header may give (any more cannot address real memory)
DIM_MAX = 1 << 62
#: the most dimensions a tensor may have (torch's own limit is 64 too)
MAX_DIMS = 64
#: the most elements a tensor may have: torch counts them in an int64
MAX_ELEMENTS = (1 << 63) - 1
#: the most devices a stored DTensor's mesh may list
_MAX_MESH = 1 << 24


class Entry(NamedTuple):
    """One safetensors entry: a tensor stored as itself, or an aliased storage as uint8.

    A named tuple, not a dataclass: files hold tens of thousands of entries and records, and a
    frozen dataclass costs four times as much to build.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # byte offsets relative to the start of the data
    end: int


class Record(NamedTuple):
    """One tensor of the state dict: a view (element offset, shape, stride) into an entry."""

    entry: int  # -1: an empty tensor with no bytes
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    wrap: str = "tensor"
    requires_grad: bool = False
    attrs: Json = None  # the tensor's Python attributes, as a ``structure`` value
    dtensor: Json = None  # mesh, placements and global shape of a DTensor

    @property
    def numel(self) -> int:
        """Elements of the tensor."""
        return math.prod(self.shape)


def decode_dims(x: Json, what: str) -> tuple[int, ...]:
    """A shape, stride or offset list: at most ``MAX_DIMS`` integers in ``[0, DIM_MAX]``."""
    dims = json_list(x, what)
    if len(dims) > MAX_DIMS:
        raise ValueError(f"{what} has {len(dims)} dimensions, more than {MAX_DIMS}")
    for n in dims:  # a plain loop: this runs a few times per tensor of a file
        if type(n) is not int or not 0 <= n <= DIM_MAX:
            raise ValueError(f"{what} {n!r:.40} is not an integer in [0, {DIM_MAX}]")
    return tuple(dims)


def check_elements(shape: tuple[int, ...], what: str) -> None:
    """``ValueError`` unless the product of ``shape``'s sizes fits in int64, zeros skipped: torch
    multiplies them in order, so ``[2**62, 2**62, 0]`` overflows before the 0 is reached."""
    total = 1
    for n in shape:
        total *= n or 1
    if total > MAX_ELEMENTS:
        raise ValueError(f"{what} {list(shape)} has more elements than an int64 counts")


#: dtypes by the names records give them; only storable ones get in, a bounded set
_DTYPES: dict[str, torch.dtype] = {}


def _dtype(name: Json) -> torch.dtype:
    found = _DTYPES.get(name) if type(name) is str else None
    if found is None:
        found = dtype_from_name(name)
        if found not in STORABLE_DTYPES:
            raise ValueError(f"dtype {name!r:.40} is not one aiostage stores")
        _DTYPES[name] = found
    return found


def decode_record(r: Json, entries: tuple[Entry, ...]) -> Record:
    """One tensor record of a header, validated whole against the file's ``entries``."""
    r = json_object(r, "tensor record")
    dtype = _dtype(r["dtype"])
    shape, stride = decode_dims(r["shape"], "shape"), decode_dims(r["stride"], "stride")
    entry = json_int(r["entry"], -1, len(entries) - 1, "entry")
    offset = json_int(r["offset"], 0, DIM_MAX, "offset")
    if len(shape) != len(stride):
        raise ValueError(f"shape {shape} and stride {stride} differ in length")
    check_elements(shape, "shape")
    if 0 not in shape:
        e = entries[entry] if entry >= 0 else None
        last = offset
        for n, s in zip(shape, stride, strict=True):
            last += (n - 1) * s
        if e is None or (last + 1) * dtype.itemsize > e.end - e.begin or e.begin % dtype.itemsize:
            raise ValueError(f"a {dtype} tensor of shape {shape} does not fit its entry")
    wrap, grad = r.get("wrap", "tensor"), r.get("grad", False)
    if wrap not in ("tensor", "parameter", "dtensor") or type(grad) is not bool:
        raise ValueError(f"bad wrap {wrap!r:.20} or grad {grad!r:.20}")
    if grad and not (dtype.is_floating_point or dtype.is_complex):
        raise ValueError(f"a {dtype} tensor cannot require grad")
    attrs, spec = r.get("attrs"), r.get("dtensor")
    if attrs is not None:
        check_attrs(attrs)
    if (wrap == "dtensor") != (spec is not None):
        raise ValueError("a DTensor layout belongs to a DTensor record, and only to one")
    if spec is not None:
        _check_dtensor(spec, shape)
    return Record(entry, offset, shape, stride, dtype, wrap, grad, attrs, spec)


def decode_records(
    tensors: list[Json], entries: tuple[Entry, ...], breathe: Callable[[], None]
) -> list[Record]:
    """``decode_record`` of each of ``tensors``, whose JSON is dropped as it is decoded (no
    single call then frees thousands of objects); ``breathe()`` every ``_BREATHE`` records.

    A plain record (the five keys ``save`` writes for a tensor with elements, nothing else) is
    checked inline, with no call per record: the checks ``decode_record`` makes, accepting no
    record it refuses and building the same ``Record``. Anything else goes to
    ``decode_record``. Raises ``ValueError`` naming the index of the record refused.
    """
    sizes = [e.end - e.begin for e in entries]
    begins = [e.begin for e in entries]
    top = len(entries) - 1
    out: list[Record] = []
    for i in range(len(tensors)):
        r, tensors[i] = tensors[i], None
        found = None
        if type(r) is dict and len(r) == 5:
            name, entry, offset = r.get("dtype"), r.get("entry"), r.get("offset")
            shape, stride = r.get("shape"), r.get("stride")
            dtype = _DTYPES.get(name) if type(name) is str else None
            if (
                dtype is not None
                and type(entry) is int
                and 0 <= entry <= top
                and type(offset) is int
                and 0 <= offset <= DIM_MAX
                and type(shape) is list
                and type(stride) is list
                and len(shape) == len(stride) <= MAX_DIMS
            ):
                last, count = offset, 1
                for n, st in zip(shape, stride, strict=True):
                    if type(n) is not int or type(st) is not int:
                        break
                    if not (0 < n <= DIM_MAX and 0 <= st <= DIM_MAX):
                        break  # a zero size (no bytes) is decode_record's to check
                    last += (n - 1) * st
                    count *= n
                else:
                    size = dtype.itemsize
                    if (
                        count <= MAX_ELEMENTS
                        and (last + 1) * size <= sizes[entry]
                        and not begins[entry] % size
                    ):
                        found = Record(entry, offset, tuple(shape), tuple(stride), dtype)
        if found is None:
            try:
                found = decode_record(r, entries)
            except (ValueError, TypeError, KeyError) as exc:
                raise ValueError(f"tensor record {i}: {exc}") from exc
        out.append(found)
        if not i % _BREATHE:
            breathe()
    return out


#: records decoded between two hand-overs of the GIL (well under a millisecond)
_BREATHE = 256


def check_attrs(attrs: Json) -> dict[str, object]:
    """A record's tensor attributes, decoded: a dict of str keys (``ValueError`` otherwise)."""
    try:
        out = decode_value(attrs)
    except (ValueError, TypeError, KeyError) as exc:  # a hostile value trips on anything
        raise ValueError(f"malformed tensor attributes: {exc}") from exc
    if not isinstance(out, dict) or not all(type(k) is str for k in out):
        raise ValueError("tensor attributes must be a dict with str keys")
    return out


def _check_dtensor(d: Json, local: tuple[int, ...]) -> None:
    """A stored DTensor layout: global shape, placements, a rectangular mesh of ranks and where
    the local shard of shape ``local`` sits (all that resharding and export read)."""
    d = json_object(d, "DTensor layout")
    shape = decode_dims(d["shape"], "DTensor shape")
    check_elements(shape, "DTensor shape")
    if len(shape) != len(local):
        raise ValueError(f"DTensor shape {list(shape)} and local shape {list(local)} differ")
    placements = json_list(d["placements"], "DTensor placements")
    if not 1 <= len(placements) <= MAX_DIMS:
        raise ValueError(f"a DTensor mesh of {len(placements)} dimensions")
    for p in placements:
        ok = p == ["replicate"] or (
            isinstance(p, list) and len(p) == 2 and p[0] in ("shard", "partial")
        )
        ok = ok and (p[0] != "shard" or (type(p[1]) is int and 0 <= p[1] < len(shape)))
        ok = ok and (p[0] != "partial" or type(p[1]) is str)
        if not ok:
            raise ValueError(f"bad DTensor placement {p!r:.60}")
    _check_mesh(d["mesh"], len(placements))
    offset = d.get("offset")
    if offset is not None:
        at = decode_dims(offset, "DTensor offset")
        if len(at) != len(shape) or any(
            o + n > g for o, n, g in zip(at, local, shape, strict=True)
        ):
            raise ValueError(f"a {list(local)} shard at {list(at)} is outside {list(shape)}")
    if type(d.get("param", False)) is not bool:
        raise ValueError("DTensor param must be true or false")


def _check_mesh(mesh: Json, ndim: int) -> None:
    """A mesh: ``ndim`` nested lists (one per placement), rectangular, of distinct ranks."""
    level, sizes = [mesh], []
    for _ in range(ndim):
        n = len(json_list(level[0], "DTensor mesh"))
        if not all(isinstance(x, list) and len(x) == n for x in level):
            raise ValueError("the DTensor mesh is not rectangular")
        sizes.append(n)
        if math.prod(sizes) > _MAX_MESH:
            raise ValueError(f"the DTensor mesh has more than {_MAX_MESH} ranks")
        level = [y for x in level for y in x]
    if not all(type(x) is int and 0 <= x < _MAX_MESH for x in level):
        raise ValueError("the DTensor mesh must hold ranks (integers)")
    if len(set(level)) != len(level) or not level:
        raise ValueError("the DTensor mesh must list distinct ranks")
