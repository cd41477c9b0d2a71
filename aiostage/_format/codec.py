"""The on-disk layout: encode, decode and validate data-file headers (the manifest and the
names of files are ``manifest.py``'s, re-exported here).

Pure bytes in and bytes out (see ``docs/format.md``). A data file is a safetensors file whose
JSON header is padded so the data starts on a ``DATA_ALIGN`` boundary; ``__metadata__["aiostage"]``
holds the structure, aliasing and checksums that safetensors has no place for. Every length and
offset is checked against the real file size before anything is allocated.
"""

from __future__ import annotations

import json
import marshal
import math
import operator
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .._core import gc_pause
from .._core.dtypes import ST_ITEMSIZE, dtype_name
from ..errors import CheckpointCorrupt
from . import sliced
from .checks import Json, json_int, json_list, json_object

# the manifest and the names of files, re-exported: this module is where the format is imported
from .manifest import (
    FORMAT_VERSION,
    MANIFEST,
    STEP_NAME,
    FileInfo,
    Manifest,
    check_metadata,
    decode_manifest,
    encode_manifest,
    rank_file,
    step_name,
)

# one record decoder for every reader and receiver; its types are part of the format too
from .records import DIM_MAX, MAX_DIMS, Entry, Record, check_elements, decode_dims, decode_records

__all__ = [
    "DATA_ALIGN",
    "MANIFEST",
    "MAX_DATA",
    "MAX_HEADER",
    "STEP_NAME",
    "EncodedHeader",
    "Entry",
    "FileInfo",
    "Header",
    "LayoutMemo",
    "Manifest",
    "Record",
    "Source",
    "as_int64",
    "as_uint64",
    "check_metadata",
    "decode_header",
    "decode_layout",
    "decode_manifest",
    "encode_header",
    "encode_layout",
    "encode_manifest",
    "header_length",
    "rank_file",
    "round_up",
    "step_name",
]

#: the bytes of one entry (uint8, on the CPU) and how many zero bytes pad it; the writer also
#: takes any contiguous CPU tensor, whose bytes it reads by address
Source = tuple[torch.Tensor, int]
#: the data of every file starts at a multiple of this (so O_DIRECT can write and read it)
DATA_ALIGN = 4096


#: the longest JSON header a data file or a frame may announce (the safetensors limit)
MAX_HEADER = 100_000_000


#: the largest data region a received frame or shared-memory region may announce (checked
#: before anything is allocated)
MAX_DATA = 1 << 42


def round_up(n: int, align: int) -> int:
    """``n`` rounded up to a multiple of ``align``."""
    return -(-n // align) * align


def as_int64(digest: int) -> int:
    """A 64-bit digest (xxh3_64) as the int64 with the same bits, for an int64 tensor."""
    return digest - (1 << 64) if digest >= 1 << 63 else digest


def as_uint64(value: int) -> int:
    """The inverse of ``as_int64``: an int64 read back from a tensor as the 64-bit digest."""
    return value & ((1 << 64) - 1)


# ---------------------------------------------------------------- what a file holds


@dataclass(frozen=True, slots=True)
class Header:
    """Everything in a data file's header; ``checksums`` are xxh3_64 per entry."""

    entries: tuple[Entry, ...]
    records: tuple[Record, ...]
    skeleton: Json
    checksums: tuple[int, ...]
    rank: int = 0
    world_size: int = 1
    #: bytes of tensor data after the header, found once (headers list thousands of entries)
    data_bytes: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_bytes", max((e.end for e in self.entries), default=0))


# ---------------------------------------------------------------- header bytes


def encode_header(h: Header) -> bytes:
    """The header bytes: length, JSON, and spaces up to the next ``DATA_ALIGN`` boundary.

    Its length depends only on the layout, never on the checksum values, so a writer can reserve
    the space, write the data, and write the header last (``encode_layout``).
    """
    return encode_layout(h).with_checksums(h.checksums)


@dataclass(frozen=True, slots=True)
class EncodedHeader:
    """A header encoded once, its checksums still to fill in: 16 hex digits each at fixed places.

    ``blob`` holds zeros where the digits go; ``at`` is where the first digit is.
    """

    blob: bytes
    at: int
    count: int

    def with_checksums(self, checksums: Sequence[int]) -> bytes:
        """The header bytes with ``checksums`` (one per entry) in place."""
        if len(checksums) != self.count:
            raise ValueError(f"{len(checksums)} checksums for {self.count} entries")
        if not checksums:
            return self.blob
        digits = _SUM_SEP.join(f"{c:016x}" for c in checksums).encode("ascii")
        return self.blob[: self.at] + digits + self.blob[self.at + len(digits) :]


#: between two checksums' digits inside the aiostage metadata string: ``","`` escaped
_SUM_SEP = '\\",\\"'
_META_PREFIX = '{"__metadata__":{"format":"pt","aiostage":"'
_SUMS_OPEN = '\\"xxh3\\":['  # "xxh3":[ escaped


def encode_layout(h: Header, memo: LayoutMemo | None = None) -> EncodedHeader:
    """``encode_header`` of ``h`` with its checksums left to fill in: one pass of string
    formatting over the entries and records (tens of thousands in a large state dict).

    ``memo``: where the texts of the last few layouts are kept; a part of ``h`` (its entries,
    its records, its skeleton) equal to one encoded before is not encoded again.
    """
    memo = LayoutMemo(0) if memo is None else memo
    listing, entries = memo.entries(h.entries)
    head = sliced.compact({"version": FORMAT_VERSION, "rank": h.rank, "world_size": h.world_size})
    parts = (head, listing, entries, memo.records(h.records), memo.tree(h.skeleton))
    return memo.whole(parts, lambda: _assemble(*parts, len(h.entries)))


def _assemble(
    head: str, listing: str, entries: str, records: str, tree: str, count: int
) -> EncodedHeader:
    """The header bytes around the encoded parts: ``listing`` is the escaped
    ``"entries":[names],"xxh3":[zero sums],"tensors":[``, ``records`` and ``tree`` escaped too."""
    escaped = [
        sliced.escape(f"{head[:-1]},")[1:-1],
        listing,
        records,
        sliced.escape('],"tree":')[1:-1],
        tree,
        sliced.escape("}")[1:-1],
    ]
    body = f'{_META_PREFIX}{"".join(escaped)}"}}{entries}}}'.encode("ascii")
    n = round_up(8 + len(body), DATA_ALIGN) - 8
    # the digits of the first checksum sit after the escaped quote (2 characters) that opens it;
    # only zero sums follow the last "xxh3":[ of the listing (names come before it)
    at = 8 + len(_META_PREFIX) + len(escaped[0]) + listing.rfind(_SUMS_OPEN) + len(_SUMS_OPEN) + 2
    return EncodedHeader(struct.pack("<Q", n) + body.ljust(n, b" "), at, count)


class LayoutMemo:
    """The texts of the last ``size`` entries, records and skeletons encoded, each kept with
    what it encodes: a save of a state dict laid out as before (the warm path) compares instead
    of encoding, milliseconds where encoding takes tens. Thread-safe.

    A part is reused only when its JSON text is surely the same: entries and records compare
    field by field (their ints, strings and dtypes compare exactly), except the JSON values of
    records (attributes, DTensor layouts) and the skeleton, which compare as ``marshal`` bytes,
    where ``True``, ``1`` and ``1.0`` (equal to Python, not in JSON) differ.
    """

    def __init__(self, size: int = 2) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._kept: dict[str, list[tuple[object, tuple[str, str]]]] = {}
        self._whole: tuple[tuple[str, ...], EncodedHeader] | None = None

    def entries(self, entries: tuple[Entry, ...]) -> tuple[str, str]:
        """The escaped ``"entries":[names],"xxh3":[zero sums],"tensors":[`` of the aiostage
        metadata, and the safetensors text of the entries."""
        return self._text("entries", entries, lambda: _entries_text(entries))

    def records(self, records: tuple[Record, ...]) -> str:
        """The records as the escaped text of a JSON list's members."""
        extras = [(r.attrs, r.dtensor) for r in records if r.attrs or r.dtensor is not None]
        key = (records, marshal.dumps(extras) if extras else b"")
        return self._text("records", key, lambda: (_records_text(records), ""))[0]

    def tree(self, skeleton: Json) -> str:
        """The skeleton as escaped JSON text."""
        try:
            key: object = _marshalled(skeleton)
        except ValueError:  # not plain JSON values: never reused
            key = object()
        return self._text("tree", key, lambda: (sliced.escape(sliced.dumps(skeleton))[1:-1], ""))[0]

    def whole(self, parts: tuple[str, ...], build: Callable[[], EncodedHeader]) -> EncodedHeader:
        """The header last built from the very same ``parts`` (texts this memo returned), or
        ``build()``: a warm save copies no megabytes of text."""
        with self._lock:
            last = self._whole
        if (
            last is not None
            and parts[0] == last[0][0]
            and all(map(operator.is_, parts[1:], last[0][1:]))
        ):
            return last[1]
        built = build()
        if self._size:
            with self._lock:
                self._whole = (parts, built)
        return built

    def _text(
        self, part: str, key: object, encode: Callable[[], tuple[str, str]]
    ) -> tuple[str, str]:
        with self._lock:
            kept = self._kept.get(part, [])
            for k, (old, text) in enumerate(kept):
                if _same(old, key):
                    kept.insert(0, kept.pop(k))  # the most recent first
                    return text
        text = encode()
        if self._size:
            with self._lock:
                kept = self._kept.setdefault(part, [])
                kept.insert(0, (key, text))
                doomed = kept[self._size :]
                del kept[self._size :]
            doomed.clear()  # outside the lock: thousands of records take a while to free
        return text


#: members compared (or values marshalled) by one C call, a fraction of a millisecond
_PIECE = 2048


def _same(a: object, b: object) -> bool:
    """``a == b`` for keys of the memo, of the same types too; a long tuple or list (tens of
    thousands of records) compared a slice at a time, the GIL handed over between slices."""
    if type(a) is not type(b):
        return False
    if not isinstance(a, tuple | list) or not isinstance(b, tuple | list):
        return a == b
    if len(a) != len(b):
        return False
    if len(a) <= 8:  # a small wrapper: records and the marshal of their extras
        return all(map(_same, a, b))
    for at in range(0, len(a), _PIECE):
        if a[at : at + _PIECE] != b[at : at + _PIECE]:
            return False
        if len(a) > _PIECE:
            gc_pause.hand_over()
    return True


def _marshalled(value: Json) -> list[tuple[str, object]]:
    """``value`` as a list of ``marshal`` pieces that equal lists only for equal values of the
    same types (``1``, ``True`` and ``1.0`` differ): a container of more than ``sliced.NODES``
    items is marked with its kind and length and its members marshalled a run at a time, the
    GIL handed over between runs. ``ValueError`` for what marshal cannot write."""
    out: list[tuple[str, object]] = []
    _marshal_into(value, out)
    return out


def _marshal_into(value: Json, out: list[tuple[str, object]]) -> None:
    if sliced.weight(value) <= sliced.NODES:
        out.append(("=", marshal.dumps(value)))
        return
    is_dict = type(value) is dict
    out.append(("{" if is_dict else "[", len(value)))
    run: list[Json] = []
    size = 0
    for m in value.items() if is_dict else value:
        w = sliced.weight(m[1] if is_dict else m)
        if run and size + w > sliced.NODES:
            out.append(("=", marshal.dumps(run)))
            run, size = [], 0
            gc_pause.hand_over()
        if w <= sliced.NODES:
            run.append(m)
            size += w
            continue
        if is_dict:
            out.append((":", marshal.dumps(m[0])))
        _marshal_into(m[1] if is_dict else m, out)
    if run:
        out.append(("=", marshal.dumps(run)))


def _entries_text(entries: tuple[Entry, ...]) -> tuple[str, str]:
    names = sliced.compact([e.name for e in entries])
    sums = ",".join(['"0000000000000000"'] * len(entries))
    listing = sliced.escape(f'"entries":{names},"xxh3":[{sums}],"tensors":[')[1:-1]
    text = "".join(
        [_ENTRY % (_quoted(e.name), e.dtype, _ints(e.shape), e.begin, e.end) for e in entries]
    )
    return listing, text


def _records_text(records: tuple[Record, ...]) -> str:
    return sliced.escape(",".join([_record_json(r) for r in records]))[1:-1]


#: JSON text of a string (quoted, escaped, ASCII only: what ``json.dumps`` writes)
_quoted = json.encoder.encode_basestring_ascii
_ENTRY = ',%s:{"dtype":"%s","shape":[%s],"data_offsets":[%d,%d]}'
_RECORD = '{"entry":%d,"offset":%d,"shape":[%s],"stride":[%s],"dtype":"%s"}'


def _ints(values: tuple[int, ...]) -> str:
    return ",".join(map(str, values))


def _encode_record(r: Record) -> Json:
    out: dict[str, Json] = {
        "entry": r.entry,
        "offset": r.offset,
        "shape": list(r.shape),
        "stride": list(r.stride),
        "dtype": dtype_name(r.dtype),
    }
    if r.wrap != "tensor":
        out["wrap"] = r.wrap
    if r.requires_grad:
        out["grad"] = True
    if r.attrs:
        out["attrs"] = r.attrs
    if r.dtensor is not None:
        out["dtensor"] = r.dtensor
    return out


def _record_json(r: Record) -> str:
    if r.wrap == "tensor" and not r.requires_grad and not r.attrs and r.dtensor is None:
        name = _DTYPE_TEXT.get(r.dtype) or _DTYPE_TEXT.setdefault(r.dtype, dtype_name(r.dtype))
        return _RECORD % (r.entry, r.offset, _ints(r.shape), _ints(r.stride), name)
    return sliced.compact(_encode_record(r))


#: ``dtype_name`` of each dtype met so far (a handful)
_DTYPE_TEXT: dict[torch.dtype, str] = {}


def header_length(first: bytes, file_size: int, where: str) -> int:
    """The JSON length a data file starts with; ``CheckpointCorrupt`` unless it fits the file."""
    if len(first) < 8:
        raise CheckpointCorrupt(f"{where}: {file_size} bytes is too short for a header", path=where)
    (n,) = struct.unpack("<Q", first[:8])
    if not 2 <= n <= min(MAX_HEADER, file_size - 8):  # never echo foreign bytes as a number
        raise CheckpointCorrupt(
            f"{where}: the header length its first 8 bytes give does not fit the file "
            f"({file_size} bytes) or {MAX_HEADER} bytes; it is not an aiostage data file",
            path=where,
        )
    if (8 + n) % DATA_ALIGN:
        raise CheckpointCorrupt(
            f"{where}: the data does not start on a {DATA_ALIGN}-byte boundary (header length "
            f"{n}); aiostage pads its headers, so this file was not written by aiostage",
            path=where,
        )
    return int(n)


def decode_header(body: bytes, data_len: int, where: str) -> Header:
    """Parse and validate the JSON of a header against ``data_len`` bytes of data.

    Raises ``CheckpointCorrupt`` naming ``where`` for anything malformed or out of range.
    """
    try:
        return _decode_header(body, data_len)
    except (ValueError, TypeError, KeyError, RecursionError) as exc:
        raise CheckpointCorrupt(f"{where}: bad header: {exc}", path=where) from exc


def decode_layout(body: bytes, data_len: int, where: str) -> Header:
    """The entries and checksums of a header whose records may not decode (no records, no
    tree): enough to know how its data is laid out. Raises ``CheckpointCorrupt``."""
    try:
        return _decode_header(body, data_len, records=False)
    except (ValueError, TypeError, KeyError, RecursionError) as exc:
        raise CheckpointCorrupt(f"{where}: bad header: {exc}", path=where) from exc


def _decode_header(body: bytes, data_len: int, *, records: bool = True) -> Header:
    """The header in ``body``, parsed a slice at a time (``sliced``); each entry's and record's
    JSON is dropped as it is decoded, so no single call frees thousands of objects."""
    top = json_object(sliced.loads(body), "header")
    meta = json_object(top.get("__metadata__"), "__metadata__")
    if not isinstance(meta.get("aiostage"), str):
        raise ValueError("no aiostage metadata: this is not an aiostage data file")
    m = json_object(sliced.loads(meta.pop("aiostage")), "aiostage metadata")
    if m.get("version") != FORMAT_VERSION:
        raise ValueError(f"format version {m.get('version')!r} is not {FORMAT_VERSION}")
    entries = _decode_entries(json_list(m["entries"], "entries"), top, data_len)
    _check_coverage(entries, data_len)
    sums = _checksums(json_list(m["xxh3"], "xxh3"), len(entries))
    if not records:
        return Header(entries, (), None, sums)
    decoded = decode_records(json_list(m["tensors"], "tensors"), entries, gc_pause.hand_over)
    world = json_int(m["world_size"], 1, 1 << 24, "world_size")
    rank = json_int(m["rank"], 0, world - 1, "rank")
    return Header(entries, tuple(decoded), m["tree"], sums, rank, world)


def _checksums(sums: list[Json], n: int) -> tuple[int, ...]:
    if len(sums) != n or not all(type(c) is str and len(c) == 16 for c in sums):
        raise ValueError("there must be one 16-digit xxh3 per entry")
    return tuple([int(c, 16) for c in sums])


def _decode_entries(names: list[Json], top: dict[str, Json], data_len: int) -> tuple[Entry, ...]:
    """The entries ``names`` lists, from their safetensors JSON in ``top``: one with elements
    checked inline (no call per entry; the checks of ``_decode_entry``, which takes the rest
    and raises for what is wrong)."""
    out = []
    for name in names:
        info = top.get(name) if type(name) is str else None
        if type(info) is dict:
            dtype: Json = info.get("dtype")
            shape, offsets = info.get("shape"), info.get("data_offsets")
            size = ST_ITEMSIZE.get(dtype) if type(dtype) is str else None
            if (
                size
                and type(shape) is list
                and len(shape) <= MAX_DIMS
                and type(offsets) is list
                and len(offsets) == 2
            ):
                begin, end = offsets
                if type(begin) is int and type(end) is int and 0 <= begin <= end <= data_len:
                    count = 1
                    for n in shape:
                        if type(n) is not int or not 0 < n <= DIM_MAX:
                            break  # a zero size is _decode_entry's to check
                        count *= n
                    else:
                        if end - begin == count * size:
                            out.append(Entry(name, dtype, tuple(shape), begin, end))
                            if not len(out) % 256:
                                gc_pause.hand_over()
                            continue
        out.append(_decode_entry(name, info, data_len))
        if not len(out) % 256:
            gc_pause.hand_over()
    return tuple(out)


def _decode_entry(name: Json, info: Json, data_len: int) -> Entry:
    if not isinstance(name, str):
        raise ValueError(f"entry name {name!r:.40} is not a string")
    info = json_object(info, f"entry {name!r}")
    dtype = info["dtype"]
    if dtype not in ST_ITEMSIZE:
        raise ValueError(f"entry {name!r}: unknown dtype {dtype!r:.20}")
    shape = decode_dims(info["shape"], f"entry {name!r} shape")
    check_elements(shape, f"entry {name!r} shape")
    offsets = json_list(info["data_offsets"], f"entry {name!r} data_offsets")
    if len(offsets) != 2:
        raise ValueError(f"entry {name!r}: data_offsets must be [begin, end]")
    begin, end = (json_int(o, 0, data_len, f"entry {name!r} offset") for o in offsets)
    if end - begin != math.prod(shape) * ST_ITEMSIZE[dtype]:
        raise ValueError(f"entry {name!r}: offsets [{begin}, {end}) do not fit its shape {shape}")
    return Entry(name, dtype, shape, begin, end)


def _check_coverage(entries: tuple[Entry, ...], data_len: int) -> None:
    at = 0
    for e in entries:  # aiostage writes entries in file order: no sort needed then
        if e.begin != at:
            break
        at = e.end
    else:
        if at == data_len:
            return
    at = 0
    for e in sorted(entries, key=lambda e: (e.begin, e.end)):
        if e.begin != at:
            raise ValueError(f"entry {e.name!r} starts at {e.begin}, expected {at}")
        at = e.end
    if at != data_len:
        raise ValueError(
            f"the entries cover {at} bytes but the file holds {data_len} bytes of data"
        )
