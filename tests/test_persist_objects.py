"""Thousands of tensors, the objects side: the inline checks of plain records and entries accept
and refuse exactly what the general decoders do, and a save or load leaves the collector no
per-tensor objects to walk but the loaded tensors themselves."""

from __future__ import annotations

import copy
import gc
import json
import random
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import aiostage
from aiostage._core.dtypes import ST_ITEMSIZE
from aiostage._core.tree import flatten
from aiostage._format import codec, records, sliced
from aiostage._format.plan import plan_file
from aiostage._format.records import DIM_MAX, Entry, Record
from aiostage._storage import reader
from aiostage.errors import CheckpointCorrupt

# ---------------------------------------------------------------- inline checks = general ones

_ENTRIES = (Entry("a", "F32", (64,), 0, 256), Entry("b", "F32", (3,), 260, 272))


def _plain() -> dict[str, Any]:
    return {"entry": 0, "offset": 4, "shape": [3, 4], "stride": [4, 1], "dtype": "float32"}


def _mutations(seed: int) -> Iterator[Any]:
    """Plain records with one or two fields changed to something near a limit or of a wrong
    type, and a few that are not records at all."""
    rng = random.Random(seed)
    odd: list[Any] = [
        -1, 0, 1, 2, 3, 12, 15, 16, 60, 61, 64, 65, DIM_MAX, DIM_MAX + 1, 1 << 63, True, False,
        None, 1.0, "1", [], [1], [0], [3, 0], [0, 3], [3, 4, 1], [True, 4], [3.0, 4], [-1, 4],
        [DIM_MAX, 1], [1 << 62, 1 << 62, 0], [1] * 65, "float32", "int8", "float64", "qint8",
        "complex64", "no", {"a": 1},
    ]  # fmt: skip
    keys = ["entry", "offset", "shape", "stride", "dtype"]
    for _ in range(3000):
        r: Any = _plain()
        for _ in range(rng.choice((1, 1, 2))):
            r[rng.choice(keys)] = copy.deepcopy(rng.choice(odd))
        if rng.random() < 0.05:
            r[rng.choice(("wrap", "grad", "extra"))] = rng.choice(("parameter", True, 1))
        if rng.random() < 0.03:
            del r[rng.choice(keys)]
        yield r
    yield from (_plain(), [], None, "x", {})


def _general(r: Any) -> Record | str:
    try:
        return records.decode_record(r, _ENTRIES)
    except (ValueError, TypeError, KeyError) as exc:
        return type(exc).__name__


def test_inline_record_checks_accept_and_refuse_what_decode_record_does() -> None:
    cases = list(_mutations(18))
    expected = [_general(copy.deepcopy(r)) for r in cases]
    assert sum(isinstance(x, Record) for x in expected) > 100  # both outcomes are exercised
    assert sum(isinstance(x, str) for x in expected) > 1000
    breaths: list[int] = []
    for r, want in zip(cases, expected, strict=True):
        try:
            got: Record | str = records.decode_records([r], _ENTRIES, lambda: breaths.append(1))[0]
        except ValueError as exc:
            got = "refused" if str(exc).startswith("tensor record 0: ") else str(exc)
        if isinstance(want, Record):
            assert got == want
            assert isinstance(got, Record)
            assert type(got.shape) is tuple
            assert type(got.stride) is tuple
        else:
            assert got == "refused", (r, got)
    assert breaths  # the first record of every call breathes


def test_a_refused_record_is_named_by_its_index_and_its_json_dropped_as_decoded() -> None:
    tensors: list[Any] = [_plain() for _ in range(600)]
    tensors[517]["offset"] = 61  # one element past entry "a"
    with pytest.raises(ValueError, match=r"^tensor record 517: .*does not fit its entry"):
        records.decode_records(tensors, _ENTRIES, lambda: None)
    assert tensors[:518] == [None] * 518
    assert tensors[518] == _plain()


@pytest.mark.parametrize(
    "info",
    [
        {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]},
        {"dtype": "F32", "shape": [2, 3], "data_offsets": [8, 32]},
        {"dtype": "F32", "shape": [2, 3], "data_offsets": [24, 0]},
        {"dtype": "F32", "shape": [2, True], "data_offsets": [0, 8]},
        {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]},
        {"dtype": "F32", "shape": [1 << 62, 1 << 62, 0], "data_offsets": [0, 0]},
        {"dtype": "F32", "shape": [], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [6], "data_offsets": [0, 24.0]},
        {"dtype": "F32", "shape": [6], "data_offsets": [-4, 20]},
        {"dtype": "F32", "shape": [6], "data_offsets": [0, 24, 0]},
        {"dtype": "float32", "shape": [6], "data_offsets": [0, 24]},
        {"dtype": ["F32"], "shape": [6], "data_offsets": [0, 24]},
        {"dtype": "U8", "shape": [DIM_MAX + 1], "data_offsets": [0, 24]},
        {"dtype": "F32", "shape": [6], "data_offsets": [0, 24], "extra": 1},
        {"shape": [6], "data_offsets": [0, 24]},
        [0, 24],
        None,
    ],
)
def test_inline_entry_checks_accept_and_refuse_what_the_general_decoder_does(info: Any) -> None:
    top = {"w": info}
    try:
        want: Entry | str = codec._decode_entry("w", copy.deepcopy(info), 24)
    except (ValueError, TypeError, KeyError) as exc:
        want = type(exc).__name__
    try:
        got: Entry | str = codec._decode_entries(["w"], top, 24)[0]
    except (ValueError, TypeError, KeyError) as exc:
        got = type(exc).__name__
    assert got == want
    assert all(code in ST_ITEMSIZE for code in ("F32", "U8"))


# ---------------------------------------------------------------- what the collector walks


class _Young:
    """The size of the young generation at the start of each collection while it is used."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start" and info["generation"] == 0:
            self.sizes.append(len(gc.get_objects(0)))

    def __enter__(self) -> _Young:
        gc.collect()
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        # a collection that the end of a pause made due runs at the next allocations
        keep = [[] for _ in range(5000)]
        del keep
        gc.callbacks.remove(self)


_N = 3000


@pytest.fixture
def collecting() -> Iterator[None]:
    """Automatic collection on, as in a user's process."""
    was = gc.isenabled()
    gc.enable()
    try:
        yield
    finally:
        if not was:
            gc.disable()


@pytest.mark.usefixtures("collecting")
async def test_a_save_leaves_no_per_tensor_objects_for_a_collection(tmp_path: Path) -> None:
    sd = {f"layer{i}": {"w": torch.full((4,), float(i)), "step": i} for i in range(_N)}
    await aiostage.save(sd, tmp_path / "warm")  # the header text memo is filled once
    with _Young() as young:
        await aiostage.save(sd, tmp_path / "ckpt")
    assert young.sizes  # the collector did run
    assert max(young.sizes) < _N // 2, young.sizes  # never over the tree, header or sources


@pytest.mark.usefixtures("collecting")
async def test_a_load_leaves_the_collector_its_tensors_and_containers_only(tmp_path: Path) -> None:
    sd = {f"layer{i}": {"w": torch.full((4,), float(i)), "step": i} for i in range(_N)}
    await aiostage.save(sd, tmp_path / "ckpt")
    with _Young() as young:
        out = await aiostage.load(tmp_path / "ckpt")
    assert young.sizes
    # one object per tensor and per dict (no memoryview or base tensor per tensor), no more
    assert max(young.sizes) < 2 * _N + 500, young.sizes
    assert torch.equal(out["layer17"]["w"], torch.full((4,), 17.0))
    assert out["layer17"]["w"].untyped_storage().nbytes() == 16  # its entry's bytes only


# ---------------------------------------------------------------- the header text memo


def _layout(n: int, value: object, dims: int = 4) -> codec.Header:
    sd: dict[str, Any] = {f"t{i}": torch.zeros(dims if i == n - 1 else 4) for i in range(n)}
    sd["values"] = [{"v": i} for i in range(3000)] + [value]  # past one marshal run
    return plan_file(flatten(sd))[0]


def test_the_memo_reuses_only_text_that_is_the_same() -> None:
    """A memo compares long record lists and big skeletons a slice at a time: a header that
    differs only in its last record or last value (``1``, ``True``, ``1.0``) is encoded anew."""
    memo = codec.LayoutMemo()
    headers = [
        _layout(5000, 1),
        _layout(5000, 1),
        _layout(5000, True),
        _layout(5000, 1.0),
        _layout(5000, 1, dims=5),
        _layout(5000, 1),
        _layout(4999, 1),
    ]
    texts = [codec.encode_layout(h, memo).blob for h in headers]
    fresh = [codec.encode_layout(h).blob for h in headers]
    assert texts == fresh
    assert len(set(fresh)) == 5  # 1 twice, and the very first again at the end
    assert codec._same((1, (2, 3)), (1, (2, 3)))
    assert not codec._same([1] * 5000, [1] * 4999 + [2])
    assert not codec._same((1,), [1])


# ---------------------------------------------------------------- checks in two halves


def _flip(file: Path, name: str) -> None:
    """Flip the first byte of entry ``name``'s data in ``file``."""
    body, data_len, where = _header_of(file)
    entry = next(e for e in codec.decode_header(body, data_len, where).entries if e.name == name)
    raw = bytearray(file.read_bytes())
    raw[8 + len(body) + entry.begin] ^= 0xFF
    file.write_bytes(bytes(raw))


async def test_a_check_in_two_halves_finds_the_first_damaged_entry_in_either(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reader, "_SPLIT", 1 << 10)  # these 8 KiB are hashed by two threads
    sd = {f"t{i}": torch.full((256,), float(i)) for i in range(8)}
    await aiostage.save(sd, tmp_path / "c")
    file = tmp_path / "c" / codec.rank_file(0)
    assert reader._halves(codec.decode_header(*_header_of(file)), None)[1] == [4, 5, 6, 7]
    _flip(file, "t6")
    with pytest.raises(CheckpointCorrupt, match="checksum mismatch") as caught:
        await aiostage.load(tmp_path / "c")
    assert caught.value.key == "t6"
    _flip(file, "t1")
    with pytest.raises(CheckpointCorrupt, match="checksum mismatch") as caught:
        await aiostage.load(tmp_path / "c")
    assert caught.value.key == "t1"
    out = await aiostage.load(tmp_path / "c", verify=False)
    assert torch.equal(out["t3"], sd["t3"])


def _header_of(file: Path) -> tuple[bytes, int, str]:
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8 : 8 + n], len(raw) - 8 - n, str(file)


@pytest.mark.parametrize(
    "raw",
    [
        json.dumps({"k": ["v" * 40] * 30000}).encode(),  # ASCII: decoded a slice at a time
        json.dumps({"k": ["\u00e9" * 40] * 30000}, ensure_ascii=False).encode(),
        json.dumps({"k": ["v" * 40] * 30000}).encode("utf-16"),
        b"\x00" + json.dumps(["v" * 40] * 30000).encode(),
    ],
)
def test_long_headers_decode_as_json_decodes_them(raw: bytes) -> None:
    try:
        want = json.loads(raw)
    except ValueError as exc:
        want = type(exc)
    try:
        got = sliced.loads(raw)
    except ValueError as exc:
        got = type(exc)
    assert got == want
