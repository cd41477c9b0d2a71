"""A partner's copy lands straight in the restoring rank's own tensors: the frame laid out one
tensor per entry, the messages mapped onto ``into``, and a real 2-rank restore bit-exact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import _tier_workers as workers
import pytest
import torch

from aiostage._replication.frames import frame_tensors
from aiostage._replication.wire import messages, plan_messages, spans
from aiostage._tiers.fetch import _copy_frame
from aiostage._tiers.inplace import InPlace, plan_apart
from aiostage.testing import run_world


def _land(state: Any, into: Any) -> tuple[InPlace, torch.Tensor]:
    """What a receiver does with the giver's frame of ``state``: each message into its target
    (``into``'s memory, else the buffer); the direct plan and the buffer."""
    planned = plan_apart(state)
    header = planned.header
    ranges = plan_messages(spans(header))
    direct = InPlace(into, 0)
    targets = direct._plan(header, ranges)
    data = torch.zeros(header.data_bytes, dtype=torch.uint8)
    sent = messages(header, planned.sources, ranges)
    for (a, b), target, message in zip(ranges, targets, sent, strict=True):
        (data[a:b] if target is None else target).copy_(message)
    return direct, data


def test_large_views_of_one_storage_are_sent_apart_and_land_in_place() -> None:
    state, into = workers.large_state(1), workers.large_into()
    header = plan_apart(state).header
    entries = [r.entry for r in header.records]
    assert len(set(entries)) == len(entries) - 1  # one entry each, the tied pair one
    direct, data = _land(state, into)
    landed = {header.records[i].shape for i in direct.landed}
    assert {(300_000,), (800_000,)} <= landed  # w2 and bf
    assert (600, 500) not in landed  # the tied w1 (two records): copied after
    result = _copy_frame([(header, data, ())], 0, into, "test", direct.landed)
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(into[k], v), k
    assert result["step"] == 101
    assert result["w2"] is into["w2"]


def test_overlapping_views_stay_one_entry_and_come_back_whole() -> None:
    flat = torch.arange(1_000_000, dtype=torch.float32)
    state = {"a": flat[:600_000], "b": flat[400_000:], "c": flat[10:20]}
    into = {k: torch.zeros_like(v) for k, v in state.items()}
    header = plan_apart(state).header
    assert len(header.entries) == 1
    direct, data = _land(state, into)
    assert direct.landed == frozenset()
    _copy_frame([(header, data, ())], 0, into, "test", direct.landed)
    for k, v in state.items():
        assert torch.equal(into[k], v), k


def test_an_into_that_does_not_match_lands_nothing_in_place() -> None:
    state, into = workers.large_state(0), workers.large_into()
    into["w2"] = torch.zeros(299_999)
    planned = plan_apart(state)
    ranges = plan_messages(spans(planned.header))
    direct = InPlace(into, 0)
    assert direct._plan(planned.header, ranges) == [None] * len(ranges)
    assert direct.landed == frozenset()


def test_the_frame_sent_apart_holds_the_same_tensors() -> None:
    state = workers.large_state(2)
    planned = plan_apart(state)
    data = torch.zeros(planned.header.data_bytes, dtype=torch.uint8)
    ranges = plan_messages(spans(planned.header))
    for (a, b), m in zip(ranges, messages(planned.header, planned.sources, ranges), strict=True):
        data[a:b].copy_(m)
    views = frame_tensors(planned.header, data)
    got = {leaf.path[0]: v for leaf, v in zip(planned.tree.leaves, views, strict=True)}
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(got[k], v), k


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_a_partners_memory_restores_large_views_bit_exact(tmp_path: Path) -> None:
    results = run_world(workers.restore_large_from_memory, 2, str(tmp_path), timeout=90)
    for rank, r in enumerate(results):
        assert r["sources"] == [(0, "memory", 0), (1, "peer_memory", 0)], r
        assert r["exact"] == [], f"rank {rank}: {r['exact']} differ"
        assert r["step"] == 100 + rank
        assert r["ours"], r
        assert r["tied"], r


def test_aliased_large_tensors_stay_together_and_the_others_land_in_place() -> None:
    flat = torch.arange(2_000_000, dtype=torch.float32)
    w = flat[:400_000]
    state = {
        "w": w, "w_again": flat[:400_000], "head": flat[:1000], "v": flat[500_000:900_000],
        "u": flat[900_000:1_300_000].view(400, 1000).t(),
    }  # fmt: skip
    into = {k: torch.zeros_like(v) for k, v in state.items()}
    planned = plan_apart(state)
    header = planned.header
    assert header.data_bytes == 4 * 1_300_000 - 4 * 100_000  # each byte once, the gap not sent
    direct, data = _land(state, into)
    assert {planned.tree.leaves[i].path for i in direct.landed} == {("v",)}
    _copy_frame([(header, data, ())], 0, into, "test", direct.landed)
    for k, v in state.items():
        assert torch.equal(into[k], v), k
