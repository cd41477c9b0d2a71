"""Transport and frames without a world: partners, message plans, header checks, local round
trips, and the stager's parts (planned frames, held buffers, the guard, the replica writes)."""

from __future__ import annotations

import json
import struct
import threading
import tracemalloc
import weakref
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import aiostage
from aiostage._format.codec import MAX_DATA, MAX_HEADER, encode_header
from aiostage._replication import frames
from aiostage._replication.frames import (
    Frame,
    NeedsStaging,
    Planned,
    frame_sources,
    plan_cpu_frame,
    plan_frame,
    rebuild,
)
from aiostage._replication.guard import Breaker
from aiostage._replication.held import HeldReplicas
from aiostage._replication.receive import ReceiveBuffers
from aiostage._replication.replicas import ReplicaWrites
from aiostage._replication.transport import partners
from aiostage._replication.wire import (
    MAGIC,
    PARSE_BUDGET,
    Limits,
    Packs,
    check_head,
    decode_frame_header,
    limits_like,
    limits_of,
    messages,
    parse_cost,
    plan_messages,
    spans,
    unknown_limits,
)
from aiostage._storage.digests import source_digests
from aiostage.errors import ReplicationError, ReplicationTimeout, UsageError


@pytest.mark.parametrize(
    ("world", "expected"),
    [
        (1, [(0, 0)]),
        (2, [(1, 1), (0, 0)]),
        (3, [(1, 2), (2, 0), (0, 1)]),
        (4, [(2, 2), (3, 3), (0, 0), (1, 1)]),
    ],
)
def test_partners(world: int, expected: list[tuple[int, int]]) -> None:
    assert [partners(r, world) for r in range(world)] == expected


def test_partner_override_and_bad_ranks() -> None:
    assert partners(0, 4, partner=3) == (3, 3)
    with pytest.raises(ValueError, match="partner"):
        partners(0, 4, partner=0)
    with pytest.raises(ValueError, match="rank 5"):
        partners(5, 4)


@given(st.lists(st.integers(0, 3000), max_size=40))
def test_message_ranges_tile_the_data_region(sizes: list[int]) -> None:
    spans, at = [], 0
    for n in sizes:
        spans.append((at, at + n))
        at += n
    ranges = plan_messages(spans, bucket=4096, small=1024)
    covered = 0
    for a, b in ranges:
        assert a == covered
        assert 0 < b - a <= max(4096, max(sizes, default=0))
        covered = b
    assert covered == at


def test_large_entries_go_alone_and_small_ones_share() -> None:
    spans = [(0, 10), (10, 20), (20, 5020), (5020, 5030)]
    assert plan_messages(spans, bucket=4096, small=1024) == [
        (0, 20),
        (20, 4116),
        (4116, 5020),
        (5020, 5030),
    ]


def _packed(state: dict[str, Any], packs: Packs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The data region of ``state``'s frame as its messages would rebuild it, and the packing
    buffers ``packs`` gave them."""
    planned = plan_cpu_frame(state)
    ranges = plan_messages(spans(planned.header), bucket=4096, small=1024)
    taken: list[torch.Tensor] = []

    def pack(n: int) -> torch.Tensor:
        taken.append(packs.take(n))
        return taken[-1]

    data = torch.empty(planned.header.data_bytes, dtype=torch.uint8)
    for (a, b), m in zip(
        ranges, messages(planned.header, planned.sources, ranges, pack), strict=True
    ):
        data[a:b].copy_(m)
    return data, taken


def test_packing_buffers_are_reused_only_once_their_frame_is_done() -> None:
    packs = Packs()
    state = {f"t{i}": torch.full((10 + i,), float(i)) for i in range(40)}
    first, taken = _packed(state, packs)
    again, meanwhile = _packed(state, packs)  # the first frame's sends are not done yet
    assert taken
    assert {t.data_ptr() for t in taken}.isdisjoint(t.data_ptr() for t in meanwhile)
    packs.keep(taken)
    state = {k: v + 100 for k, v in state.items()}  # new bytes, the same layout
    second, reused = _packed(state, packs)
    assert [t.data_ptr() for t in reused] == [t.data_ptr() for t in taken]
    planned = plan_cpu_frame(state)
    for e, (src, _) in zip(planned.header.entries, planned.sources, strict=True):
        assert torch.equal(second[e.begin : e.begin + src.numel()], src), e.name
    assert torch.equal(first, again)
    assert not torch.equal(first, second)


#: limits a receiver might hold a peer to: 1 TiB of data, a 1 MiB header
LIMITS = Limits(1 << 40, 1 << 20, 1 << 30, "a test")


@pytest.mark.parametrize(
    ("head", "message"),
    [
        ((0x1234, 1, 4096, 0, 0), "not an aiostage frame"),
        ((MAGIC, 2, 4096, 0, 0), "wire version 2"),
        ((MAGIC, 1, 1 << 40, 0, 0), "a header of 1099511627776 bytes is more than"),
        ((MAGIC, 1, (1 << 20) + 4096, 0, 0), "(1048576 bytes: a test)"),
        ((MAGIC, 1, 4095, 0, 0), "header length"),
        ((MAGIC, 1, 4096, -1, 0), "data length"),
        ((MAGIC, 1, 4096, 1 << 50, 0), "data of 1125899906842624 bytes is more than"),
        ((MAGIC, 1, 4096, (1 << 40) + 1, 0), "pass max_bytes="),
        ((MAGIC, 1, 4096, 0, -3), "entries"),
    ],
)
def test_frame_heads_are_bounded_before_allocation(
    head: tuple[int, int, int, int, int], message: str
) -> None:
    problem = check_head(*head, limits=LIMITS)
    assert problem is not None
    assert message in problem
    assert check_head(MAGIC, 1, 1 << 20, 1 << 40, 3, LIMITS) is None  # the limits themselves


def test_limits_follow_this_ranks_own_state_or_the_callers_bound() -> None:
    header = plan_cpu_frame({"w": torch.zeros(1000), "step": 3}).header
    raw = encode_header(header)
    like = limits_like(raw, header.data_bytes)
    assert like.data == 2 * header.data_bytes + (64 << 20)
    assert like.header == 2 * len(raw) + (64 << 10)
    assert like.parse == 2 * parse_cost(raw) + (16 << 20)
    assert "this rank's own state" in like.why
    given = limits_of(5 << 30)
    assert (given.data, given.header, given.parse) == (5 << 30, MAX_HEADER + 8, PARSE_BUDGET)
    assert limits_of(10).header == 4096  # a header is a page at least
    unknown = unknown_limits()
    assert 0 < unknown.data <= MAX_DATA
    assert (unknown.header, unknown.why) == (MAX_HEADER + 8, "this host's memory")


def test_the_parse_cost_is_above_what_parsing_takes() -> None:
    """The estimate is an upper bound on the Python objects ``json`` builds (checked with
    tracemalloc on a real header and on the worst shapes a peer could send)."""
    state = {f"layer{i}.w": torch.zeros(2, 2) for i in range(300)}
    real = encode_header(plan_cpu_frame(state).header)
    shapes = [real, b"[" + b",".join([b"[]"] * 20_000) + b"]"]
    shapes += [b"[" + b",".join([b'{"":0}'] * 20_000) + b"]", b"[" + b"1.5," * 20_000 + b"0]"]
    for body in shapes:
        tracemalloc.start()
        try:
            json.loads(body[8:] if body is real else body)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert parse_cost(body) >= peak, (body[:40], parse_cost(body), peak)
    assert parse_cost(shapes[1]) > 40 * len(shapes[1])  # 45 bytes per 3: refused early


def test_a_header_over_its_parse_budget_is_refused_before_parsing() -> None:
    body = (b"[" + b",".join([b"[]"] * 20_000) + b"]").ljust(61436, b" ")
    raw = struct.pack("<Q", len(body)) + body
    with pytest.raises(ReplicationError, match=r"could take .* bytes of memory") as caught:
        decode_frame_header(raw, 0, 0, 3, budget=1 << 20)
    assert (caught.value.peer, caught.value.phase) == (3, "header")
    with pytest.raises(ReplicationError, match="bad header"):  # within the budget: parsed
        decode_frame_header(raw, 0, 0, 3, budget=1 << 30)


def test_a_pickle_header_is_refused_without_unpickling() -> None:
    body = b"\x80\x04\x95cos\nsystem\n(S'echo pwned'\ntR."
    raw = struct.pack("<Q", 4088) + body.ljust(4088, b" ")
    with pytest.raises(ReplicationError, match=r"peer rank 3, header: .*bad header") as caught:
        decode_frame_header(raw, 0, 0, 3)
    assert caught.value.peer == 3
    assert caught.value.phase == "header"


def test_error_tree() -> None:
    err = ReplicationTimeout("late", peer=2, phase="data")
    assert isinstance(err, ReplicationError)
    assert isinstance(err, TimeoutError)
    assert str(err) == "peer rank 2, data: late"


def _landed(planned: Planned) -> Frame:
    """The frame ``planned`` arrives as: its header re-decoded, its bytes in one buffer."""
    header = planned.header
    data = torch.zeros(header.data_bytes, dtype=torch.uint8)
    for e, (src, _pad) in zip(header.entries, planned.sources, strict=True):
        data[e.begin : e.begin + src.numel()] = src
    header = decode_frame_header(encode_header(header), header.data_bytes, len(header.entries), 1)
    return Frame(header, data, None)


def _local_trip(sd: Any) -> Any:
    """Lay ``sd`` out as a frame, put its bytes in one buffer, and rebuild it."""
    planned = plan_cpu_frame(sd)
    frame = _landed(planned)
    return rebuild(frame.header, frame.data, planned.tree, 1, (0, None))


def test_a_frame_rebuilds_with_aliasing_and_values() -> None:
    w = torch.randn(6, 4)
    sd: dict[str, Any] = {"w": w, "tied": w, "t": w.t(), "row": w[1]}
    sd["p"] = torch.nn.Parameter(torch.ones(3))
    sd |= {"bf": torch.arange(5).to(torch.bfloat16), "step": 7, "name": "x", "e": torch.empty(0)}
    out = _local_trip(sd)
    for k in ("w", "tied", "t", "row", "bf", "e"):
        assert torch.equal(out[k], sd[k]), k
    assert isinstance(out["p"], torch.nn.Parameter)
    assert out["tied"].data_ptr() == out["w"].data_ptr()
    assert out["t"].untyped_storage().data_ptr() == out["w"].untyped_storage().data_ptr()
    assert (out["step"], out["name"]) == (7, "x")


async def test_without_a_group_stage_is_a_staged_copy() -> None:
    sd = {"w": torch.randn(3)}
    async with aiostage.ReplicationStager() as stager:
        copy = await stager.stage(sd)
        assert torch.equal(copy["w"], sd["w"])
        assert copy["w"].data_ptr() != sd["w"].data_ptr()
        stager.release(copy)
        assert await stager.recover(lost=False) is None
        with pytest.raises(ReplicationError, match="recover"):
            await stager.recover(lost=True)


def test_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="timeout"):
        aiostage.ReplicationStager(timeout=0)


def test_a_cpu_state_is_planned_in_place_and_a_snapshot_request_needs_staging() -> None:
    sd: dict[str, Any] = {"w": torch.arange(6.0), "step": 3}
    planned = plan_frame(sd)
    assert isinstance(planned, Planned)
    (src, _), *_ = planned.sources
    assert src.data_ptr() == sd["w"].data_ptr()  # sent from the tensor's own memory
    assert [leaf.path for leaf in planned.tree.leaves] == [("w",)]
    assert isinstance(plan_frame(sd, False), NeedsStaging)


def test_a_staged_copy_off_the_cpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU-only machine has no other device; stand in for a tensor elsewhere."""
    monkeypatch.setattr(frames, "plan_frame", lambda state, in_place=True: NeedsStaging())
    with pytest.raises(ValueError, match="not in CPU memory"):
        plan_cpu_frame({"w": torch.ones(2)})


def test_a_frame_gives_its_entries_as_sources() -> None:
    frame = _landed(plan_cpu_frame({"a": torch.ones(3), "b": torch.zeros(2, dtype=torch.int64)}))
    got = frame.sources()
    assert len(got) == len(frame.header.entries) == 2
    for (mine, pad), (theirs, _) in zip(got, frame_sources(frame.header, frame.data), strict=True):
        assert pad == 0
        assert mine.data_ptr() == theirs.data_ptr()
        assert mine.numel() == theirs.numel()


async def test_receive_buffers_reuse_idle_ones_and_keep_two() -> None:
    bufs = ReceiveBuffers()
    a = await bufs.get(64, "receiving")
    b = await bufs.get(64, "receiving")  # a is busy: a second buffer
    assert a is not b
    assert bufs.allocations == 2
    bufs.hold(a, "latest")
    bufs.drop(a, "receiving")
    bufs.drop(b, "receiving")
    assert await bufs.get(64, "receiving") is b  # idle and the same size: reused
    bufs.drop(b, "receiving")
    c = await bufs.get(32, "receiving")  # another size: b (idle) makes room, a is still held
    assert bufs.allocations == 3
    assert [d.data_ptr() for d, _ in bufs.held] == [a.data_ptr(), c.data_ptr()]
    bufs.drop(a, "latest")
    assert await bufs.get(64, "leased") is a


async def test_held_replicas_lease_keep_and_release() -> None:
    held = HeldReplicas()
    first = Frame(*_received(await held.receive_into(16)))
    out = {"x": first.data[:4]}
    held.lease(out, first)
    held.keep_latest(first)
    kept = held.latest
    assert kept is first
    second = Frame(*_received(await held.receive_into(16)))
    assert second.data is not first.data  # first is leased and kept
    held.unused(second)  # its rebuild failed: its buffer is free again
    assert await held.receive_into(16) is second.data
    held.buffers.drop(second.data, "receiving")
    held.release(out)
    with pytest.raises(UsageError, match="did not return"):
        held.release(out)  # twice
    with pytest.raises(UsageError, match="did not return"):
        held.release({"x": first.data[:4]})  # never leased
    third = Frame(*_received(await held.receive_into(16)))
    held.keep_latest(third)  # first is no longer held by anything
    latest = held.latest
    assert latest is third
    assert {id(d): why for d, why in held.buffers.held}[id(first.data)] == set()
    held.clear()
    assert held.latest is None
    assert held.buffers.held == []


#: the header of a small frame (planned here, not on the event loop: planning is thread work)
_HEADER = plan_cpu_frame({"x": torch.zeros(4)}).header


def _received(data: torch.Tensor) -> tuple[Any, torch.Tensor, None]:
    return _HEADER, data, None


async def test_the_guard_turns_a_timeout_into_a_broken_stager() -> None:
    breaker = Breaker(rank=3, timeout=0.05)
    breaker.check()
    with pytest.raises(ReplicationTimeout, match=r"within 0\.05 s") as caught:
        async with breaker.guard(1, "exchange"):
            await anyio.sleep(5)
    assert (caught.value.peer, caught.value.phase) == (1, "exchange")
    with pytest.raises(ReplicationError, match=r"broken \(rank 3: exchange failed") as broken:
        breaker.check()
    assert broken.value.phase == "broken"


async def test_the_guard_names_the_failing_peer_and_phase() -> None:
    breaker = Breaker(rank=0, timeout=10)
    with pytest.raises(ReplicationError, match="boom") as caught:
        async with breaker.guard(1, "recover"):
            raise OSError("boom")
    assert (caught.value.peer, caught.value.phase) == (1, "recover")
    assert isinstance(caught.value.__cause__, OSError)
    breaker = Breaker(rank=0, timeout=10)
    with pytest.raises(ReplicationError, match="bad bytes") as caught:
        async with breaker.guard(1, "exchange"), anyio.create_task_group() as tg:
            tg.start_soon(_fail, ReplicationError("bad bytes", peer=2, phase="verify"))
    assert (caught.value.peer, caught.value.phase) == (2, "verify")
    assert breaker.broken is not None


async def _fail(exc: BaseException) -> None:
    await anyio.lowlevel.checkpoint()
    raise exc


async def test_replica_writes_persist_and_report_a_digest_mismatch(tmp_path: Path) -> None:
    planned = await anyio.to_thread.run_sync(plan_cpu_frame, {"w": torch.arange(8.0)})
    frame = _landed(planned)
    good = Frame(frame.header, frame.data, source_digests(frame.sources()))
    bufs = ReceiveBuffers()
    writes = ReplicaWrites(tmp_path / "replica", 1, {"replica_of": 1}, bufs)
    await writes.check()  # nothing written yet: nothing to report
    async with anyio.create_task_group() as tg:
        writes.start(tg, good)
    await writes.check()
    back = await aiostage.load(tmp_path / "replica")
    assert torch.equal(back["w"], torch.arange(8.0))
    assert await aiostage.load_metadata(tmp_path / "replica") == {"replica_of": 1}
    bad = Frame(frame.header, frame.data, [d ^ 1 for d in good.digests or ()])
    async with anyio.create_task_group() as tg:
        writes.start(tg, bad)
    with pytest.raises(ReplicationError, match="persisting the replica failed") as caught:
        await writes.check()
    assert (caught.value.peer, caught.value.phase) == (1, "verify")
    assert torch.equal((await aiostage.load(tmp_path / "replica"))["w"], torch.arange(8.0))


async def test_a_receive_buffer_of_another_size_is_freed_off_the_loop() -> None:
    from aiostage._replication.receive import ReceiveBuffers

    buffers, freed_in = ReceiveBuffers(), []
    first = await buffers.get(1 << 20, "receiving")
    weakref.finalize(first, lambda: freed_in.append(threading.current_thread()))
    second = await buffers.get(2 << 20, "receiving")
    buffers.drop(first, "receiving")
    buffers.drop(second, "receiving")
    del first
    third = await buffers.get(3 << 20, "receiving")  # two kept and idle: the older one goes
    assert third.numel() == 3 << 20
    assert len(freed_in) == 1
    assert freed_in[0] is not threading.current_thread()  # not on the loop: unmapping takes time
