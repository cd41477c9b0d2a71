"""Writing a version's data region while it is sent: every entry a sender reads is written."""

from __future__ import annotations

import threading
from functools import partial
from typing import Any

import anyio
import anyio.to_thread
import pytest
import torch

from aiostage._channel.fill import Fill, Filling, write_hashed
from aiostage._channel.versions import Snapshots
from aiostage._format.codec import Entry
from aiostage._replication.frames import frame_sources, plan_cpu_frame, rebuild
from aiostage._storage.digests import source_digests


def _state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.randn(17 + 1000 * i, generator=g) for i in range(6)}


def _fill(state: dict[str, Any]) -> tuple[Fill, Filling, torch.Tensor]:
    planned = plan_cpu_frame(state)
    data = torch.zeros(planned.header.data_bytes, dtype=torch.uint8)
    fill = Fill(planned.header, planned.sources, data)
    return fill, Filling(fill, frame_sources(planned.header, data)), data


def _expected(state: dict[str, Any]) -> list[torch.Tensor]:
    planned = plan_cpu_frame(state)
    data = torch.zeros(planned.header.data_bytes, dtype=torch.uint8)
    Fill(planned.header, planned.sources, data).run()
    return [src.clone() for src, _ in frame_sources(planned.header, data)]


def test_a_reader_started_before_the_copy_reads_every_entry_written() -> None:
    state = _state(1)
    fill, outgoing, _ = _fill(state)
    seen: list[torch.Tensor] = []
    reader = threading.Thread(target=lambda: seen.extend(src.clone() for src, _ in outgoing))
    reader.start()  # blocks on the first entry until the copy writes it
    fill.run()
    reader.join()
    assert fill.finished
    assert len(seen) == len(_expected(state))
    assert all(torch.equal(a, b) for a, b in zip(seen, _expected(state), strict=True))
    assert any(b.any() for b in seen)  # not all zeros: the bytes were there when read


def test_a_failed_copy_fails_the_readers_of_what_it_did_not_write() -> None:
    planned = plan_cpu_frame(_state(2))
    sources = list(planned.sources)
    src, pad = sources[3]
    sources[3] = (torch.empty(src.shape, dtype=src.dtype, device="meta"), pad)  # no bytes
    data = torch.zeros(planned.header.data_bytes, dtype=torch.uint8)
    fill = Fill(planned.header, sources, data)
    outgoing = Filling(fill, frame_sources(planned.header, data))
    with pytest.raises(NotImplementedError):
        fill.run()
    assert not fill.finished
    written = outgoing[2]  # written before the failure: handed out
    assert torch.equal(written[0], frame_sources(planned.header, data)[2][0])
    with pytest.raises(RuntimeError, match="copy of this version failed"):
        _ = outgoing[3]
    with pytest.raises(RuntimeError):
        _ = outgoing[1:]  # a slice waits for its last entry


def test_an_abandoned_copy_fails_its_readers_and_a_finished_one_does_not() -> None:
    fill, outgoing, _ = _fill(_state(3))
    fill.abandon("stopped")
    with pytest.raises(RuntimeError, match="stopped"):
        _ = outgoing[0]
    done, outgoing, _ = _fill(_state(3))
    done.run()
    done.abandon("too late")  # nothing left to abandon
    assert len(list(outgoing)) == len(outgoing)


async def test_a_version_is_sendable_before_its_copy_and_the_same_after() -> None:
    snaps = Snapshots(shared=False)
    try:
        state = _state(4)
        snap = await snaps.prepare(state, 1, 1)
        assert snap.fill is not None
        before = snap.outgoing
        assert isinstance(before, Filling)  # not written yet: reads wait
        assert not snap.written.is_set()
        got: list[torch.Tensor] = []

        def read() -> None:
            got.extend(src.clone() for src, _ in snap.outgoing)

        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, read)
            await snaps.fill(snap)
        assert snap.written.is_set()
        assert snap.outgoing is snap.sources  # written: plain sources, nothing waits
        assert all(torch.equal(a, b) for a, b in zip(got, _expected(state), strict=True))
        data = snap.flat.data[: snap.header.data_bytes] if snap.flat is not None else None
        assert data is not None
        rebuilt = rebuild(snap.header, data, None, 0, (0, None))
        assert all(torch.equal(rebuilt[k], state[k]) for k in state)
    finally:
        await snaps.aclose()


async def test_a_cancelled_copy_still_finishes() -> None:
    snaps = Snapshots(shared=False)
    try:
        state = _state(5)
        snap = await snaps.prepare(state, 1, 1)
        with anyio.CancelScope() as scope:
            scope.cancel()
            await snaps.fill(snap)  # shielded: sends may already read it
        assert snap.fill is not None
        assert snap.fill.finished
        assert snap.written.is_set()
    finally:
        await snaps.aclose()


def test_an_entry_hashed_as_it_is_copied_has_its_digest_on_the_wire() -> None:
    state = {"big": torch.arange(10_001, dtype=torch.int16), "small": torch.ones(3)}
    planned = plan_cpu_frame(state)
    data = torch.full((planned.header.data_bytes,), 0xAB, dtype=torch.uint8)  # dirty buffer
    for k, (entry, source) in enumerate(zip(planned.header.entries, planned.sources, strict=True)):
        got = write_hashed(data, entry, source, chunk=4096)  # the big one in several chunks
        assert got == source_digests([source])[0], planned.header.entries[k].name
    rebuilt = rebuild(planned.header, data, None, 0, (0, None))
    assert all(torch.equal(rebuilt[k], state[k]) for k in state)
    padded = (torch.arange(10_001, dtype=torch.int64).to(torch.uint8), 7)  # padding: zeroed
    region = torch.full((10_008,), 0xAB, dtype=torch.uint8)
    got = write_hashed(region, Entry("p", "U8", (10_001,), 0, 10_008), padded, chunk=4096)
    assert got == source_digests([padded])[0]
    assert not region[10_001:].any()


def _snapshot(seen: list[torch.Tensor], region: torch.Tensor) -> None:
    seen.append(region.clone())


def test_an_entry_is_told_written_once_all_its_bytes_are_in_and_before_its_hash_returns() -> None:
    src = torch.arange(9_000, dtype=torch.int64).to(torch.uint8)
    for source, end in (((src, 5), 9_005), ((src[:0], 3), 3), ((src[:0], 0), 0)):
        region = torch.full((end,), 0xAB, dtype=torch.uint8)
        seen: list[torch.Tensor] = []
        entry = Entry("e", "U8", (source[0].numel(),), 0, end)
        got = write_hashed(
            region, entry, source, chunk=4096, written=partial(_snapshot, seen, region)
        )
        assert len(seen) == 1
        assert torch.equal(seen[0][: source[0].numel()], source[0])  # every byte was in
        assert not seen[0][source[0].numel() :].any()  # and the padding zeroed
        assert got == source_digests([source])[0]


async def test_a_verified_version_is_hashed_by_its_copy_and_not_read_again() -> None:
    state = _state(6)
    snaps, plain = Snapshots(shared=False, verify=True), Snapshots(shared=False, verify=False)
    try:
        snap = await snaps.prepare(state, 1, 1)
        assert snap.fill is not None
        assert snap.fill.digests is None  # not copied yet
        await snaps.fill(snap)
        assert snap.digests == source_digests(plan_cpu_frame(state).sources)
        assert await snaps.digests(snap) is snap.digests  # no second read
        unverified = await plain.prepare(state, 1, 1)
        await plain.fill(unverified)
        assert unverified.fill is not None
        assert unverified.fill.digests is None
        assert await plain.digests(unverified) is None
    finally:
        await snaps.aclose()
        await plain.aclose()
