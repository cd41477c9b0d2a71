"""What a subscriber takes from its publisher, without a world: the size it agrees to, versions
that increase, frames whose whole structure decodes, regions of one process, and refusals."""

from __future__ import annotations

import dataclasses
from typing import Any

import anyio
import pytest
import torch

import aiostage
from aiostage._channel.gate import MAX_REFUSED, Gate, target_limits
from aiostage._core.tree import flatten
from aiostage._format.codec import MAX_HEADER, Header, encode_header
from aiostage._replication.frames import (
    expected_header,
    frame_views,
    plan_cpu_frame,
    rebuild,
)
from aiostage._replication.wire import limits_like, unknown_limits
from aiostage.errors import ReplicationError


def _gate() -> Gate:
    return Gate(0, unknown_limits())


def test_a_version_or_sequence_number_that_does_not_increase_is_refused() -> None:
    gate = _gate()
    gate.check_order(10, 3)  # the first: anything
    gate.accept(10, 3)
    for version, seq in [(5, 4), (10, 4), (11, 3), (11, 2)]:
        with pytest.raises(ReplicationError, match="versions must increase") as caught:
            gate.check_order(version, seq)
        assert (caught.value.peer, caught.value.phase) == (0, "offer")
    gate.check_order(11, 4)


def test_refusals_in_a_row_drop_the_publisher_and_an_accepted_version_resets_them() -> None:
    gate = _gate()
    errors = [ReplicationError(f"bad {i}", peer=0, phase="header") for i in range(20)]
    for e in errors[: MAX_REFUSED - 1]:
        gate.refuse(e)
    gate.accept(1, 1)
    for e in errors[MAX_REFUSED - 1 : 2 * MAX_REFUSED - 2]:
        gate.refuse(e)
    with pytest.raises(ReplicationError, match="3 offers in a row were refused") as caught:
        gate.refuse(errors[2 * MAX_REFUSED - 2])
    assert caught.value.__cause__ is errors[2 * MAX_REFUSED - 2]
    assert (caught.value.peer, caught.value.phase) == (0, "header")
    assert "the last: peer rank 0, header: bad 4" in str(caught.value)
    for e in errors[2 * MAX_REFUSED - 1 :]:
        with pytest.raises(ReplicationError):
            gate.refuse(e)
    assert gate.refused == errors[-16:]  # the last 16 are kept


def test_regions_come_from_the_process_of_the_first_one_accepted() -> None:
    gate = _gate()
    with pytest.raises(ReplicationError, match="not the name of a shared-memory region") as caught:
        gate.check_region(b"/dev/shm/../etc/passwd")
    assert caught.value.phase == "region"
    gate.check_region(b"/torch_12_5_0")  # nothing agreed yet
    gate.region_accepted(b"/torch_12_5_0")
    gate.check_region(b"/torch_12_77_1")
    with pytest.raises(ReplicationError, match="another process than the publisher's"):
        gate.check_region(b"/torch_13_5_2")
    gate.region_accepted(b"/torch_13_5_2")  # never moves once agreed
    assert gate.token == b"12"


def _frame(state: Any) -> tuple[Header, torch.Tensor]:
    planned = plan_cpu_frame(state)
    data = torch.zeros(planned.header.data_bytes, dtype=torch.uint8)
    for e, (src, _pad) in zip(planned.header.entries, planned.sources, strict=True):
        data[e.begin : e.begin + src.numel()] = src
    return planned.header, data


def _bent_attrs(header: Header) -> Header:
    first, *rest = header.records
    return dataclasses.replace(header, records=(first._replace(attrs={"float": []}), *rest))


async def test_views_check_the_whole_structure_as_a_frame_lands() -> None:
    header, data = await anyio.to_thread.run_sync(_frame, {"a": torch.arange(4.0), "b": [3]})
    views = await _gate().views(header, data)
    assert [(path, t.tolist()) for path, t in views] == [(("a",), [0.0, 1.0, 2.0, 3.0])]
    for bad in [
        _bent_attrs(header),
        dataclasses.replace(header, skeleton={"no": "tree"}),
        dataclasses.replace(header, records=header.records * 2),
    ]:
        with pytest.raises(ReplicationError) as caught:
            await _gate().views(bad, data)
        assert (caught.value.peer, caught.value.phase) == (0, "header")


def test_frame_views_and_rebuild_turn_any_decoding_error_into_a_replication_error() -> None:
    header, data = _frame({"a": torch.arange(4.0)})
    for decode in (
        lambda h: frame_views(h, data, 3),
        lambda h: rebuild(h, data, None, 3, (0, None)),
    ):
        with pytest.raises(ReplicationError) as caught:
            decode(_bent_attrs(header))
        assert (caught.value.peer, caught.value.phase) == (3, "header")
        assert isinstance(caught.value.__cause__, TypeError | ValueError)


def test_the_expected_header_is_the_one_the_state_is_sent_with() -> None:
    w = torch.randn(8, 6)
    state = {"w": w, "tied": w, "t": w.t(), "row": w[2], "half": torch.ones(3).half(), "n": 1}
    sent = plan_cpu_frame(state).header
    assert expected_header(flatten(state)) == sent
    assert encode_header(expected_header(flatten(state))) == encode_header(sent)


async def test_a_subscriber_takes_what_its_target_or_max_bytes_says() -> None:
    model = torch.nn.Linear(64, 32)
    got = await target_limits(model, None)
    header = await anyio.to_thread.run_sync(plan_cpu_frame, model.state_dict())
    raw = encode_header(header.header)
    assert got == limits_like(raw, header.header.data_bytes, "the target's state")
    assert "twice the target's state" in got.why
    assert (await target_limits(model, 1000)).data == 1000
    assert (await target_limits(None, None)).header == MAX_HEADER + 8


@pytest.mark.parametrize("bad", [0, -1, 1.5, "1 GiB", True])
def test_max_bytes_is_a_positive_number_of_bytes(bad: Any) -> None:
    for make in (aiostage.WeightSubscriber, aiostage.ReplicationStager):
        with pytest.raises(ValueError, match="max_bytes must be a positive number of bytes"):
            make(max_bytes=bad)
