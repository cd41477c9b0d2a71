"""tree, storages and skeleton: flatten / unflatten, the storage plan that keeps aliasing, its
stamp, and walking a later state dict along a kept skeleton."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

import torch

from aiostage._core.skeleton import rebuild, regather, skeleton
from aiostage._core.storages import (
    SPAN_ALIGN,
    Layout,
    plan_storages,
    read_all,
    stamp,
    view_tensor,
)
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
    copies = [plan.source(s).clone() for s in range(len(plan.spans))]  # type: ignore[no-untyped-call]
    rebuilt = [view_tensor(v, copies) for v in plan.views]
    assert torch.equal(rebuilt[0], as_int)
    assert torch.equal(rebuilt[1], tail)
    assert rebuilt[0].untyped_storage().data_ptr() == rebuilt[1].untyped_storage().data_ptr()
    flats = [torch.frombuffer(bytearray(c), dtype=torch.uint8) for c in copies]
    over = [view_tensor(v, flats) for v in plan.views]  # tensors in place of storages
    assert torch.equal(over[0], as_int)
    assert torch.equal(over[1], tail)
    assert over[0].untyped_storage().data_ptr() == flats[0].data_ptr()


def test_layout_depends_only_on_span_sizes() -> None:
    a = plan_storages([torch.ones(4), torch.ones(2, 2)])
    b = plan_storages([torch.zeros(2, 2), torch.zeros(4)])
    assert a.layout == b.layout == (("cpu", 16), ("cpu", 16))


def test_layout_sums_once_and_equals_plain_tuples() -> None:
    layout = Layout([("cpu", 16), ("cuda", 8)])
    assert layout.nbytes == 24
    assert layout == (("cpu", 16), ("cuda", 8)) == Layout(layout)
    assert layout != Layout([("cpu", 16)])
    assert hash(layout) == hash((("cpu", 16), ("cuda", 8)))


def test_read_all_reads_in_slices_like_one_map() -> None:
    items = list(range(2500))  # more than one slice
    got = read_all((functools.partial(map, str), functools.partial(map, abs)), items)
    assert got == [list(map(str, items)), list(map(abs, items))]


def test_stamps_differ_where_a_plan_would() -> None:
    base = torch.randn(4, 4)
    same = stamp([base, base[1]])
    assert stamp([base, base[1]]) == same
    for other in ([base.t(), base[1]], [base, base[2]], [base.view(torch.int32), base[1]]):
        assert stamp(other) != same


def _sample() -> dict[str, Any]:
    return {
        "w": torch.ones(2),
        "opt": {0: {"m": torch.zeros(1), "v": torch.zeros(1)}, "lr": [0.1, {"x": 1}]},
        "seq": (torch.ones(1), 3),
    }


def test_regather_takes_tensors_in_leaf_order_and_copies_values() -> None:
    sd = _sample()
    sk = skeleton(flatten(sd))
    assert sk is not None
    found = regather(sk, sd)
    assert found is not None
    tensors, values = found
    assert tensors == [sd["w"], sd["opt"][0]["m"], sd["opt"][0]["v"], sd["seq"][0]]
    assert values == [0.1, 1, 3]
    out = rebuild(sk, [t.clone() for t in tensors], values)
    assert out["opt"]["lr"] == [0.1, {"x": 1}]
    assert out["opt"]["lr"][1] is not sd["opt"]["lr"][1]
    assert torch.equal(out["seq"][0], sd["seq"][0])


def test_regather_refuses_a_changed_structure() -> None:
    sk = skeleton(flatten(_sample()))
    assert sk is not None
    edits: list[Callable[[dict[str, Any]], object]] = [
        lambda sd: sd.update(extra=1),
        lambda sd: sd.pop("w"),
        lambda sd: sd["opt"]["lr"].append(2),
        lambda sd: sd.update(seq=list(sd["seq"])),
        lambda sd: sd["opt"]["lr"].__setitem__(0, torch.ones(1)),  # a value became a tensor
        lambda sd: sd["opt"]["lr"].__setitem__(1, 5),  # a container became a value
        lambda sd: sd["opt"]["lr"].__setitem__(0, threading.Lock()),  # no longer copyable
    ]
    for edit in edits:
        sd = _sample()
        edit(sd)
        assert regather(sk, sd) is None, edit


def test_a_sharded_free_tree_has_a_skeleton_and_runs() -> None:
    sk = skeleton(flatten({"a": {"x": torch.ones(1), "y": torch.ones(1)}, "b": [torch.ones(1), 2]}))
    assert sk is not None
    assert sorted(sk.runs.values()) == [0]  # only ``a`` holds nothing but tensors
