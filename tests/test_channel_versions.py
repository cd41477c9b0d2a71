"""The publisher's staged versions without a world: private and shared-memory pools of two."""

from __future__ import annotations

import threading
import weakref
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
import torch

from aiostage._channel import versions
from aiostage._channel.versions import Snapshot, Snapshots
from aiostage._replication.frames import rebuild
from aiostage._storage.digests import source_digests
from aiostage.errors import ClosedError


def _state(seed: int, n: int = 64) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g)
    return {"w": w, "tied": w, "half": torch.randn(3, generator=g).half(), "step": seed}


def _received(snap: Snapshot) -> Any:
    """The state dict a subscriber rebuilds from ``snap``'s frame."""
    data = torch.zeros(snap.header.data_bytes, dtype=torch.uint8)
    for e, (src, pad) in zip(snap.header.entries, snap.sources, strict=True):
        data[e.begin : e.begin + src.numel()] = src
        assert e.begin + src.numel() + pad == e.end
    return rebuild(snap.header, data, None, 0, (0, None))


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (
        torch.equal(a["w"], b["w"])
        and torch.equal(a["half"], b["half"])
        and a["step"] == b["step"]
        and b["tied"].data_ptr() == b["w"].data_ptr()
    )


@pytest.fixture(params=[False, True], ids=["private", "shared"])
async def snaps(request: pytest.FixtureRequest) -> AsyncIterator[Snapshots]:
    pool = Snapshots(shared=request.param)
    yield pool
    await pool.aclose()


def _memory(snap: Snapshot) -> int:
    """Where ``snap``'s bytes live: its region, or its private buffer."""
    buffer = snap.region or snap.flat
    assert buffer is not None
    return buffer.data.data_ptr()


async def test_a_version_is_a_copy_its_frame_rebuilds(snaps: Snapshots) -> None:
    sd = _state(1)
    snap = await snaps.stage(sd, version=3, seq=8)
    assert (snap.version, snap.seq, snap.users) == (3, 8, 0)
    assert (snap.region is not None) == snaps.shared
    assert (snap.flat is not None) != snaps.shared
    sd["w"].add_(1)  # the trainer moves on: the version does not
    got = _received(snap)
    assert _same(got, _state(1))
    for src, _ in snap.sources:
        assert src.untyped_storage().data_ptr() != sd["w"].untyped_storage().data_ptr()


async def test_each_version_is_hashed_once_for_every_subscriber(
    snaps: Snapshots, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def counting(sources: Any) -> list[int]:
        calls.append(len(sources))
        return source_digests(sources)

    monkeypatch.setattr(versions, "source_digests", counting)
    snap = await snaps.stage(_state(2), 1, 1)
    assert snap.digests == source_digests(snap.sources)  # hashed as it was copied in
    got: list[list[int] | None] = []

    async def send() -> None:
        got.append(await snaps.digests(snap))

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(send)
    assert calls == []  # its bytes are not read again
    assert got == [source_digests(snap.sources)] * 3
    assert snap.digests == got[0]


async def test_without_verify_there_are_no_digests() -> None:
    snaps = Snapshots(shared=False, verify=False)
    try:
        snap = await snaps.stage(_state(3), 1, 1)
        assert await snaps.digests(snap) is None
        assert snap.digests is None
    finally:
        await snaps.aclose()


async def test_a_third_version_waits_for_a_release_and_reuses_its_buffer(
    snaps: Snapshots,
) -> None:
    first = await snaps.stage(_state(1), 1, 1)
    second = await snaps.stage(_state(2), 2, 2)
    assert _memory(first) != _memory(second)
    third: list[Snapshot] = []

    async def stage() -> None:
        third.append(await snaps.stage(_state(3), 3, 3))

    async with anyio.create_task_group() as tg:
        tg.start_soon(stage)
        await anyio.wait_all_tasks_blocked()
        assert not third  # both buffers are in use
        snaps.release(first)
    assert _memory(third[0]) == _memory(first)
    assert _same(_received(third[0]), _state(3))
    assert _same(_received(second), _state(2))  # untouched


async def test_release_is_once(snaps: Snapshots) -> None:
    snap = await snaps.stage(_state(1), 1, 1)
    snaps.release(snap)
    assert snap.released
    snaps.release(snap)  # a second release is a no-op, not a double give-back
    a = await snaps.stage(_state(2), 2, 2)
    b = await snaps.stage(_state(3), 3, 3)
    assert _memory(a) != _memory(b)


async def test_a_poisoned_buffer_is_never_reused(snaps: Snapshots) -> None:
    snap = await snaps.stage(_state(1), 1, 1)
    snaps.poison(snap)
    snaps.release(snap)  # an abandoned send may still read it: never handed back
    assert snap.poisoned
    assert not snap.released
    later = [await snaps.stage(_state(i), i, i) for i in (2, 3)]  # two buffers still
    assert all(_memory(s) != _memory(snap) for s in later)
    assert _same(_received(snap), _state(1))
    assert (snap.region or snap.flat) not in snaps.regions


async def test_a_region_too_small_makes_room() -> None:
    snaps = Snapshots(shared=True)
    try:
        small = [await snaps.stage(_state(i, n=8), i, i) for i in (1, 2)]
        for s in small:
            snaps.release(s)
        big = await snaps.stage(_state(3, n=4096), 3, 3)
        assert big.region is not None
        assert big.region.nbytes >= big.header.data_bytes
        assert len(snaps.regions) == 2
        assert _same(_received(big), _state(3, n=4096))
        fits = await snaps.stage(_state(4, n=8), 4, 4)  # the small region left is reused
        assert fits.region is small[1].region
    finally:
        await snaps.aclose()


async def test_a_buffer_too_small_is_freed_off_the_loop() -> None:
    snaps, freed_in = Snapshots(shared=False), []
    try:
        small = [await snaps.stage(_state(i, n=8), i, i) for i in (1, 2)]
        for s in small:
            snaps.release(s)
        weakref.finalize(small[0].flat, lambda: freed_in.append(threading.current_thread()))
        del small, s
        await snaps.stage(_state(3, n=4096), 3, 3)
        assert len(freed_in) == 1
        assert freed_in[0] is not threading.current_thread()  # not on the loop
    finally:
        await snaps.aclose()


async def test_aclose_frees_every_buffer() -> None:
    snaps = Snapshots(shared=False)
    snap = await snaps.stage(_state(1), 1, 1)
    stager = snaps.stager
    snaps.poison(snap)
    await snaps.aclose()
    for closed in (stager, snaps.stager):
        with pytest.raises(ClosedError):
            await closed.stage(_state(2))
    shared = Snapshots(shared=True)
    await shared.stage(_state(1), 1, 1)
    await shared.aclose()
    assert shared.regions == []
