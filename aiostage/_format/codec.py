"""The on-disk layout: encode, decode and validate data-file headers and the manifest.

Pure bytes in and bytes out (see ``docs/format.md``). A data file is a safetensors file whose
JSON header is padded so the data starts on a ``DATA_ALIGN`` boundary; ``__metadata__["aiostage"]``
holds the structure, aliasing and checksums that safetensors has no place for. Every length and
offset is checked against the real file size before anything is allocated.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from typing import Any

import torch

from .._core.dtypes import ST_ITEMSIZE, dtype_from_name, dtype_name
from ..errors import CheckpointCorrupt, UnsupportedValueError

__all__ = [
    "DATA_ALIGN",
    "MANIFEST",
    "MAX_DATA",
    "MAX_HEADER",
    "Entry",
    "FileInfo",
    "Header",
    "Manifest",
    "Record",
    "Source",
    "as_int64",
    "as_uint64",
    "check_metadata",
    "decode_header",
    "decode_manifest",
    "encode_header",
    "encode_manifest",
    "header_length",
    "rank_file",
    "round_up",
]

Json = Any
#: the bytes of one entry (uint8, on the CPU) and how many zero bytes pad it
Source = tuple[torch.Tensor, int]
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: the data of every file starts at a multiple of this (so O_DIRECT can write and read it)
DATA_ALIGN = 4096


#: the longest JSON header a data file or a frame may announce (the safetensors limit)
MAX_HEADER = 100_000_000


#: the largest data region a received frame or shared-memory region may announce (checked
#: before anything is allocated)
MAX_DATA = 1 << 42


#: the checkpoint names a ``Checkpointer`` gives its steps: ``step_`` and at least nine digits
STEP_NAME = re.compile(r"^step_(?P<step>\d{9,})$")


def step_name(step: int) -> str:
    """The checkpoint name of ``step`` (``step_000000100``): names sort in step order."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step_{step:09d}"


def rank_file(rank: int) -> str:
    """The data file name of ``rank`` inside a checkpoint directory."""
    return f"rank_{rank:05d}.safetensors"


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
class Entry:
    """One safetensors entry: a tensor stored as itself, or an aliased storage as uint8."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # byte offsets relative to the start of the data
    end: int


@dataclass(frozen=True, slots=True)
class Record:
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


@dataclass(frozen=True, slots=True)
class Header:
    """Everything in a data file's header; ``checksums`` are xxh3_64 per entry."""

    entries: tuple[Entry, ...]
    records: tuple[Record, ...]
    skeleton: Json
    checksums: tuple[int, ...]
    rank: int = 0
    world_size: int = 1

    @property
    def data_bytes(self) -> int:
        """Bytes of tensor data after the header."""
        return max((e.end for e in self.entries), default=0)


# ---------------------------------------------------------------- header bytes


def _dumps(obj: Json) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


def encode_header(h: Header) -> bytes:
    """The header bytes: length, JSON, and spaces up to the next ``DATA_ALIGN`` boundary.

    Its length depends only on the layout, never on the checksum values, so a writer can reserve
    the space, write the data, and write the header last.
    """
    meta = {
        "version": FORMAT_VERSION,
        "rank": h.rank,
        "world_size": h.world_size,
        "entries": [e.name for e in h.entries],
        "xxh3": [f"{c:016x}" for c in h.checksums],
        "tensors": [_encode_record(r) for r in h.records],
        "tree": h.skeleton,
    }
    top: dict[str, Json] = {"__metadata__": {"format": "pt", "aiostage": _dumps(meta)}}
    for e in h.entries:
        top[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
    body = _dumps(top).encode("ascii")
    n = round_up(8 + len(body), DATA_ALIGN) - 8
    return struct.pack("<Q", n) + body.ljust(n, b" ")


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


def header_length(first: bytes, file_size: int, where: str) -> int:
    """The JSON length a data file starts with; ``CheckpointCorrupt`` unless it fits the file."""
    if len(first) < 8:
        raise CheckpointCorrupt(f"{where}: {file_size} bytes is too short for a header", path=where)
    (n,) = struct.unpack("<Q", first[:8])
    if not 2 <= n <= min(MAX_HEADER, file_size - 8):
        raise CheckpointCorrupt(
            f"{where}: header length {n} does not fit the file ({file_size} bytes)", path=where
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


def _decode_header(body: bytes, data_len: int) -> Header:
    top = _obj(json.loads(body), "header")
    meta = _obj(top.get("__metadata__"), "__metadata__")
    if not isinstance(meta.get("aiostage"), str):
        raise ValueError("no aiostage metadata: this is not an aiostage data file")
    m = _obj(json.loads(meta["aiostage"]), "aiostage metadata")
    if m.get("version") != FORMAT_VERSION:
        raise ValueError(f"format version {m.get('version')!r} is not {FORMAT_VERSION}")
    names = _list(m["entries"], "entries")
    entries = tuple(_decode_entry(n, top.get(n), data_len) for n in names)
    _check_coverage(entries, data_len)
    sums = _list(m["xxh3"], "xxh3")
    if len(sums) != len(entries) or not all(isinstance(c, str) and len(c) == 16 for c in sums):
        raise ValueError("there must be one 16-digit xxh3 per entry")
    records = tuple(_decode_record(r, entries) for r in _list(m["tensors"], "tensors"))
    world = _int(m["world_size"], 1, 1 << 24, "world_size")
    rank = _int(m["rank"], 0, world - 1, "rank")
    return Header(entries, records, m["tree"], tuple(int(c, 16) for c in sums), rank, world)


def _obj(x: Json, what: str) -> dict[str, Json]:
    if not isinstance(x, dict):
        raise ValueError(f"{what} is not a JSON object")
    return x


def _list(x: Json, what: str) -> list[Json]:
    if not isinstance(x, list):
        raise ValueError(f"{what} is not a JSON list")
    return x


def _int(x: Json, lo: int, hi: int, what: str) -> int:
    if type(x) is not int or not lo <= x <= hi:
        raise ValueError(f"{what} {x!r:.40} is not an integer in [{lo}, {hi}]")
    return x


def _dims(x: Json, what: str) -> tuple[int, ...]:
    dims = _list(x, what)
    if len(dims) > 64:
        raise ValueError(f"{what} has {len(dims)} dimensions")
    return tuple(_int(n, 0, 1 << 62, what) for n in dims)


def _decode_entry(name: Json, info: Json, data_len: int) -> Entry:
    if not isinstance(name, str):
        raise ValueError(f"entry name {name!r:.40} is not a string")
    info = _obj(info, f"entry {name!r}")
    dtype = info["dtype"]
    if dtype not in ST_ITEMSIZE:
        raise ValueError(f"entry {name!r}: unknown dtype {dtype!r:.20}")
    shape = _dims(info["shape"], f"entry {name!r} shape")
    begin, end = (_int(o, 0, data_len, f"entry {name!r} offset") for o in info["data_offsets"])
    if end - begin != math.prod(shape) * ST_ITEMSIZE[dtype]:
        raise ValueError(f"entry {name!r}: offsets [{begin}, {end}) do not fit its shape {shape}")
    return Entry(name, dtype, shape, begin, end)


def _check_coverage(entries: tuple[Entry, ...], data_len: int) -> None:
    at = 0
    for e in sorted(entries, key=lambda e: (e.begin, e.end)):
        if e.begin != at:
            raise ValueError(f"entry {e.name!r} starts at {e.begin}, expected {at}")
        at = e.end
    if at != data_len:
        raise ValueError(
            f"the entries cover {at} bytes but the file holds {data_len} bytes of data"
        )


def _decode_record(r: Json, entries: tuple[Entry, ...]) -> Record:
    r = _obj(r, "tensor record")
    dtype = dtype_from_name(r["dtype"])
    shape, stride = _dims(r["shape"], "shape"), _dims(r["stride"], "stride")
    entry = _int(r["entry"], -1, len(entries) - 1, "entry")
    offset = _int(r["offset"], 0, 1 << 62, "offset")
    if len(shape) != len(stride):
        raise ValueError(f"shape {shape} and stride {stride} differ in length")
    if math.prod(shape) > 0:
        e = entries[entry] if entry >= 0 else None
        last = offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
        if e is None or (last + 1) * dtype.itemsize > e.end - e.begin or e.begin % dtype.itemsize:
            raise ValueError(f"a {dtype} tensor of shape {shape} does not fit its entry")
    wrap, grad = r.get("wrap", "tensor"), r.get("grad", False)
    if wrap not in ("tensor", "parameter", "dtensor") or type(grad) is not bool:
        raise ValueError(f"bad wrap {wrap!r:.20} or grad {grad!r:.20}")
    if grad and not (dtype.is_floating_point or dtype.is_complex):
        raise ValueError(f"a {dtype} tensor cannot require grad")
    return Record(entry, offset, shape, stride, dtype, wrap, grad, r.get("attrs"), r.get("dtensor"))


# ---------------------------------------------------------------- the manifest


@dataclass(frozen=True, slots=True)
class FileInfo:
    """A data file as the manifest records it: name, exact size, xxh3_64 of its header."""

    name: str
    size: int
    header_xxh3: int


@dataclass(frozen=True, slots=True)
class Manifest:
    """``manifest.json``: written last, its presence is what makes a directory a checkpoint."""

    world_size: int
    files: tuple[FileInfo, ...]
    metadata: dict[str, Any]


def check_metadata(metadata: Any) -> dict[str, Any]:
    """User metadata as stored (JSON: tuples become lists); ``UnsupportedValueError`` otherwise."""
    if metadata is None:
        return {}
    try:
        if not isinstance(metadata, dict):
            raise TypeError(f"expected a dict, got {type(metadata).__qualname__}")
        out: dict[str, Any] = json.loads(json.dumps(metadata))
    except (TypeError, ValueError) as exc:
        raise UnsupportedValueError(
            f"metadata must be JSON-serialisable: {exc}", key="metadata"
        ) from exc
    return out


def encode_manifest(m: Manifest) -> bytes:
    """``manifest.json`` as bytes."""
    files = [
        {"name": f.name, "size": f.size, "header_xxh3": f"{f.header_xxh3:016x}"} for f in m.files
    ]
    doc = {"format": "aiostage", "version": FORMAT_VERSION, "world_size": m.world_size}
    return json.dumps({**doc, "files": files, "metadata": m.metadata}, indent=1).encode() + b"\n"


def decode_manifest(raw: bytes, where: str) -> Manifest:
    """Parse and validate ``manifest.json``; raises ``CheckpointCorrupt`` naming ``where``."""
    try:
        doc = _obj(json.loads(raw), "manifest")
        if doc.get("format") != "aiostage" or doc.get("version") != FORMAT_VERSION:
            raise ValueError(f"not an aiostage v{FORMAT_VERSION} manifest")
        world = _int(doc["world_size"], 1, 1 << 24, "world_size")
        files = tuple(_decode_file(f, r) for r, f in enumerate(_list(doc["files"], "files")))
        if len(files) != world:
            raise ValueError(f"{len(files)} files listed for world size {world}")
        return Manifest(world, files, _obj(doc["metadata"], "metadata"))
    except (ValueError, TypeError, KeyError, RecursionError) as exc:
        raise CheckpointCorrupt(f"{where}: bad manifest: {exc}", path=where) from exc


def _decode_file(f: Json, rank: int) -> FileInfo:
    f = _obj(f, "file")
    if f.get("name") != rank_file(rank):
        raise ValueError(f"file {rank} must be named {rank_file(rank)}")
    digest = f["header_xxh3"]
    if not isinstance(digest, str) or len(digest) != 16:
        raise ValueError(f"bad header_xxh3 {digest!r:.40}")
    return FileInfo(f["name"], _int(f["size"], 0, 1 << 62, "size"), int(digest, 16))
