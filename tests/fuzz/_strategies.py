"""Hypothesis strategies for checkpoints built from scratch: headers and manifests as JSON.

A drawn checkpoint is one data file and a manifest. The header's entries tile real data bytes
and its checksums are real most of the time, so draws get past the framing and the checksums
into the decoder; records, the skeleton and the manifest's fields range over well-formed and
hostile values alike (``_odd``'s tables). Headers are framed as the format says (length, JSON,
spaces up to ``DATA_ALIGN``), through the codec's own ``encode_header`` where the fields are
typed values it can encode, and checked with the codec's ``header_length``.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import _odd
import torch
import xxhash
from _seal import MANIFEST, Ckpt
from hypothesis import strategies as st

from aiostage._core.dtypes import ST_ITEMSIZE
from aiostage._format.codec import DATA_ALIGN, Entry, Header, Record, encode_header, header_length

Json = Any

ints = st.one_of(
    st.integers(0, 8),
    st.sampled_from(_odd.EXTREME_INTS),
    st.integers(-(2**65), 2**65),
)
dims = st.one_of(
    st.lists(st.one_of(st.integers(0, 4), st.sampled_from(_odd.EXTREME_INTS)), max_size=4),
    st.sampled_from(([2**32, 2**32], [2**62, 2**62, 0], [2**40], [1] * 65)),
    st.sampled_from(_odd.WRONG_TYPES),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    ints,
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.sampled_from(_odd.CODE_NAMES),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)
#: structure values: tagged, well-formed or hostile
values = st.recursive(
    st.one_of(
        scalars,
        st.sampled_from(_odd.ODD_VALUES),
        st.builds(lambda d: {"dtype": d}, st.sampled_from((*_odd.PLAIN_DTYPES, *_odd.ODD_DTYPES))),
        st.builds(lambda s: {"size": s}, dims),
    ),
    lambda inner: st.one_of(
        st.builds(lambda xs: {"list": xs}, st.lists(inner, max_size=3)),
        st.builds(lambda xs: {"tuple": xs}, st.lists(inner, max_size=3)),
        st.builds(
            lambda kv: {"dict": [[["s", k], v] for k, v in kv.items()]},
            st.dictionaries(st.sampled_from((*_odd.ATTR_NAMES[:12], "a", "b")), inner, max_size=3),
        ),
    ),
    max_leaves=8,
)


def _records(n_entries: int) -> st.SearchStrategy[dict[str, Json]]:
    entry = st.one_of(st.integers(-1, max(n_entries - 1, -1)), ints)
    return st.fixed_dictionaries(
        {
            "entry": entry,
            "offset": st.one_of(st.integers(0, 4), ints),
            "shape": dims,
            "stride": dims,
            "dtype": st.sampled_from((*_odd.PLAIN_DTYPES, *_odd.ODD_DTYPES)),
        },
        optional={
            "wrap": st.sampled_from(("tensor", "parameter", "dtensor", "os.system", None)),
            "grad": st.sampled_from((True, False, 1, None)),
            "attrs": values,
            "dtensor": st.builds(_odd.dtensor_record, st.lists(st.integers(0, 4), max_size=3)),
        },
    )


def trees(n_tensors: int) -> st.SearchStrategy[Json]:
    """Skeletons: mostly well-formed nodes over tensor indices near ``range(n_tensors)``."""
    key = st.one_of(
        st.builds(lambda s: ["s", s], st.text(max_size=4)),
        st.builds(lambda i: ["i", i], ints),
        st.sampled_from((["f", 1.5], [], ["s"], None, "k")),
    )
    leaf = st.one_of(
        st.builds(lambda i: {"tensor": i}, st.one_of(st.integers(0, max(n_tensors, 1)), ints)),
        st.builds(lambda v: {"value": v}, values),
    )
    name = st.one_of(st.sampled_from(("Point", *_odd.CODE_NAMES)), st.text(max_size=6))
    return st.recursive(
        leaf,
        lambda inner: st.one_of(
            st.builds(
                lambda kv: {"dict": kv}, st.lists(st.tuples(key, inner).map(list), max_size=3)
            ),
            st.builds(lambda xs: {"list": xs}, st.lists(inner, max_size=3)),
            st.builds(lambda xs: {"tuple": xs}, st.lists(inner, max_size=3)),
            st.builds(
                lambda xs, n, f: {"namedtuple": xs, "name": n, "fields": f},
                st.lists(inner, max_size=2),
                name,
                st.lists(
                    st.one_of(st.sampled_from(("x", "y", "_x", "def", "1x")), ints), max_size=2
                ),
            ),
        ),
        max_leaves=10,
    )


@st.composite
def data_files(draw: st.DrawFn) -> bytes:
    """A data file: entries tiling real bytes, records and a skeleton drawn around them."""
    shapes = draw(st.lists(st.tuples(st.sampled_from(sorted(ST_ITEMSIZE)), st.lists(st.integers(0, 3), max_size=2)), max_size=3))  # fmt: skip
    entries, at = [], 0
    for i, (code, shape) in enumerate(shapes):
        n = ST_ITEMSIZE[code] * int(torch.Size(shape).numel())
        entries.append(Entry(f"e{i}", code, tuple(shape), at, at + n))
        at += n
    data = draw(st.binary(min_size=at, max_size=at))
    sums = [xxhash.xxh3_64_intdigest(data[e.begin : e.end]) for e in entries]
    records = draw(st.lists(_records(len(entries)), max_size=4))
    root = st.lists(
        st.tuples(st.text(max_size=3).map(lambda k: ["s", k]), trees(len(records))).map(list),
        max_size=4,
    )
    tree = draw(st.one_of(root.map(lambda kv: {"dict": kv}), trees(len(records)), json_values))
    typed = _typed(records)
    if typed is not None and draw(st.booleans()):
        blob = encode_header(Header(tuple(entries), typed, tree, tuple(sums)))
    else:
        blob = _framed(draw, entries, sums, records, tree)
    assert header_length(blob[:8], len(blob) + at, "drawn") == len(blob) - 8
    return blob + data


def _typed(records: list[dict[str, Json]]) -> tuple[Record, ...] | None:
    """The records as the codec's ``Record``s, when every field is a value it can encode."""
    out = []
    for r in records:
        dtype = getattr(torch, r["dtype"], None) if type(r["dtype"]) is str else None
        fields = (r["entry"], r["offset"], r["shape"], r["stride"])
        if not isinstance(dtype, torch.dtype) or not all(type(x) in (int, list) for x in fields):
            return None
        if any(type(x) is not int for d in fields[2:] for x in d):
            return None
        extra = {k: r[k] for k in ("attrs", "dtensor") if k in r}
        out.append(
            Record(r["entry"], r["offset"], tuple(r["shape"]), tuple(r["stride"]), dtype, **extra)
        )
    return tuple(out)


def _framed(
    draw: st.DrawFn, entries: list[Entry], sums: list[int], records: Json, tree: Json
) -> bytes:
    valid = {
        "version": 1,
        "rank": 0,
        "world_size": 1,
        "entries": [e.name for e in entries],
        "xxh3": [f"{s:016x}" for s in sums],
        "tensors": records,
        "tree": tree,
    }
    meta = _odd_field(
        draw,
        valid,
        {"version": st.sampled_from((2, "1", True)),
         "rank": st.sampled_from((1, -1, 2**63)),
         "world_size": st.sampled_from((0, 2**24 + 1, None)),
         "entries": st.lists(st.sampled_from(("e0", "e1", "e9", 5)), max_size=3),
         "xxh3": json_values},
    )  # fmt: skip
    top: dict[str, Json] = {"__metadata__": {"format": "pt", "aiostage": json.dumps(meta)}}
    for e in entries:
        top[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
    body = json.dumps(top, separators=(",", ":")).encode()
    body = body.ljust(-(-(8 + len(body)) // DATA_ALIGN) * DATA_ALIGN - 8, b" ")
    return struct.pack("<Q", len(body)) + body


def _odd_field(draw: st.DrawFn, valid: dict[str, Json], odd: dict[str, Any]) -> dict[str, Json]:
    """``valid``, or (one draw in four) with one field replaced by a value drawn from ``odd``."""
    out = dict(valid)
    if draw(st.integers(0, 3)) == 3:
        key = draw(st.sampled_from(sorted(odd)))
        out[key] = draw(odd[key])
    return out


@st.composite
def checkpoints(draw: st.DrawFn) -> Ckpt:
    """A one-rank checkpoint: a drawn data file and a manifest that (mostly) matches it."""
    blob = draw(data_files())
    (n,) = struct.unpack("<Q", blob[:8])
    info = _odd_field(
        draw,
        {"name": "rank_00000.safetensors", "size": len(blob),
         "header_xxh3": xxhash.xxh3_64_hexdigest(blob[: 8 + n])},
        {"name": st.sampled_from(("../x", "", 5, "rank_00001.safetensors")),
         "size": st.sampled_from((len(blob) + 1, -1, 2**64)),
         "header_xxh3": st.sampled_from(("", "g" * 16, 0))},
    )  # fmt: skip
    metadata = st.dictionaries(st.text(max_size=6), json_values, max_size=3)
    manifest = _odd_field(
        draw,
        {"format": "aiostage", "version": 1, "world_size": 1, "files": [info],
         "metadata": draw(metadata)},
        {"format": st.sampled_from(("", None, "AIOSTAGE")),
         "version": st.sampled_from((2, True, 1.0)),
         "world_size": st.sampled_from((0, 2, -1, 2**63)),
         "files": st.sampled_from(([], [info, info], None)),
         "metadata": json_values},
    )  # fmt: skip
    return Ckpt("tiny", {MANIFEST: json.dumps(manifest).encode(), "rank_00000.safetensors": blob})
