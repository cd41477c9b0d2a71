"""Writing checkpoints durably: layout on disk, overwrite, injected write faults, writes in
flight at once, sweep."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path, PurePath
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import torch

import aiostage
from aiostage._format.codec import MANIFEST, LayoutMemo, encode_layout, rank_file
from aiostage._storage import localfs
from aiostage._storage.backend import Sink
from aiostage._storage.local import LocalStorage
from aiostage._storage.pipeline import pipeline
from aiostage._storage.prepare import prepare
from aiostage._storage.writer import DurableWriter
from aiostage.errors import CheckpointWriteError, UnsupportedValueError
from aiostage.testing import FaultyWrites


def make_sd(seed: int = 0, n: int = 6, size: int = 50_000) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, Any] = {f"w{i}": torch.randn(size + i, generator=gen) for i in range(n)}
    sd["tied"] = sd["w0"]
    sd["view"] = sd["w1"][10:20]
    sd["step"] = seed
    return sd


def leftovers(root: Path) -> list[str]:
    return sorted(n for n in os.listdir(root) if localfs.TEMP_NAME.match(n))


async def assert_loads(path: Path, sd: dict[str, Any]) -> None:
    out = await aiostage.load(path)
    assert out.keys() == sd.keys()
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(out[k], v), k
        else:
            assert out[k] == v


async def test_save_writes_one_data_file_and_the_manifest(tmp_path: Path) -> None:
    sd = make_sd()
    report = await aiostage.save(sd, tmp_path / "ckpt", metadata={"step": 7})
    assert sorted(os.listdir(tmp_path / "ckpt")) == [MANIFEST, rank_file(0)]
    assert leftovers(tmp_path) == []
    sizes = sum(p.stat().st_size for p in (tmp_path / "ckpt").iterdir())
    assert report.bytes_written == sizes
    assert report.files == (rank_file(0), MANIFEST)
    assert report.total_seconds >= report.write_seconds > 0
    assert report.gb_per_second > 0
    manifest = json.loads((tmp_path / "ckpt" / MANIFEST).read_text())
    assert manifest["world_size"] == 1
    assert manifest["metadata"] == {"step": 7}
    assert await aiostage.load_metadata(tmp_path / "ckpt") == {"step": 7}
    await assert_loads(tmp_path / "ckpt", sd)


async def test_parents_are_created(tmp_path: Path) -> None:
    await aiostage.save({"x": torch.ones(2)}, tmp_path / "a" / "b" / "ckpt")
    assert (tmp_path / "a" / "b" / "ckpt" / MANIFEST).is_file()


async def test_an_existing_path_is_kept_unless_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    await aiostage.save(make_sd(1), path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        await aiostage.save(make_sd(2), path)
    await assert_loads(path, make_sd(1))
    await aiostage.save(make_sd(2), path, overwrite=True)
    await assert_loads(path, make_sd(2))
    assert os.listdir(tmp_path) == ["ckpt"]


@pytest.mark.parametrize("kind", ["file", "dir"])
async def test_overwrite_refuses_what_is_not_a_checkpoint(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "precious"
    if kind == "file":
        path.write_text("keep me")
    else:
        path.mkdir()
        (path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an aiostage checkpoint"):
        await aiostage.save({"x": torch.ones(1)}, path, overwrite=True)
    assert leftovers(tmp_path) == []


async def test_overwrite_replaces_an_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    await aiostage.save({"x": torch.ones(1)}, tmp_path / "ckpt", overwrite=True)
    await assert_loads(tmp_path / "ckpt", {"x": torch.ones(1)})


async def test_overwrite_without_atomic_exchange_uses_renames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(localfs, "_renameat2", None)  # as on a libc or file system without it
    await aiostage.save(make_sd(1), tmp_path / "ckpt")
    await aiostage.save(make_sd(2), tmp_path / "ckpt", overwrite=True)
    await assert_loads(tmp_path / "ckpt", make_sd(2))
    assert os.listdir(tmp_path) == ["ckpt"]


@pytest.mark.parametrize(
    "options",
    [aiostage.WriteOptions(direct_io=False), aiostage.WriteOptions(chunk_bytes=4096, buffers=3)],
)
async def test_writer_options_give_the_same_file(
    tmp_path: Path, options: aiostage.WriteOptions
) -> None:
    sd = make_sd()
    await aiostage.save(sd, tmp_path / "default")
    await aiostage.save(sd, tmp_path / "other", write_options=options)
    default = (tmp_path / "default" / rank_file(0)).read_bytes()
    assert (tmp_path / "other" / rank_file(0)).read_bytes() == default


SMALL_CHUNKS = aiostage.WriteOptions(chunk_bytes=1 << 16)


async def count_writes(tmp_path: Path, sd: dict[str, Any]) -> list[tuple[str, int, int]]:
    with FaultyWrites() as probe:  # no rules: it only records the writes
        await aiostage.save(sd, tmp_path / "probe", write_options=SMALL_CHUNKS)
    return probe.writes


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
@pytest.mark.parametrize("which", ["first", "middle", "header", "manifest"])
async def test_a_failed_write_commits_nothing_and_saving_works_again(
    tmp_path: Path, err: int, which: str
) -> None:
    root = tmp_path / "run"
    root.mkdir()
    await aiostage.save(make_sd(1), root / "ckpt")
    calls = await count_writes(tmp_path, make_sd(2))
    names = [Path(name).name for name, _, _ in calls]
    k = {
        "first": 0,
        "middle": len(calls) // 2,
        "header": max(
            i for i, (n, o, _) in enumerate(calls) if n.endswith("safetensors") and o == 0
        ),
        "manifest": names.index(MANIFEST),
    }[which]
    with (
        FaultyWrites().fail(k + 1, err),
        pytest.raises(  # its rules count writes from 1
            CheckpointWriteError, match=os.strerror(err)
        ) as info,
    ):
        await aiostage.save(make_sd(2), root / "ckpt", overwrite=True, write_options=SMALL_CHUNKS)
    cause = info.value.__cause__
    while not isinstance(cause, OSError) and cause is not None:  # a task group keeps its group
        (cause,) = cause.exceptions  # type: ignore[attr-defined]
    assert isinstance(cause, OSError)
    assert cause.errno == err
    assert info.value.path == root / "ckpt"
    assert leftovers(root) == []
    await assert_loads(root / "ckpt", make_sd(1))  # the earlier checkpoint is intact
    await aiostage.save(make_sd(3), root / "ckpt", overwrite=True)
    await assert_loads(root / "ckpt", make_sd(3))


async def test_a_cancelled_save_leaves_nothing_behind(tmp_path: Path) -> None:
    sd = {f"w{i}": torch.randn(1 << 20) for i in range(16)}
    for delay in (0.0, 0.005, 0.02, 0.05):
        with anyio.move_on_after(delay):
            await aiostage.save(sd, tmp_path / f"c{delay}")
        assert leftovers(tmp_path) == []
        if (tmp_path / f"c{delay}").exists():
            await assert_loads(tmp_path / f"c{delay}", sd)


async def test_unsupported_values_fail_before_any_write(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedValueError) as info:
        await aiostage.save({"a": {"b": [torch.ones(1), {1, 2}]}}, tmp_path / "ckpt")
    assert info.value.key == "a.b.1"
    with pytest.raises(UnsupportedValueError, match="layout") as info:
        await aiostage.save({"x": torch.eye(2).to_sparse()}, tmp_path / "ckpt")
    assert info.value.key == "x"
    with pytest.raises(UnsupportedValueError, match="metadata"):
        await aiostage.save({"x": torch.ones(1)}, tmp_path / "ckpt", metadata={"f": print})
    assert os.listdir(tmp_path) == []


async def test_a_stager_stages_everything_and_gets_its_copy_back(tmp_path: Path) -> None:
    sd = make_sd()
    async with aiostage.DefaultStager() as stager:
        await aiostage.save(sd, tmp_path / "ckpt", stager=stager)
        assert stager.statistics().leased == 0
        assert stager.statistics().stages == 1
    await assert_loads(tmp_path / "ckpt", sd)


# ---------------------------------------------------------------- sweep


async def test_sweep_removes_temporaries_only(tmp_path: Path) -> None:
    await aiostage.save({"x": torch.ones(1)}, tmp_path / "keep")
    token = "0" * 32
    (tmp_path / f".a.aiostage-tmp-{token}").mkdir()
    (tmp_path / f".a.aiostage-tmp-{token}" / rank_file(0)).write_bytes(b"partial")
    (tmp_path / f".keep.aiostage-old-{'1' * 32}").mkdir()
    (tmp_path / ".hidden-but-mine").mkdir()
    removed = await aiostage.sweep(tmp_path)
    assert sorted(p.name for p in removed) == [
        f".a.aiostage-tmp-{token}",
        f".keep.aiostage-old-{'1' * 32}",
    ]
    assert sorted(os.listdir(tmp_path)) == [".hidden-but-mine", "keep"]
    assert await aiostage.sweep(tmp_path) == []


@pytest.mark.parametrize("new_complete", [True, False])
async def test_sweep_finishes_an_interrupted_overwrite(tmp_path: Path, new_complete: bool) -> None:
    """The crash window of the rename fallback: the old checkpoint moved aside, the new not in."""
    token = "a" * 32
    await aiostage.save(make_sd(1), tmp_path / "old")
    await aiostage.save(make_sd(2), tmp_path / "new")
    (tmp_path / "old").rename(tmp_path / f".ckpt.aiostage-old-{token}")
    (tmp_path / "new").rename(tmp_path / f".ckpt.aiostage-tmp-{token}")
    if not new_complete:
        (tmp_path / f".ckpt.aiostage-tmp-{token}" / MANIFEST).unlink()
    with pytest.raises(aiostage.errors.CheckpointNotFound, match="sweep"):
        await aiostage.load(tmp_path / "ckpt")
    await aiostage.sweep(tmp_path)
    assert os.listdir(tmp_path) == ["ckpt"]
    await assert_loads(tmp_path / "ckpt", make_sd(2 if new_complete else 1))


# ---------------------------------------------------------------- writes in flight


async def test_the_pipeline_keeps_depth_second_stages_in_flight_and_no_more() -> None:
    running, most, started = 0, 0, []
    full = anyio.Event()

    async def first(slot: int, job: int) -> None:
        await anyio.lowlevel.checkpoint()

    async def second(slot: int, job: int) -> None:
        nonlocal running, most
        started.append(job)
        running += 1
        most = max(most, running)
        if running == 3:
            full.set()
        with anyio.fail_after(10):  # with fewer than 3 at once, the first three never finish
            await full.wait()
        running -= 1

    await pipeline(4, range(12), first, second, depth=3)
    assert most == 3
    assert started == list(range(12))


async def test_a_failed_second_stage_cancels_the_others() -> None:
    ended: list[int] = []

    async def first(slot: int, job: int) -> None:
        await anyio.lowlevel.checkpoint()

    async def second(slot: int, job: int) -> None:
        if job == 1:
            raise OSError(errno.EIO, "boom")
        await anyio.sleep_forever()  # job 0, ends only by cancellation
        ended.append(job)

    with pytest.raises(Exception) as info:  # noqa: PT011 - an ExceptionGroup (3.11+ builtin)
        await pipeline(3, range(5), first, second, depth=2)
    assert [type(e) for e in info.value.exceptions] == [OSError]  # type: ignore[attr-defined]
    assert ended == []


async def test_the_data_file_has_writes_in_flight_at_once(tmp_path: Path) -> None:
    """The second chunk's write is issued while the first is still being written."""
    second_issued = threading.Event()
    issued: list[int] = []  # offsets of the data file's writes, as issued
    overlapped: list[bool] = []

    def first_write(fd: int, data: memoryview) -> int:
        overlapped.append(second_issued.wait(10))  # one write at a time: times out (False)
        return 0  # nothing written yet: the writer writes it all

    def hook(name: str, offset: int, n: int) -> Callable[[int, memoryview], int] | None:
        if not name.endswith(".safetensors"):
            return None
        issued.append(offset)
        if len(issued) == 2:
            second_issued.set()
        return first_write if len(issued) == 1 else None

    localfs.write_hooks.append(hook)
    try:
        await aiostage.save(make_sd(), tmp_path / "ckpt", write_options=SMALL_CHUNKS)
    finally:
        localfs.write_hooks.remove(hook)
    assert overlapped == [True]
    assert len(issued) > 2
    await assert_loads(tmp_path / "ckpt", make_sd())


@pytest.mark.parametrize("direct_io", [True, False])
async def test_short_writes_in_flight_at_once_are_completed(
    tmp_path: Path, direct_io: bool
) -> None:
    options = aiostage.WriteOptions(chunk_bytes=1 << 16, buffers=6, direct_io=direct_io)
    await aiostage.save(make_sd(), tmp_path / "plain")
    with FaultyWrites() as faults:
        faults.short(1, match="*.safetensors", times=None)
        await aiostage.save(make_sd(), tmp_path / "short", write_options=options)
    assert len(faults.injected) > 10
    plain = (tmp_path / "plain" / rank_file(0)).read_bytes()
    assert (tmp_path / "short" / rank_file(0)).read_bytes() == plain


class _InOrder(LocalStorage):
    """The local backend, taking a file's writes one at a time and in order (as an object store
    does), and checking that it gets them so."""

    ordered = True

    def create(self, file: PurePath, *, direct: bool) -> AbstractAsyncContextManager[Sink]:
        return _in_order(super().create(file, direct=direct))


@contextlib.asynccontextmanager
async def _in_order(opened: AbstractAsyncContextManager[Sink]) -> AsyncIterator[Sink]:
    async with opened as sink:
        yield _InOrderSink(sink)


class _InOrderSink:
    def __init__(self, sink: Sink) -> None:
        self.name, self._sink, self._end, self._busy = sink.name, sink, 0, False

    async def write_at(self, offset: int, buf: memoryview, n: int) -> None:
        assert not self._busy, "two writes at once"
        assert offset == self._end, (offset, self._end)
        self._busy = True
        await self._sink.write_at(offset, buf, n)
        self._busy, self._end = False, offset + n

    async def finish(self, size: int) -> None:
        await self._sink.finish(size)


async def test_an_ordered_storage_gets_one_write_at_a_time_in_order(tmp_path: Path) -> None:
    writer = DurableWriter(_InOrder(), aiostage.WriteOptions(chunk_bytes=1 << 16, buffers=4))
    prep = await prepare(make_sd(), None)
    (tmp_path / "ckpt").mkdir()
    written = await writer.write_file(tmp_path / "ckpt" / rank_file(0), prep.header, prep.sources)
    assert written.info.size == (tmp_path / "ckpt" / rank_file(0)).stat().st_size
    await aiostage.save(make_sd(), tmp_path / "plain")
    plain = (tmp_path / "plain" / rank_file(0)).read_bytes()
    assert (tmp_path / "ckpt" / rank_file(0)).read_bytes() == plain


# ---------------------------------------------------------------- the warm path: layouts reused


def _header_bytes(path: Path) -> bytes:
    raw = (path / rank_file(0)).read_bytes()
    return raw[: 8 + int.from_bytes(raw[:8], "little")]


async def test_a_layout_saved_again_gives_the_same_header_as_a_fresh_encoding(
    tmp_path: Path,
) -> None:
    sd = {"a": torch.arange(6.0), "b": {"c": torch.ones(2, 3, dtype=torch.int64)}, "n": 1}
    await aiostage.save(sd, tmp_path / "one")
    await aiostage.save(sd, tmp_path / "two")  # the same layout: its text is reused
    prep = await prepare(sd, None)
    fresh = encode_layout(prep.header)  # no memo: encoded from scratch
    again = _header_bytes(tmp_path / "two")
    assert again == _header_bytes(tmp_path / "one")
    assert len(again) == len(fresh.blob)
    assert again[: fresh.at] == fresh.blob[: fresh.at]  # all before the checksums' digits
    prep.release()
    await prep.free()


@pytest.mark.parametrize(
    ("before", "after"),
    [(1, True), (True, 1), (1, 1.0), (0.0, -0.0), ("x", "y"), (1, 2)],
)
async def test_values_equal_to_python_but_not_in_json_are_not_confused(
    tmp_path: Path, before: Any, after: Any
) -> None:
    # 1 == True == 1.0 and 0.0 == -0.0 in Python; a reused header would write the old value
    sd: dict[str, Any] = {"w": torch.ones(3), "v": before}
    await aiostage.save(sd, tmp_path / "before")
    sd["v"] = after
    await aiostage.save(sd, tmp_path / "after")
    got = (await aiostage.load(tmp_path / "after"))["v"]
    assert type(got) is type(after)
    assert repr(got) == repr(after)


async def test_a_changed_shape_dtype_or_key_is_encoded_anew(tmp_path: Path) -> None:
    layouts = [
        {"w": torch.ones(4), "x": torch.zeros(2)},
        {"w": torch.ones(5), "x": torch.zeros(2)},  # a shape
        {"w": torch.ones(5, dtype=torch.float64), "x": torch.zeros(2)},  # a dtype
        {"v": torch.ones(5, dtype=torch.float64), "x": torch.zeros(2)},  # a key
        {"v": torch.ones(5, dtype=torch.float64), "x": torch.zeros(2).requires_grad_()},
        {"w": torch.ones(4), "x": torch.zeros(2)},  # the first again
    ]
    for i, sd in enumerate(layouts * 2):
        await aiostage.save(sd, tmp_path / str(i))
        out = await aiostage.load(tmp_path / str(i))
        assert out.keys() == sd.keys()
        for k, v in sd.items():
            assert out[k].dtype == v.dtype, (i, k)
            assert torch.equal(out[k], v.detach()), (i, k)
            assert out[k].requires_grad == v.requires_grad, (i, k)


def test_the_memo_keeps_only_its_last_layouts() -> None:
    memo = LayoutMemo(2)
    texts = [memo.tree({"list": [k]}) for k in range(3)]
    assert memo.tree({"list": [2]}) is texts[2]  # kept: the very same text
    assert memo.tree({"list": [1]}) is texts[1]
    assert memo.tree({"list": [0]}) is not texts[0]  # pushed out by the later two
    assert memo.tree({"list": [0]}) == texts[0]
