"""Transport and frames without a world: partners, message plans, header checks, local round trips."""

from __future__ import annotations

import struct
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import aiostage
from aiostage._format.codec import encode_header
from aiostage._replication.frames import outgoing, rebuild
from aiostage._replication.transport import partners
from aiostage._replication.wire import MAGIC, check_head, decode_frame_header, plan_messages
from aiostage.errors import ReplicationError, ReplicationTimeout


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


@pytest.mark.parametrize(
    ("head", "message"),
    [
        ((0x1234, 1, 4096, 0, 0), "not an aiostage frame"),
        ((MAGIC, 2, 4096, 0, 0), "wire version 2"),
        ((MAGIC, 1, 1 << 40, 0, 0), "header length"),
        ((MAGIC, 1, 4095, 0, 0), "header length"),
        ((MAGIC, 1, 4096, -1, 0), "data length"),
        ((MAGIC, 1, 4096, 1 << 50, 0), "data length"),
        ((MAGIC, 1, 4096, 0, -3), "entries"),
    ],
)
def test_frame_heads_are_bounded_before_allocation(
    head: tuple[int, int, int, int, int], message: str
) -> None:
    problem = check_head(*head, max_data=1 << 40)
    assert problem is not None
    assert message in problem


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


def _local_trip(sd: Any) -> Any:
    """Lay ``sd`` out as a frame, put its bytes in one buffer, and rebuild it."""
    planned = outgoing(sd)
    assert planned is not None
    tree, header, sources = planned
    data = torch.zeros(header.data_bytes, dtype=torch.uint8)
    for e, (src, _pad) in zip(header.entries, sources, strict=True):
        data[e.begin : e.begin + src.numel()] = src
    header = decode_frame_header(encode_header(header), header.data_bytes, len(header.entries), 1)
    return rebuild(header, data, tree, 1, (0, None))


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
