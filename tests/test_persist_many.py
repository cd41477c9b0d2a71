"""Saving and loading state dicts of thousands of tensors: checksums, aliasing, loop work."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import struct
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import torch
import xxhash
from test_reader import flip

import aiostage
import aiostage._format.codec as codec_module
from aiostage._core.storages import plan_storages
from aiostage._core.tree import flatten
from aiostage._format import sliced
from aiostage._format.codec import Header, decode_header, encode_header, rank_file
from aiostage._format.plan import plan_file
from aiostage.errors import CheckpointCorrupt

_PACKAGE = str(Path(aiostage.__file__).parent)


def small_sd(n: int, numel: int = 512) -> dict[str, Any]:
    """``n`` float32 tensors of ``numel`` elements, values unique per tensor."""
    gen = torch.Generator().manual_seed(n)
    return {f"layer{i}.w": torch.randn(numel, generator=gen) for i in range(n)}


def file_entries(file: Path) -> tuple[int, dict[str, Any], list[str], list[str]]:
    """Where the data starts, the safetensors entries, and aiostage's names and checksums."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    top = json.loads(raw[8 : 8 + n])
    meta = json.loads(top["__metadata__"]["aiostage"])
    return 8 + n, top, meta["entries"], meta["xxh3"]


# ---------------------------------------------------------------- checksums


@pytest.mark.parametrize("chunk_kib", [4, 12, 16 * 1024])
async def test_every_entry_checksum_matches_its_bytes_however_the_writes_are_cut(
    tmp_path: Path, chunk_kib: int
) -> None:
    """Small entries hashed whole, entries cut by a chunk boundary and padded spans hashed piece
    by piece: each stored xxh3 is that of exactly its entry's bytes."""
    sd: dict[str, Any] = {
        f"odd{i}": torch.arange(i * 37 + 1, dtype=torch.uint8) for i in range(300)
    }
    base = torch.randn(1000)
    sd |= {"tied": base, "again": base, "view": base[3:700], "empty": torch.empty(0)}
    sd["big"] = torch.randn(5000, dtype=torch.float64)
    options = aiostage.WriteOptions(chunk_bytes=chunk_kib * 1024)
    await aiostage.save(sd, tmp_path / "ck", write_options=options)
    start, top, names, sums = file_entries(tmp_path / "ck" / rank_file(0))
    raw = (tmp_path / "ck" / rank_file(0)).read_bytes()
    assert len(names) == len(sums) == 300 + 1 + 1 + 1  # plain ones, one span, empty, big
    for name, digest in zip(names, sums, strict=True):
        begin, end = top[name]["data_offsets"]
        assert int(digest, 16) == xxhash.xxh3_64_intdigest(raw[start + begin : start + end]), name
    out = await aiostage.load(tmp_path / "ck")
    assert all(torch.equal(out[k], v) for k, v in sd.items())


@pytest.mark.parametrize("which", [0, 1, 1000, 2047])
async def test_a_flipped_byte_in_one_small_entry_names_that_key(tmp_path: Path, which: int) -> None:
    sd = small_sd(2048)
    await aiostage.save(sd, tmp_path / "ck")
    file = tmp_path / "ck" / rank_file(0)
    start, top, _, _ = file_entries(file)
    key = f"layer{which}.w"
    begin, end = top[key]["data_offsets"]
    flip(file, start + (begin + end) // 2)
    with pytest.raises(CheckpointCorrupt, match="checksum mismatch") as info:
        await aiostage.load(tmp_path / "ck")
    assert info.value.key == key
    assert key in str(info.value)
    salvaged = await aiostage.load(tmp_path / "ck", verify=False)
    assert not torch.equal(salvaged[key], sd[key])
    assert all(torch.equal(salvaged[k], v) for k, v in sd.items() if k != key)


@pytest.mark.parametrize("where", ["first", "second"])
async def test_a_flipped_byte_in_an_entry_read_in_two_chunks_names_that_key(
    tmp_path: Path, where: str
) -> None:
    """Loads hash 16 MiB at a time: an entry across that boundary is hashed in pieces."""
    sd = {"first": torch.randn(10 << 18), "second": torch.randn(10 << 18)}  # 10 MiB each
    await aiostage.save(sd, tmp_path / "ck")
    file = tmp_path / "ck" / rank_file(0)
    start, top, _, _ = file_entries(file)
    begin, end = top["second"]["data_offsets"]
    assert begin < 16 << 20 < end  # the second entry straddles the first chunk's end
    flip(file, start + (end - 100 if where == "second" else 100))
    with pytest.raises(CheckpointCorrupt, match="checksum mismatch") as info:
        await aiostage.load(tmp_path / "ck")
    assert info.value.key == where


# ---------------------------------------------------------------- aliasing after a load


async def test_thousands_of_small_tensors_load_into_storages_of_their_own(tmp_path: Path) -> None:
    """Loaded tensors are views of one mapped file, but each entry is its own storage: nothing
    aliases that did not alias when saved, and what did alias still does."""
    sd: dict[str, Any] = small_sd(8192)
    sd["tied.a"] = sd["tied.b"] = torch.randn(64)
    sd["rows"] = sd["layer5.w"].view(16, 32)[2:9]
    await aiostage.save(sd, tmp_path / "ck")
    out = await aiostage.load(tmp_path / "ck")
    assert all(torch.equal(out[k], v) for k, v in sd.items())
    lone = [out[f"layer{i}.w"] for i in range(8192) if i != 5]
    ranges = sorted((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in lone)
    assert len({start for start, _ in ranges}) == len(lone)
    assert all(a + n <= b for (a, n), (b, _) in itertools.pairwise(ranges))
    assert out["tied.a"] is out["tied.b"] or (
        out["tied.a"].untyped_storage().data_ptr() == out["tied.b"].untyped_storage().data_ptr()
    )
    rows, whole = out["rows"], out["layer5.w"]
    assert rows.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()
    assert rows.storage_offset() - whole.storage_offset() == 2 * 32
    out["layer100.w"].fill_(7.0)  # writes go to this tensor alone
    assert torch.equal(out["layer99.w"], sd["layer99.w"])
    assert torch.equal(out["layer101.w"], sd["layer101.w"])
    whole[2 * 32] = -1.0
    assert rows[0, 0] == -1.0


# ---------------------------------------------------------------- the loop thread


async def loop_calls(op: Callable[[], Awaitable[Any]]) -> int:
    """Python calls made by aiostage code on this thread (the event loop's) while ``op`` runs:
    function calls, coroutine resumptions and calls into C, counted by ``sys.setprofile``."""
    calls = 0

    def count(frame: FrameType, event: str, arg: Any) -> None:
        nonlocal calls
        if event in ("call", "c_call") and frame.f_code.co_filename.startswith(_PACKAGE):
            calls += 1

    previous = sys.getprofile()
    sys.setprofile(count)
    try:
        await op()
    finally:
        sys.setprofile(previous)
    return calls


async def test_the_loop_does_no_more_work_for_thousands_of_tensors(tmp_path: Path) -> None:
    """The same bytes in 16 tensors or in 2048: the loop thread makes the same calls, so
    whatever scales with the number of tensors happens in worker threads."""
    counts = {}
    for n in (16, 2048):
        sd = small_sd(n, numel=(1 << 20) // n)  # 4 MiB either way: one chunk
        await aiostage.save(sd, tmp_path / f"warm{n}")  # thread pools and caches warmed up
        await aiostage.load(tmp_path / f"warm{n}")
        saving = await loop_calls(functools.partial(aiostage.save, sd, tmp_path / f"ck{n}"))
        loading = await loop_calls(functools.partial(aiostage.load, tmp_path / f"ck{n}"))
        counts[n] = (saving, loading)
    (save_few, load_few), (save_many, load_many) = counts[16], counts[2048]
    assert save_many <= save_few + 32, counts
    assert load_many <= load_few + 32, counts


# ---------------------------------------------------------------- planning and headers


def test_planning_without_a_storage_plan_gives_the_same_layout() -> None:
    """``plan_file`` finds the tensors stored as themselves with C calls alone; the layout is
    the one full storage planning gives (spans are numbered from 0 either way)."""
    base = torch.randn(6, 6)
    weight = torch.nn.Parameter(torch.randn(3, 4))
    weight.tag = "w"  # type: ignore[attr-defined]
    sd = {
        "weight": weight,
        "tied": base,
        "again": base,
        "rows": base[1:3],
        "t": torch.randn(4, 5).t(),
        "c128": torch.randn(3, dtype=torch.complex128),
        "empty": torch.empty(0, 2),
        "e128": torch.empty(0, dtype=torch.complex128),
        "half": torch.randn(5).half(),
        "lone": torch.randn(10)[2:7],
        "nested": [torch.ones(2), {"x": torch.zeros(3, dtype=torch.int8)}],
    }
    tree = flatten(sd)
    fast, fast_sources = plan_file(tree)
    full, full_sources = plan_file(tree, plan_storages([leaf.data for leaf in tree.leaves]))
    assert fast.records == full.records
    spans = [e.name for e in full.entries if e.name.startswith("__aiostage__/span/")]
    renumbered = {old: f"__aiostage__/span/{k}" for k, old in enumerate(spans)}
    assert fast.entries == tuple(
        e._replace(name=renumbered.get(e.name, e.name)) for e in full.entries
    )
    for (a, pad_a), (b, pad_b) in zip(fast_sources, full_sources, strict=True):
        assert torch.equal(a, b)
        assert pad_a == pad_b
    typed, typed_sources = plan_file(tree, flat=False)  # for the writer: the tensors themselves
    assert typed == fast
    for (a, _), (b, _) in zip(typed_sources, fast_sources, strict=True):
        assert a.nbytes == b.nbytes
        assert a.data_ptr() == b.data_ptr()


def test_entries_listed_out_of_file_order_still_decode() -> None:
    tree = flatten({"a": torch.ones(4), "b": torch.zeros(2, dtype=torch.float64)})
    header = plan_file(tree)[0]
    reordered = Header(header.entries[::-1], (), None, header.checksums[::-1])
    back = decode_header(encode_header(reordered)[8:], header.data_bytes, "x")
    assert back.entries == reordered.entries
    assert back.checksums == reordered.checksums
    gap = Header(
        (header.entries[0]._replace(begin=8, end=24),), (), None, (0,)
    )  # [8, 24) of 24 bytes: nothing at [0, 8)
    with pytest.raises(CheckpointCorrupt, match="starts at 8, expected 0"):
        decode_header(encode_header(gap)[8:], 24, "x")


def test_a_header_is_encoded_once_and_its_checksums_filled_in_place() -> None:
    tree = flatten(small_sd(50, numel=3))
    header = plan_file(tree)[0]
    layout = codec_module.encode_layout(header)
    sums = [(i * 0x9E3779B97F4A7C15) % (1 << 64) for i in range(len(header.entries))]
    blob = layout.with_checksums(sums)
    assert len(blob) == len(layout.blob)
    assert blob == encode_header(dataclasses.replace(header, checksums=tuple(sums)))
    assert decode_header(blob[8:], header.data_bytes, "x").checksums == tuple(sums)
    with pytest.raises(ValueError, match="checksums for"):
        layout.with_checksums(sums[:-1])


# ---------------------------------------------------------------- headers parsed a slice at a time


def _big_header() -> bytes:
    tree = flatten(
        {"model": small_sd(5000, numel=2), "optim": {i: {"m": torch.ones(1)} for i in range(99)}}
    )
    return encode_header(plan_file(tree)[0])


def test_a_header_of_thousands_of_tensors_parses_in_calls_of_a_slice_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No single C call of the JSON scanner reads much more than a slice of the header (it holds
    the GIL), and the result is ``json``'s own."""
    blob = _big_header()
    read: list[int] = []
    scan = sliced._scan

    def counted(text: str, at: int) -> tuple[Any, int]:
        value, end = scan(text, at)
        read.append(end - at)
        return value, end

    monkeypatch.setattr(sliced, "_scan", counted)
    top = sliced.loads(blob[8:])
    meta = sliced.loads(top["__metadata__"]["aiostage"])
    assert top == json.loads(blob[8:])
    assert meta == json.loads(top["__metadata__"]["aiostage"])
    assert len(read) > 10
    assert max(read) <= 2 * sliced.SLICE
    assert sliced.dumps(meta["tree"]) == json.dumps(meta["tree"], separators=(",", ":"))
    assert sliced.escape(top["__metadata__"]["aiostage"]) == json.dumps(
        top["__metadata__"]["aiostage"]
    )


@pytest.mark.parametrize(
    "text",
    ["[,1]", "[1,]", '{"a":1,}', "[1 2]", '{"a" 1}', "[1,2", '"abc', '["a\\q"]', "[01]", "{}x"],
)
def test_malformed_json_is_refused_as_json_refuses_it(text: str) -> None:
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    with pytest.raises(json.JSONDecodeError):
        sliced.loads(text)


def test_long_strings_with_escapes_and_surrogate_pairs_unescape_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sliced, "SLICE", 7)  # cuts land next to every escape
    value = ['a"\\b\u00e9\U0001f600' * 40, {"k\U0001f600" * 9: [1.5, None, True, "x" * 30] * 9}]
    for text in (
        json.dumps(value),
        json.dumps(value, ensure_ascii=False),
        json.dumps(value, indent=2),
    ):
        assert sliced.loads(text) == json.loads(text)
