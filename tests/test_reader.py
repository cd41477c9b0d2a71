"""Loading checkpoints: round trips, aliasing, in-place loads, and every kind of damage."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import struct
import time
from collections.abc import Awaitable, Callable, Coroutine, Generator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import safetensors.torch
import torch

import aiostage
from aiostage._format.codec import MANIFEST, rank_file
from aiostage.errors import CheckpointCorrupt, CheckpointNotFound, StateDictMismatch, UsageError


class Pair(NamedTuple):
    left: torch.Tensor
    right: int


def rich_sd() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(8, 6, generator=gen)
    weight = torch.nn.Parameter(torch.randn(4, 4, generator=gen))
    weight.tag = "encoder"  # type: ignore[attr-defined]
    return {
        "model": {"weight": weight, "bias": torch.randn(4, generator=gen).requires_grad_()},
        "embed": base,
        "head": base,  # tied
        "rows": base[2:5],  # a view
        "cols": base[:, 1],  # a strided view
        "t": torch.randn(3, 5, generator=gen).T,
        "bf16": torch.randn(7, generator=gen).bfloat16(),
        "c128": torch.randn(3, generator=gen, dtype=torch.complex128),
        "mask": torch.rand(9, generator=gen) > 0.5,
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(2.5),
        "nan": torch.tensor([float("nan"), float("inf")]),
        "optim": {"state": {0: {"step": torch.tensor(10.0)}}, "groups": [{"lr": 1e-3, "ids": [0]}]},
        "pair": Pair(torch.arange(3), 4),
        "misc": (None, True, b"\x00", torch.float16, torch.Size([2])),
    }


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (NaNs included) of values, shape, stride and dtype."""
    if (a.shape, a.stride(), a.dtype) != (b.shape, b.stride(), b.dtype):
        return False
    flat_a, flat_b = a.contiguous().reshape(-1), b.contiguous().reshape(-1)
    return bool(torch.equal(flat_a.view(torch.uint8), flat_b.view(torch.uint8)))


async def test_round_trip_keeps_values_wrappers_and_aliasing(tmp_path: Path) -> None:
    sd = rich_sd()
    await aiostage.save(sd, tmp_path / "ckpt")
    out = await aiostage.load(tmp_path / "ckpt")
    for key in (
        "embed",
        "head",
        "rows",
        "cols",
        "t",
        "bf16",
        "c128",
        "mask",
        "empty",
        "scalar",
        "nan",
    ):
        assert same(out[key], sd[key]), key
    w = out["model"]["weight"]
    assert isinstance(w, torch.nn.Parameter)
    assert w.requires_grad
    assert w.tag == "encoder"
    assert out["model"]["bias"].requires_grad
    assert type(out["model"]["bias"]) is torch.Tensor
    ptr = out["embed"].untyped_storage().data_ptr()
    assert out["head"].untyped_storage().data_ptr() == ptr
    assert out["rows"].untyped_storage().data_ptr() == ptr
    out["embed"][3, 0] = 42.0
    assert out["rows"][1, 0] == 42.0
    assert out["head"][3, 0] == 42.0
    assert list(out["optim"]["state"]) == [0]
    assert out["optim"]["groups"] == [{"lr": 1e-3, "ids": [0]}]
    assert out["pair"].right == 4
    assert same(out["pair"].left, torch.arange(3))
    assert out["misc"] == (None, True, b"\x00", torch.float16, torch.Size([2]))


async def test_changing_a_loaded_tensor_never_changes_the_file(tmp_path: Path) -> None:
    await aiostage.save({"x": torch.zeros(1000)}, tmp_path / "ckpt")
    first = await aiostage.load(tmp_path / "ckpt")
    first["x"] += 1
    again = await aiostage.load(tmp_path / "ckpt")
    assert torch.equal(again["x"], torch.zeros(1000))


async def test_other_tools_read_the_plain_tensors(tmp_path: Path) -> None:
    sd = rich_sd()
    await aiostage.save(sd, tmp_path / "ckpt")
    plain = safetensors.torch.load_file(tmp_path / "ckpt" / rank_file(0))
    assert same(plain["model.weight"], sd["model"]["weight"].detach())
    assert same(plain["bf16"], sd["bf16"])
    assert same(plain["optim.state.0.step"], sd["optim"]["state"][0]["step"])
    assert plain["empty"].shape == (0, 4)


async def test_map_location_cpu_device(tmp_path: Path) -> None:
    await aiostage.save({"x": torch.ones(3)}, tmp_path / "ckpt")
    out = await aiostage.load(tmp_path / "ckpt", map_location=torch.device("cpu"))
    assert out["x"].device.type == "cpu"


# ---------------------------------------------------------------- damage


async def saved(tmp_path: Path) -> Path:
    path = tmp_path / "ckpt"
    await aiostage.save({"a": torch.zeros(4096), "b": {"c": torch.ones(1000)}}, path)
    return path


def data_start(file: Path) -> int:
    with file.open("rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def flip(file: Path, offset: int) -> None:
    with file.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))


async def test_a_flipped_data_byte_names_file_and_key(tmp_path: Path) -> None:
    path = await saved(tmp_path)
    file = path / rank_file(0)
    flip(file, data_start(file) + 4 * 4096 + 100)  # inside b.c, stored after a
    with pytest.raises(CheckpointCorrupt, match="checksum mismatch") as info:
        await aiostage.load(path)
    assert info.value.key == "b.c"
    assert info.value.path == file
    assert str(file) in str(info.value)
    out = await aiostage.load(path, verify=False)  # salvage what can be read
    assert torch.equal(out["a"], torch.zeros(4096))


async def test_a_flipped_header_byte_is_corrupt(tmp_path: Path) -> None:
    path = await saved(tmp_path)
    flip(path / rank_file(0), 20)
    with pytest.raises(CheckpointCorrupt, match="header"):
        await aiostage.load(path)


async def test_a_truncated_file_is_corrupt(tmp_path: Path) -> None:
    path = await saved(tmp_path)
    file = path / rank_file(0)
    os.truncate(file, file.stat().st_size - 10)
    with pytest.raises(CheckpointCorrupt, match="manifest says"):
        await aiostage.load(path)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["files"][0]["size"] = file.stat().st_size  # the manifest agrees; the header does not
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointCorrupt, match="offset"):
        await aiostage.load(path, verify=False)


@pytest.mark.parametrize("length", [2**60, 2**63 + 17, 10**12])
async def test_an_absurd_header_length_is_corrupt_without_allocating(
    tmp_path: Path, length: int
) -> None:
    path = await saved(tmp_path)
    with (path / rank_file(0)).open("r+b") as f:
        f.write(struct.pack("<Q", length))
    with pytest.raises(CheckpointCorrupt, match="does not fit"):
        await aiostage.load(path)


async def test_an_absurd_tensor_offset_is_corrupt(tmp_path: Path) -> None:
    path = await saved(tmp_path)
    file = path / rank_file(0)
    blob = file.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    header = blob[8 : 8 + n].replace(
        b'"data_offsets":[0,16384]', b'"data_offsets":[0,1152921504606846976]'
    )
    assert header != blob[8 : 8 + n]
    file.write_bytes(blob[:8] + header + blob[8 + n :])
    with pytest.raises(CheckpointCorrupt, match="offset"):
        await aiostage.load(path, verify=False)


async def test_no_manifest_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = await saved(tmp_path)
    (path / MANIFEST).unlink()
    with pytest.raises(CheckpointNotFound, match="no checkpoint"):
        await aiostage.load(path)
    with pytest.raises(CheckpointNotFound):
        await aiostage.load(tmp_path / "never-saved")
    with pytest.raises(CheckpointNotFound):
        await aiostage.load_metadata(tmp_path / "never-saved")


async def test_a_missing_data_file_is_corrupt(tmp_path: Path) -> None:
    path = await saved(tmp_path)
    (path / rank_file(0)).unlink()
    with pytest.raises(CheckpointCorrupt, match="missing"):
        await aiostage.load(path)


async def test_a_multi_rank_checkpoint_needs_its_world(tmp_path: Path) -> None:
    path = await saved(tmp_path)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["world_size"] = 2
    manifest["files"].append({**manifest["files"][0], "name": rank_file(1)})
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match="2 rank"):
        await aiostage.load(path)


# ---------------------------------------------------------------- loading in place


async def test_into_copies_in_place_and_returns_the_targets(tmp_path: Path) -> None:
    sd = rich_sd()
    await aiostage.save(sd, tmp_path / "ckpt")
    target = rich_sd()
    for t in (target["embed"], target["t"], target["model"]["bias"], target["c128"]):
        t.data.zero_()
    target["model"]["weight"].data.zero_()
    target["optim"]["groups"] = []
    out = await aiostage.load(tmp_path / "ckpt", into=target)
    assert out["embed"] is target["embed"]
    assert out["model"]["weight"] is target["model"]["weight"]
    assert same(target["embed"], sd["embed"])
    assert same(target["t"], sd["t"])
    assert same(target["model"]["weight"].detach(), sd["model"]["weight"].detach())
    assert same(target["c128"], sd["c128"])
    assert out["optim"]["groups"] == [{"lr": 1e-3, "ids": [0]}]  # values come from the file


async def test_into_lists_every_mismatch_before_touching_anything(tmp_path: Path) -> None:
    await aiostage.save(
        {"a": torch.ones(3), "b": torch.ones(2, 2), "c": torch.ones(1), "d": torch.ones(1)},
        tmp_path / "ckpt",
    )
    target = {
        "a": torch.zeros(3),
        "b": torch.zeros(4),
        "c": torch.zeros(1, dtype=torch.int64),
        "e": torch.zeros(1),
    }
    with pytest.raises(StateDictMismatch) as info:
        await aiostage.load(tmp_path / "ckpt", into=target)
    problems = info.value.problems
    assert len(problems) == 4, problems
    text = "\n".join(problems)
    for needle in (
        "missing key e",
        "unexpected key d",
        "shape mismatch at b",
        "dtype mismatch at c",
    ):
        assert needle in text
    assert torch.equal(target["a"], torch.zeros(3))  # nothing was copied


async def test_into_distinguishes_int_and_str_keys(tmp_path: Path) -> None:
    await aiostage.save({"state": {0: torch.ones(1)}}, tmp_path / "ckpt")
    with pytest.raises(StateDictMismatch, match=r"missing key state\.0"):
        await aiostage.load(tmp_path / "ckpt", into={"state": {"0": torch.zeros(1)}})
    target = {"state": {0: torch.zeros(1)}}
    await aiostage.load(tmp_path / "ckpt", into=target)
    assert torch.equal(target["state"][0], torch.ones(1))


# ---------------------------------------------------------------- failing fast (issue 17)


async def test_map_location_on_a_cuda_device_this_process_lacks(tmp_path: Path) -> None:
    """A ``UsageError`` that says so, before anything is read (the path does not even exist);
    ignored with ``into``, as documented."""
    absent = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    with pytest.raises(UsageError, match=rf"map_location='{absent}'.*CUDA device"):
        await aiostage.load(tmp_path / "nothing here", map_location=absent)
    await aiostage.save({"x": torch.ones(3)}, tmp_path / "ckpt")
    target = {"x": torch.zeros(3)}
    await aiostage.load(tmp_path / "ckpt", into=target, map_location=absent)
    assert torch.equal(target["x"], torch.ones(3))


class Suspensions:
    """Await ``coro`` as ``await`` does, calling ``on_suspend(n)`` just before it suspends for
    the n-th time and ``on_resume(n)`` when it is resumed: a cancellation point by point."""

    def __init__(
        self,
        coro: Coroutine[Any, Any, Any],
        on_suspend: Callable[[int], object] = lambda n: None,
        on_resume: Callable[[int], object] = lambda n: None,
    ) -> None:
        self.coro, self.on_suspend, self.on_resume = coro, on_suspend, on_resume

    def __await__(self) -> Generator[Any, Any, Any]:
        n, value, error = 0, None, None
        while True:
            try:
                out = self.coro.send(value) if error is None else self.coro.throw(error)
            except StopIteration as stop:
                return stop.value
            n += 1
            self.on_suspend(n)
            try:
                value, error = (yield out), None
            except BaseException as exc:  # handed to the coroutine, as a task does
                value, error = None, exc
            self.on_resume(n)


def cancel_task_at(k: int) -> Callable[[int], object]:
    """``task.cancel()`` at the k-th suspension, as an ``asyncio.timeout`` expiring there does."""
    return lambda n: n == k and asyncio.current_task().cancel()  # type: ignore[union-attr]


async def run_task(awaitable: Awaitable[Any]) -> asyncio.Task[Any]:
    """Run ``awaitable`` in a task of its own and return the task once it is done."""

    async def body() -> Any:
        return await awaitable

    task = asyncio.ensure_future(body())
    await asyncio.wait([task])
    return task


async def test_a_cancelled_load_leaves_into_untouched_or_fully_loaded(tmp_path: Path) -> None:
    """Cancelled at each of its suspensions in turn, a load into ``into`` raises with ``into``
    as it was or completely loaded, and nothing writes to it afterwards."""
    sd = {"a": torch.arange(8.0), "c": torch.arange(1000.0)}
    await aiostage.save({**sd, "n": 3}, tmp_path / "ckpt")
    seen: list[tuple[dict[str, torch.Tensor], bool]] = []
    for k in itertools.count(1):
        into = {"a": torch.zeros(8), "c": torch.zeros(1000)}
        load = aiostage.load(tmp_path / "ckpt", into=into)
        task = await run_task(Suspensions(load, on_suspend=cancel_task_at(k)))
        if not task.cancelled():
            assert task.result()["n"] == 3
            break
        loaded = {torch.equal(into[key], sd[key]) for key in sd}
        untouched = not any(t.any() for t in into.values())
        assert loaded == {True} or untouched, f"cancelled at suspension {k}: half loaded"
        seen.append((into, loaded == {True}))
    assert k > 10, f"the load suspended only {k - 1} times"
    for into, full in seen:  # still as the cancellation left it
        assert all(torch.equal(into[key], sd[key] if full else 0 * sd[key]) for key in sd)


async def test_a_load_cancelled_while_copying_completes_the_copy_first(tmp_path: Path) -> None:
    """The cancellation lands while the worker thread copies: ``into`` is complete by the time
    it surfaces (and no thread goes on writing into it)."""
    sd = {"a": torch.ones(8), **{f"big{i}": torch.full((4 << 20,), i + 2.0) for i in range(4)}}
    await aiostage.save(sd, tmp_path / "ckpt")

    def fresh() -> dict[str, torch.Tensor]:
        return {k: torch.zeros_like(v) for k, v in sd.items()}

    first, copying = fresh(), list[int]()

    def on_resume(n: int) -> None:
        if not copying and first["a"][0]:
            copying.append(n)

    await Suspensions(aiostage.load(tmp_path / "ckpt", into=first), on_resume=on_resume)
    [k] = copying  # the copy ran while the load was suspended for the k-th time

    into = fresh()

    def cancel_mid_copy(n: int) -> None:
        if n == k:
            deadline = time.monotonic() + 30
            while not into["a"][0]:  # the worker thread has begun: cancel while it copies
                assert time.monotonic() < deadline, f"no copy began at suspension {k}"
                time.sleep(0)
            asyncio.current_task().cancel()  # type: ignore[union-attr]

    load = aiostage.load(tmp_path / "ckpt", into=into)
    task = await run_task(Suspensions(load, on_suspend=cancel_mid_copy))
    assert task.cancelled()
    unfinished = [key for key, v in sd.items() if not torch.equal(into[key], v)]
    assert not unfinished, f"the cancellation surfaced with {unfinished} not yet copied"
