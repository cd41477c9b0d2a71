"""The on-disk format, pure bytes in and out: values, skeletons, layout, header, manifest."""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import struct
from typing import Any, NamedTuple

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiostage._core.storages import plan_storages
from aiostage._core.tree import flatten, unflatten
from aiostage._format.codec import (
    DATA_ALIGN,
    FileInfo,
    Header,
    Manifest,
    check_metadata,
    decode_header,
    decode_manifest,
    encode_header,
    encode_manifest,
    header_length,
    rank_file,
)
from aiostage._format.plan import plan_file
from aiostage._format.structure import decode_skeleton, decode_value, encode_skeleton, encode_value
from aiostage.errors import CheckpointCorrupt, UnsupportedValueError


class Point(NamedTuple):
    x: int
    y: torch.Tensor


@dataclasses.dataclass
class Config:
    lr: float
    betas: tuple[float, float]


def _layout(sd: Any) -> tuple[Header, list[tuple[torch.Tensor, int]]]:
    tree = flatten(sd)
    return plan_file(tree, plan_storages([leaf.data for leaf in tree.leaves]))


def _file_bytes(sd: Any) -> bytes:
    """A whole data file in memory: the header, then every entry's bytes and padding."""
    header, sources = _layout(sd)
    data = b"".join(bytes(src.numpy().tobytes()) + bytes(pad) for src, pad in sources)
    return encode_header(header) + data


# ---------------------------------------------------------------- values and skeletons


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        0,
        -(2**70),
        1.5,
        -0.0,
        math.inf,
        -math.inf,
        "",
        "ünï\x00",
        b"\x00\xff",
        torch.bfloat16,
        torch.Size([]),
        torch.Size([2, 3]),
        [1, (2.0, "x")],
        {"a": 1, 2: [b"z"]},
    ],
)
def test_values_round_trip_with_their_types(value: object) -> None:
    back = decode_value(json.loads(json.dumps(encode_value(value, ()), allow_nan=False)))
    assert back == value
    assert type(back) is type(value)
    assert repr(back) == repr(value)  # -0.0 keeps its sign, ints stay ints, tuples tuples


def test_nan_round_trips_as_standard_json() -> None:
    encoded = json.dumps(encode_value(math.nan, ()), allow_nan=False)
    assert math.isnan(decode_value(json.loads(encoded)))


@pytest.mark.parametrize(
    ("value", "key"),
    [
        ({"s": {1, 2}}, "s"),
        ({"o": object()}, "o"),
        ({"c": 1j}, "c"),
        ({"n": [1, {"deep": complex(1, 2)}]}, "n.1.deep"),
        ({"k": {1.5: "float key"}}, "k"),
        ({"b": {True: "bool key"}}, "b"),
    ],
)
def test_unsupported_values_name_their_key(value: object, key: str) -> None:
    with pytest.raises(UnsupportedValueError) as info:
        encode_skeleton(flatten(value).root)
    assert info.value.key == key


def test_skeleton_round_trip_keeps_structure_and_key_types() -> None:
    sd = {
        "model": collections.OrderedDict(w=torch.ones(2), b=torch.zeros(1)),
        "optim": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1}]},
        "pair": (1, [2, torch.ones(1)]),
        "point": Point(3, torch.ones(2)),
        "cfg": Config(0.1, (0.9, 0.99)),
        "dd": collections.defaultdict(list, {"a": [1]}),
    }
    tree = flatten(sd)
    encoded = json.loads(json.dumps(encode_skeleton(tree.root), allow_nan=False))
    root, paths = decode_skeleton(encoded, len(tree.leaves), "test")
    assert paths == [leaf.path for leaf in tree.leaves]
    back = unflatten(dataclasses.replace(tree, root=root), [leaf.data for leaf in tree.leaves])
    assert type(back["model"]) is collections.OrderedDict
    assert list(back["optim"]["state"]) == [0]
    assert back["pair"][0] == 1
    assert isinstance(back["pair"], tuple)
    assert type(back["point"]).__name__ == "Point"
    assert back["point"]._fields == ("x", "y")
    assert back["point"].x == 3
    assert back["cfg"] == {"lr": 0.1, "betas": (0.9, 0.99)}  # a dataclass comes back as a dict
    assert type(back["dd"]) is dict
    assert back["dd"] == {"a": [1]}


@pytest.mark.parametrize(
    "skeleton",
    [
        {"tensor": 1},
        {"list": [{"tensor": 0}, {"tensor": 0}]},
        {"list": []},
        {"weird": []},
        {"dict": [["x", {"tensor": 0}]]},
        {"dict": [[["f", 1.5], {"tensor": 0}]]},
        {"namedtuple": [{"tensor": 0}], "name": "bad name", "fields": ["a"]},
        {"namedtuple": [{"tensor": 0}], "name": "P", "fields": ["a", "b"]},
        {"value": {"bytes": "not base64!"}},
        {"value": {"dtype": "Tensor"}},
        {"list": [{"tensor": 0}, {"value": {"float": "NaN"}}]},
        "just a string",
    ],
)
def test_malformed_skeletons_are_corrupt(skeleton: Any) -> None:
    with pytest.raises(CheckpointCorrupt, match=r"f\.safetensors"):
        decode_skeleton(skeleton, 1, "f.safetensors")


def test_a_deeply_nested_skeleton_is_corrupt_not_a_crash() -> None:
    node: Any = {"tensor": 0}
    for _ in range(5000):
        node = {"list": [node]}
    with pytest.raises(CheckpointCorrupt):
        decode_skeleton(node, 1, "f")


# ---------------------------------------------------------------- layout


def test_lone_tensors_are_stored_as_themselves_and_aliases_once() -> None:
    base = torch.randn(10, 10)
    sd = {
        "w": torch.randn(3, 4),
        "tied": base,
        "tied_again": base,
        "view": base[2:5],
        "t": torch.randn(4, 3).T,  # lone but not contiguous
        "c": torch.randn(3, dtype=torch.complex128),  # no safetensors dtype
        "empty": torch.empty(0, 5),
        "half": torch.randn(5).half(),
    }
    header, sources = _layout(sd)
    names = [e.name for e in header.entries]
    assert {"w", "empty", "half"} <= set(names)
    spans = [e for e in header.entries if e.name.startswith("__aiostage__/span/")]
    assert len(spans) == 3  # the tied storage (with its view), the transposed one, complex128
    assert names[: len(spans)] == [e.name for e in spans]  # spans first
    assert header.data_bytes == sum(s.numel() + pad for s, pad in sources)
    by_key = dict(zip(sd, header.records, strict=True))
    assert by_key["tied"].entry == by_key["tied_again"].entry == by_key["view"].entry
    assert by_key["view"].offset == 20
    assert by_key["t"].stride == (1, 3)
    for e in header.entries:
        itemsize = 8 if e.dtype == "U8" else {"F32": 4, "F16": 2}.get(e.dtype, 1)
        assert e.begin % itemsize == 0
        if e.dtype == "U8":
            assert (e.end - e.begin) % 64 == 0


def test_colliding_and_reserved_names_fall_back_to_reserved_names() -> None:
    sd = {"a.b": torch.ones(1), "a": {"b": torch.zeros(1)}, "__metadata__": torch.ones(2)}
    names = [e.name for e in _layout(sd)[0].entries]
    assert names[0] == "a.b"
    assert names[1] == "__aiostage__/tensor/1"
    assert names[2] == "__aiostage__/tensor/2"


def test_safetensors_reads_the_plain_tensors_of_a_file() -> None:
    base = torch.arange(12.0)
    sd = {"w": torch.randn(2, 3), "ids": torch.arange(4), "tied": base, "again": base, "s": 7}
    loaded = safetensors.torch.load(_file_bytes(sd))
    assert torch.equal(loaded["w"], sd["w"])
    assert torch.equal(loaded["ids"], sd["ids"])
    assert [k for k in loaded if k.startswith("__aiostage__/span/")] == ["__aiostage__/span/2"]


# ---------------------------------------------------------------- header


def test_header_length_depends_only_on_layout() -> None:
    header, _ = _layout({"w": torch.ones(3), "b": torch.ones(2)})
    blob = encode_header(header)
    other = encode_header(dataclasses.replace(header, checksums=(2**64 - 1, 12345)))
    assert len(blob) == len(other)
    assert len(blob) % DATA_ALIGN == 0
    n = header_length(blob[:8], len(blob) + header.data_bytes, "f")
    decoded = decode_header(other[8 : 8 + n], header.data_bytes, "f")
    assert decoded.checksums == (2**64 - 1, 12345)
    assert decoded.entries == header.entries
    assert [r.shape for r in decoded.records] == [r.shape for r in header.records]


@pytest.mark.parametrize(
    ("length", "size", "match"),
    [
        (2**60, 1 << 20, "does not fit"),
        (2**64 - 1, 1 << 20, "does not fit"),
        (5000, 4096, "does not fit"),
        (100, 4096, "boundary"),
    ],
)
def test_header_lengths_out_of_range_are_corrupt(length: int, size: int, match: str) -> None:
    with pytest.raises(CheckpointCorrupt, match=match):
        header_length(struct.pack("<Q", length), size, "f")


def test_a_file_shorter_than_eight_bytes_is_corrupt() -> None:
    with pytest.raises(CheckpointCorrupt, match="too short"):
        header_length(b"\x01\x02", 2, "f")


def _valid() -> tuple[dict[str, Any], dict[str, Any], int]:
    header, _ = _layout({"w": torch.ones(2, 2), "tied": (t := torch.arange(8.0)), "v": t[2:4]})
    blob = encode_header(header)
    top = json.loads(blob[8:])
    return top, json.loads(top["__metadata__"]["aiostage"]), header.data_bytes


def _decode(top: dict[str, Any], meta: dict[str, Any], data_len: int) -> Header:
    if "__metadata__" in top:
        top["__metadata__"]["aiostage"] = json.dumps(meta)
    return decode_header(json.dumps(top).encode(), data_len, "bad.safetensors")


@pytest.mark.parametrize(
    "breakage",
    [
        lambda top, meta: top["w"].update(data_offsets=[0, 2**60]),
        lambda top, meta: top["w"].update(shape=[2**60, 2**60]),
        lambda top, meta: top["w"].update(shape=[-1, 4]),
        lambda top, meta: top["w"].update(dtype="F128"),
        lambda top, meta: top["w"].update(data_offsets=[8, 24]),
        lambda top, meta: meta["tensors"][0].update(shape=[2**40]),
        lambda top, meta: meta["tensors"][0].update(offset=-1),
        lambda top, meta: meta["tensors"][0].update(entry=99),
        lambda top, meta: meta["tensors"][0].update(dtype="not_a_dtype"),
        lambda top, meta: meta["tensors"][0].update(stride=[1]),
        lambda top, meta: meta["tensors"][0].update(grad="yes"),
        lambda top, meta: meta.update(version=2),
        lambda top, meta: meta.update(xxh3=["00"]),
        lambda top, meta: meta.update(rank=3),
        lambda top, meta: meta.update(entries=["nope"]),
        lambda top, meta: top.pop("__metadata__"),
    ],
)
def test_out_of_range_or_malformed_headers_are_corrupt(breakage: Any) -> None:
    top, meta, data_len = _valid()
    breakage(top, meta)
    with pytest.raises(CheckpointCorrupt, match=r"bad\.safetensors"):
        _decode(top, meta, data_len)


def test_data_length_must_match_the_entries() -> None:
    top, meta, data_len = _valid()
    for wrong in (data_len - 1, data_len + 64):
        with pytest.raises(CheckpointCorrupt):
            _decode(top, meta, wrong)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_headers_decode_or_raise_corrupt(data: st.DataObject) -> None:
    header, _ = _layout({"w": torch.ones(3, 2), "t": (t := torch.arange(6.0)), "v": t[1:3], "n": 1})
    blob = bytearray(encode_header(header)[8:].rstrip(b" "))
    # arbitrary bytes (and a cut) almost never decode; digits changed into digits keep the JSON
    # well formed, so about one example in ten decodes and is checked below
    numbers_only = data.draw(st.booleans())
    digits = [i for i, c in enumerate(blob) if chr(c).isdigit()]
    where = st.sampled_from(digits) if numbers_only else st.integers(0, len(blob) - 1)
    byte = st.sampled_from(b"0123456789") if numbers_only else st.integers(0, 255)
    for _ in range(data.draw(st.integers(1, 4))):
        blob[data.draw(where)] = data.draw(byte)
    cut = len(blob) if numbers_only else data.draw(st.integers(0, len(blob)))
    try:  # anything but CheckpointCorrupt fails the test
        decoded = decode_header(bytes(blob[:cut]), header.data_bytes, "f")
        _, paths = decode_skeleton(decoded.skeleton, len(decoded.records), "f")
    except CheckpointCorrupt:
        return
    assert len(paths) == len(decoded.records)
    _assert_readable(decoded, header.data_bytes)
    again = decode_header(encode_header(decoded)[8:], header.data_bytes, "f")
    assert again == decoded


def _assert_readable(h: Header, data_len: int) -> None:
    """What a reader relies on in a header it accepted: the entries tile the data region, one
    checksum each, and every tensor is a view that stays inside its own entry."""
    at = 0
    for e in sorted(h.entries, key=lambda e: (e.begin, e.end)):
        assert e.begin == at <= e.end
        at = e.end
    assert at == h.data_bytes == data_len
    assert len(h.checksums) == len(h.entries)
    assert 0 <= h.rank < h.world_size
    for r in h.records:
        assert len(r.shape) == len(r.stride)
        if r.numel == 0:
            continue
        e = h.entries[r.entry]
        assert r.entry >= 0
        assert e.begin % r.dtype.itemsize == 0
        n = (e.end - e.begin) // r.dtype.itemsize
        own = torch.zeros(n * r.dtype.itemsize, dtype=torch.uint8).view(r.dtype)
        own.as_strided(r.shape, r.stride, r.offset)  # raises if it reaches past the entry


# ---------------------------------------------------------------- manifest


def test_manifest_round_trips() -> None:
    m = Manifest(2, (FileInfo(rank_file(0), 10, 2**63 + 5), FileInfo(rank_file(1), 0, 0)), {"s": 1})
    assert decode_manifest(encode_manifest(m), "m") == m


@pytest.mark.parametrize(
    "doc",
    [
        {"format": "other", "version": 1, "world_size": 1, "files": [], "metadata": {}},
        {"format": "aiostage", "version": 9, "world_size": 1, "files": [], "metadata": {}},
        {"format": "aiostage", "version": 1, "world_size": 2, "files": [], "metadata": {}},
        {
            "format": "aiostage",
            "version": 1,
            "world_size": 1,
            "files": [{"name": "../../etc/passwd", "size": 1, "header_xxh3": "0" * 16}],
            "metadata": {},
        },
        [1, 2],
    ],
)
def test_bad_manifests_are_corrupt(doc: Any) -> None:
    with pytest.raises(CheckpointCorrupt, match=r"manifest\.json"):
        decode_manifest(json.dumps(doc).encode(), "ckpt/manifest.json")


def test_metadata_must_be_json() -> None:
    assert check_metadata({"step": 3, "t": (1, 2)}) == {"step": 3, "t": [1, 2]}
    assert check_metadata(None) == {}
    with pytest.raises(UnsupportedValueError, match="metadata"):
        check_metadata({"x": object()})
    with pytest.raises(UnsupportedValueError, match="metadata"):
        check_metadata([1])
