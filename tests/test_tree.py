"""_tree: flatten / unflatten and the storage plan that keeps aliasing."""

from __future__ import annotations

import torch

from aiostage._core.storages import SPAN_ALIGN, plan_storages, view_tensor
from aiostage._core.tree import Leaf, MapNode, Value, flatten, key_str, unflatten


def test_key_paths_name_nested_positions() -> None:
    tree = flatten({"optim": {"state": {3: {"exp_avg": torch.ones(1)}}}, "l": [torch.ones(1)]})
    assert [leaf.key for leaf in tree.leaves] == ["optim.state.3.exp_avg", "l.0"]
    assert key_str(()) == "<root>"


def test_skeleton_keeps_values_and_key_types() -> None:
    tree = flatten({1: torch.ones(1), "b": [1, "x"]})
    assert isinstance(tree.root, MapNode)
    assert tree.root.keys == (1, "b")
    assert isinstance(tree.root.children[0], Leaf)
    assert unflatten(tree, [torch.zeros(1)]) == {1: torch.zeros(1), "b": [1, "x"]}
    assert isinstance(flatten(5).root, Value)


def test_unflatten_copies_values_each_time() -> None:
    tree = flatten({"meta": {"milestones": [10, 20]}})
    a, b = unflatten(tree, []), unflatten(tree, [])
    assert a == b
    assert a["meta"] is not b["meta"]


def test_plan_groups_aliases_and_counts_bytes_once() -> None:
    emb = torch.randn(10, 4)
    other = torch.randn(3)
    plan = plan_storages([emb, emb, emb[2:5], other, torch.empty(0)])
    assert len(plan.spans) == 2
    assert plan.nbytes == emb.nbytes + other.nbytes
    assert [v.span for v in plan.views] == [0, 0, 0, 1, -1]
    assert plan.views[2].offset == 8


def test_plan_trims_to_the_covered_bytes_on_an_aligned_start() -> None:
    big = torch.randn(1 << 16)
    plan = plan_storages([big[1000:1010], big[1005:1020]])
    (span,) = plan.spans
    assert span.start % SPAN_ALIGN == 0
    assert span.start <= 4000
    assert span.start + span.nbytes == 1020 * 4
    assert span.nbytes < 4 * 20 + SPAN_ALIGN


def test_views_rebuild_over_new_storages_with_mixed_dtypes() -> None:
    raw = torch.arange(64, dtype=torch.uint8)
    as_int = raw[4:].view(torch.int32)  # offset 1 in int32 elements
    tail = raw[61:]
    plan = plan_storages([as_int, tail])
    copies = [src.clone() for src in plan.sources]
    rebuilt = [view_tensor(v, copies) for v in plan.views]
    assert torch.equal(rebuilt[0], as_int)
    assert torch.equal(rebuilt[1], tail)
    assert rebuilt[0].untyped_storage().data_ptr() == rebuilt[1].untyped_storage().data_ptr()


def test_layout_depends_only_on_span_sizes() -> None:
    a = plan_storages([torch.ones(4), torch.ones(2, 2)])
    b = plan_storages([torch.zeros(2, 2), torch.zeros(4)])
    assert a.layout == b.layout == (("cpu", 16), ("cpu", 16))
