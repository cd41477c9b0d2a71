"""DefaultStager with thousands of tensors: the plan kept while the structure holds, and a loop
thread whose share of a stage does not grow with the number of tensors."""

from __future__ import annotations

import collections
import dataclasses
import sys
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, NamedTuple

import pytest
import torch

import aiostage
from aiostage._core.storages import SLICE
from aiostage.testing import run_world

Edit = Callable[[dict[str, Any]], Any]
ONE = aiostage.StagingOptions(pool_size=1)


class Pair(NamedTuple):
    w: torch.Tensor
    label: str


@dataclasses.dataclass
class Box:
    t: torch.Tensor
    n: int


def rich() -> dict[str, Any]:
    """One of each: nesting, aliasing, ties, views, strides, wrappers, values."""
    base = torch.randn(6, 8)
    emb = torch.nn.Parameter(torch.randn(10, 4))
    frozen = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    return {
        "model": {"emb": emb, "head": emb, "frozen": frozen, "b": torch.randn(5)},
        "alias": {"base": base, "row": base[2], "col": base[:, 3], "flat": base.view(48)},
        "strided": {"t": torch.randn(4, 7).t(), "every_other": torch.randn(20)[::2]},
        "optim": {
            "state": {i: {"step": torch.tensor(float(i)), "m": torch.randn(3)} for i in range(3)},
            "param_groups": [{"lr": 0.1, "params": [0, 1, 2]}],
        },
        "seq": [torch.randn(2), (torch.arange(3), "x"), Pair(torch.randn(2, 2), "p")],
        "box": Box(torch.randn(3), 7),
        "od": collections.OrderedDict(a=torch.randn(1), z=torch.randn(2)),
        "grad": torch.randn(3).requires_grad_(True),
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(2.5),
        "step": 5,
    }


def walk(obj: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(path, leaf) pairs of a nested state dict, containers included as their type."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict | list | tuple) or dataclasses.is_dataclass(obj):
        yield path, type(obj)
        if isinstance(obj, dict):
            items: Any = obj.items()
        elif isinstance(obj, list | tuple):
            items = enumerate(obj)
        else:
            items = [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
        for k, v in items:
            yield from walk(v, f"{path}.{k}")
    else:
        yield path, obj


def check_copy(src: Any, out: Any) -> None:
    """``out`` is a staged copy of ``src`` as it is now: same structure, types, values, dtypes,
    shapes, strides, offsets, wrappers, attributes and ``requires_grad``; tensors share storage
    (and are one object) in ``out`` exactly where they do in ``src``; none shares ``src``'s
    memory."""
    a, b = list(walk(src)), list(walk(out))
    assert [p for p, _ in a] == [p for p, _ in b]
    for (path, x), (_, y) in zip(a, b, strict=True):
        if not isinstance(x, torch.Tensor):
            assert type(x) is type(y), path
            assert x == y, path
            continue
        assert type(y) is type(x), path
        facts = (x.dtype, x.shape, x.stride(), x.storage_offset(), x.requires_grad)
        assert (y.dtype, y.shape, y.stride(), y.storage_offset(), y.requires_grad) == facts, path
        assert torch.equal(y.detach(), x.detach()), path
        assert y.__dict__ == x.__dict__, path
        assert y.grad is None, path
        if x.numel():
            assert y.untyped_storage().data_ptr() != x.untyped_storage().data_ptr(), path
    ts = [(x, y) for (_, x), (_, y) in zip(a, b, strict=True) if isinstance(x, torch.Tensor)]
    for key in (id, storage_of):
        assert groups(key, [x for x, _ in ts]) == groups(key, [y for _, y in ts]), key


def storage_of(t: torch.Tensor) -> int:
    """Which bytes ``t`` lives in (each empty tensor on its own)."""
    return t.untyped_storage().data_ptr() if t.numel() else -id(t)


def groups(key: Callable[[torch.Tensor], int], ts: list[torch.Tensor]) -> list[int]:
    """For each tensor, the first one with the same ``key``: equal lists, equal partitions."""
    first: dict[int, int] = {}
    return [first.setdefault(key(t), i) for i, t in enumerate(ts)]


def recipe(stager: aiostage.DefaultStager) -> Any:
    """The plan the stager keeps for the structure it staged last."""
    return stager._planner.last


def bump(sd: dict[str, Any]) -> None:
    """Change every tensor's values in place, as a training step does."""
    with torch.no_grad():
        for _, t in walk(sd):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                t.add_(1)


# ---------------------------------------------------------------- the warm path


async def test_an_unchanged_structure_reuses_the_plan_and_copies_new_values() -> None:
    sd = rich()
    async with aiostage.DefaultStager(ONE) as stager:
        first = await stager.stage(sd)
        check_copy(sd, first)
        kept, tensors = recipe(stager), first["alias"]["base"]
        stager.release(first)
        for step in range(3):
            bump(sd)
            sd["step"] = step
            sd["optim"]["param_groups"][0]["lr"] = 0.01 * step
            again = await stager.stage(sd)
            check_copy(sd, again)
            assert recipe(stager) is kept
            assert again["alias"]["base"] is tensors  # the staged tensors are refilled in place
            assert (
                again["optim"]["param_groups"][0]["params"]
                is not first["optim"]["param_groups"][0]["params"]
            )
            stager.release(again)


async def test_values_are_copied_fresh_on_the_warm_path() -> None:
    """Values are read again on every stage, and copied: the copy never shares one."""
    blob = bytearray(b"ab")
    sd = {"w": torch.ones(2), "meta": {"milestones": [10, 20], "blob": blob}}
    async with aiostage.DefaultStager(ONE) as stager:
        stager.release(await stager.stage(sd))
        kept = recipe(stager)
        sd["meta"]["milestones"][0] = 11
        blob[0] = ord("z")
        out = await stager.stage(sd)
        assert recipe(stager) is kept
        assert out["meta"] == {"milestones": [11, 20], "blob": bytearray(b"zb")}
        assert out["meta"]["blob"] is not blob
        assert out["meta"]["milestones"] is not sd["meta"]["milestones"]


def _add_key(sd: dict[str, Any]) -> None:
    sd["model"]["extra"] = torch.randn(4)


def _drop_key(sd: dict[str, Any]) -> None:
    del sd["model"]["b"]


def _reorder_keys(sd: dict[str, Any]) -> None:
    sd["od"] = collections.OrderedDict(reversed(sd["od"].items()))


def _transpose_square_in_place(sd: dict[str, Any]) -> None:
    sd["sq"].t_()  # the same object, shape and address; only the strides change


def _reshape_in_place(sd: dict[str, Any]) -> None:
    sd["model"]["b"].resize_(1, 5)


def _same_bytes_other_dtype(sd: dict[str, Any]) -> None:
    sd["model"]["b"] = sd["model"]["b"].view(torch.int32)


def _slide_a_view(sd: dict[str, Any]) -> None:
    sd["alias"]["row"] = sd["alias"]["base"][3]


def _untie(sd: dict[str, Any]) -> None:
    emb = sd["model"]["emb"]
    sd["model"]["head"] = torch.nn.Parameter(emb.detach().view(emb.shape))  # same bytes


def _tie(sd: dict[str, Any]) -> None:
    sd["model"]["b"] = sd["model"]["frozen"]


def _alias_a_separate_tensor(sd: dict[str, Any]) -> None:
    sd["model"]["b"] = sd["alias"]["base"].view(48)[:5]


def _replace_same_shape(sd: dict[str, Any]) -> None:
    sd["model"]["b"] = torch.randn(5)


def _swap_data_in_place(sd: dict[str, Any]) -> None:
    sd["model"]["frozen"].data = torch.randn(3)


def _set_storage_in_place(sd: dict[str, Any]) -> None:
    sd["scalar"].set_(torch.tensor([9.0, 8.0]).untyped_storage(), 1, (), ())


def _flip_requires_grad(sd: dict[str, Any]) -> None:
    sd["grad"].requires_grad_(False)


def _parameter_to_tensor(sd: dict[str, Any]) -> None:
    sd["model"]["frozen"] = sd["model"]["frozen"].detach()


def _value_to_tensor(sd: dict[str, Any]) -> None:
    sd["step"] = torch.tensor(5)


def _tensor_to_value(sd: dict[str, Any]) -> None:
    sd["scalar"] = 2.5


def _container_type(sd: dict[str, Any]) -> None:
    sd["od"] = dict(sd["od"])


def _list_grows(sd: dict[str, Any]) -> None:
    sd["seq"].append(torch.randn(1))


def _gain_an_attribute(sd: dict[str, Any]) -> None:
    sd["model"]["b"].note = "kept"


def _same_address_other_storage_start(sd: dict[str, Any]) -> None:
    """The same data pointer, shape, stride and dtype, but a storage that starts 16 bytes
    earlier: the one ``head`` lives in, so the two now share a storage."""
    sd["tail"] = torch.frombuffer(sd["raw"], dtype=torch.float32)[4:]


async def _warm_then_edited(stager: aiostage.DefaultStager, sd: Any, edit: Edit) -> tuple[Any, Any]:
    """Stage ``sd`` until warm, ``edit`` it, stage it again: a correct copy, from a new plan
    (the copy and the warm plan it replaced)."""
    for _ in range(2):  # the second stage runs warm
        stager.release(await stager.stage(sd))
    kept = recipe(stager)
    edit(sd)
    out = await stager.stage(sd)
    check_copy(sd, out)
    assert recipe(stager) is not kept
    return out, kept


@pytest.mark.parametrize(
    "edit",
    [
        _add_key,
        _drop_key,
        _reorder_keys,
        _transpose_square_in_place,
        _reshape_in_place,
        _same_bytes_other_dtype,
        _slide_a_view,
        _untie,
        _tie,
        _alias_a_separate_tensor,
        _replace_same_shape,
        _swap_data_in_place,
        _set_storage_in_place,
        _flip_requires_grad,
        _parameter_to_tensor,
        _value_to_tensor,
        _tensor_to_value,
        _container_type,
        _list_grows,
        _gain_an_attribute,
        _same_address_other_storage_start,
    ],
)
async def test_a_changed_structure_is_planned_again(edit: Edit) -> None:
    raw = bytearray(torch.arange(8, dtype=torch.float32).numpy().tobytes())
    head = torch.frombuffer(raw, dtype=torch.float32)[:4]
    tail = torch.frombuffer(raw, dtype=torch.float32, offset=16)  # its own storage object
    sd = rich() | {"sq": torch.randn(4, 4), "raw": raw, "head": head, "tail": tail}
    async with aiostage.DefaultStager(ONE) as stager:
        out, kept = await _warm_then_edited(stager, sd, edit)
        stager.release(out)
        bump(sd)
        again = await stager.stage(sd)  # and the new structure's plan is kept in turn
        check_copy(sd, again)
        assert recipe(stager) is not kept


def _many_squares() -> dict[str, Any]:
    """More tensors than one slice of the warm checks reads (``storages.SLICE``), so a change
    far down the list lies in a later slice than the first."""
    return {"t": [torch.randn(2, 2) for _ in range(3 * SLICE + 5)]}


def _tie_last_to_first(sd: dict[str, Any]) -> None:
    sd["t"][-1] = sd["t"][0]


def _transpose_last(sd: dict[str, Any]) -> None:
    sd["t"][-1].t_()  # strides, in the last slice


def _reshape_mid_slice(sd: dict[str, Any]) -> None:
    sd["t"][2 * SLICE + 1].resize_(4)


def _last_requires_grad(sd: dict[str, Any]) -> None:
    sd["t"][-1].requires_grad_(True)


@pytest.mark.parametrize(
    "edit",
    [_transpose_last, _reshape_mid_slice, _tie_last_to_first, _last_requires_grad],
)
async def test_a_change_in_a_later_slice_is_planned_again(edit: Edit) -> None:
    """The warm path reads and compares its checks a slice at a time: a change that only a
    later slice holds still makes a new plan."""
    sd = _many_squares()
    async with aiostage.DefaultStager(ONE) as stager:
        await _warm_then_edited(stager, sd, edit)


async def test_a_copy_changed_in_a_later_slice_is_not_handed_out_again() -> None:
    sd = _many_squares()
    async with aiostage.DefaultStager(ONE) as stager:
        first = await stager.stage(sd)
        first["t"][-1].t_()  # a leased copy's strides changed by its reader, last slice
        stager.release(first)
        again = await stager.stage(sd)
        check_copy(sd, again)
        assert again["t"][-1] is not first["t"][-1]


async def test_a_new_tensor_at_the_old_address_is_the_one_read() -> None:
    """A tensor replaced by another of the same shape that lands on the same bytes (a freed
    block handed out again, or another storage over the same memory) may keep the plan, but
    the copy reads the new tensor."""
    buf = bytearray(torch.arange(16, dtype=torch.float32).numpy().tobytes())
    sd = {"w": torch.frombuffer(buf, dtype=torch.float32), "b": torch.ones(4)}
    async with aiostage.DefaultStager(ONE) as stager:
        for _ in range(2):
            stager.release(await stager.stage(sd))
        sd["w"] = torch.frombuffer(buf, dtype=torch.float32)  # a new storage object, same bytes
        sd["w"].fill_(7.0)
        out = await stager.stage(sd)
        check_copy(sd, out)
        stager.release(out)
        del sd["b"]  # its bytes go back to the allocator: the next tensor may land there
        sd["b"] = torch.full((4,), 3.0)
        check_copy(sd, await stager.stage(sd))


async def test_tensor_attributes_are_copied_every_time() -> None:
    t = torch.randn(3)
    t.note = {"a": 1}  # type: ignore[attr-defined]
    sd: dict[str, Any] = {"t": t, "u": torch.randn(2)}
    async with aiostage.DefaultStager(ONE) as stager:
        stager.release(await stager.stage(sd))
        t.note["a"] = 2  # type: ignore[attr-defined]
        out = await stager.stage(sd)
        assert out["t"].note == {"a": 2}
        assert torch.equal(out["t"], t)


def _no_grad_mul(t: torch.Tensor) -> None:
    with torch.no_grad():
        t.mul_(0)


def _set_attribute(t: torch.Tensor) -> None:
    t.note = 1  # type: ignore[attr-defined]


def _set_grad(t: torch.Tensor) -> None:
    t.grad = torch.ones_like(t)


def _swap_data(t: torch.Tensor) -> None:
    t.data = torch.zeros_like(t)


@pytest.mark.parametrize(
    ("key", "change"),
    [
        ("sq", torch.Tensor.t_),
        ("b", lambda t: t.requires_grad_(True)),
        ("frozen", _set_grad),
        ("b", _set_attribute),
        ("emb", _swap_data),
        ("b", lambda t: t.resize_(1, 5)),
        ("emb", _no_grad_mul),
    ],
)
async def test_a_copy_changed_by_its_reader_is_not_handed_out_again(
    key: str, change: Callable[[torch.Tensor], Any]
) -> None:
    """What a caller does to a leased copy (metadata, grad, attributes, writes) never reaches
    a later copy: tensors changed beyond reading are built afresh."""
    sd = {"model": rich()["model"], "sq": torch.randn(4, 4)}
    sd["b"] = sd["model"].pop("b")
    async with aiostage.DefaultStager(ONE) as stager:
        first = await stager.stage(sd)
        change(first[key] if key in first else first["model"][key])
        stager.release(first)
        check_copy(sd, await stager.stage(sd))


async def test_a_sharded_structure_without_skeleton_still_stages_each_time() -> None:
    """Leaves with Python attributes keep the plan from being reused; staging stays right."""
    t = torch.randn(4)
    t.tag = "w"  # type: ignore[attr-defined]
    sd: dict[str, Any] = {"t": t, "n": 1}
    async with aiostage.DefaultStager(ONE) as stager:
        for n in range(3):
            sd["n"] = n
            t.add_(1)
            out = await stager.stage(sd)
            assert out["n"] == n
            assert torch.equal(out["t"], t)
            assert out["t"].tag == "w"
            stager.release(out)


@pytest.mark.parametrize("options", [{"reuse_buffers": False}, {"share_memory": True}])
async def test_warm_stages_with_other_buffer_kinds(options: dict[str, bool]) -> None:
    sd = rich()
    async with aiostage.DefaultStager(aiostage.StagingOptions(**options)) as stager:
        for _ in range(3):
            bump(sd)
            out = await stager.stage(sd)
            check_copy(sd, out)
            stager.release(out)


async def test_thousands_of_small_tensors_and_big_ones_in_bounded_batches() -> None:
    """Small tensors are copied in batches, big ones in chunks; every byte lands."""
    sd = {"small": [torch.randn(256) for _ in range(3000)], "big": torch.randn(3 << 18)}
    async with aiostage.DefaultStager(
        aiostage.StagingOptions(chunk_bytes=1 << 20, pool_size=1)
    ) as stager:
        for _ in range(2):
            bump(sd)
            out = await stager.stage(sd)
            check_copy(sd, out)
            stager.release(out)
        assert len(recipe(stager).batches) > 1


# ---------------------------------------------------------------- the loop thread


class LoopCalls:
    """Count the calls and the lines (each loop iteration runs a line again) executed on the
    current (the loop's) thread: Python work there shows up whatever form it takes."""

    def __init__(self) -> None:
        self.calls = 0
        self._before: Any = None

    def _trace(self, frame: FrameType, event: str, arg: Any) -> Any:
        self.calls += 1
        return self._trace

    def _profile(self, frame: FrameType, event: str, arg: Any) -> None:
        if event == "c_call":
            self.calls += 1

    def __enter__(self) -> LoopCalls:
        self._before = sys.gettrace()
        sys.settrace(self._trace)  # this thread only; worker threads run untraced
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.setprofile(None)
        sys.settrace(self._before)


def optimizer_like(n: int) -> dict[str, Any]:
    """A model and its Adam state: ``n`` parameters, ``4 n`` tensors."""
    model = {f"layer{i}.w": torch.randn(8) for i in range(n)}
    state = {
        i: {"step": torch.tensor(1.0), "m": torch.randn(8), "v": torch.randn(8)} for i in range(n)
    }
    groups = [{"lr": 0.1, "params": list(range(n))}]
    return {"model": model, "optim": {"state": state, "param_groups": groups}}


async def _loop_calls(n: int, warm: bool) -> int:
    sd = optimizer_like(n)
    async with aiostage.DefaultStager(ONE) as stager:
        if warm:
            stager.release(await stager.stage(sd))
        with LoopCalls() as counted:
            out = await stager.stage(sd)
            stager.release(out)
        del out
    return counted.calls


@pytest.mark.parametrize("warm", [False, True])
async def test_the_loop_threads_share_of_a_stage_does_not_grow_with_tensors(warm: bool) -> None:
    """Walking, checking, planning, copying and rebuilding run in worker threads: the calls and
    lines the loop thread runs for a stage of 20,000 tensors are those of one of 40 (give or
    take the loop's own wake-ups), where per-tensor work there would add tens of thousands."""
    await _loop_calls(10, warm)  # one-time costs (imports, the thread pool) land here
    few, many = await _loop_calls(10, warm), await _loop_calls(5000, warm)
    assert many - few < 300, f"{few} calls and lines for 40 tensors, {many} for 20,000"


async def _reserve_calls(n: int) -> int:
    sd = optimizer_like(n)
    async with aiostage.DefaultStager(ONE) as stager:
        with LoopCalls() as counted:
            await stager.reserve(sd)
    return counted.calls


async def test_reserve_plans_off_the_loop_and_the_first_stage_runs_warm() -> None:
    await _reserve_calls(10)
    few, many = await _reserve_calls(10), await _reserve_calls(5000)
    assert many - few < 300, f"{few} calls and lines for 40 tensors, {many} for 20,000"
    sd = optimizer_like(100)
    async with aiostage.DefaultStager(ONE) as stager:
        await stager.reserve(sd)
        kept = recipe(stager)
        out = await stager.stage(sd)
        assert recipe(stager) is kept
        check_copy(sd, out)


# ---------------------------------------------------------------- DTensors


async def stage_dtensor_warm(rank: int, world_size: int) -> list[tuple[str, bool, bool]]:
    """Rank function: a DTensor staged warm, then the same local tensor under other placements.

    Returns (placements of the copy, whether they match the original's, whether the plan was
    kept) per stage."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh = init_device_mesh("cpu", (world_size,))
    local = torch.randn(4, 3)
    seen = []
    async with aiostage.DefaultStager(ONE) as stager:
        kept = None
        for placement in (Shard(0), Shard(0), Replicate()):
            w = DTensor.from_local(local, mesh, [placement], run_check=False)
            sd: dict[str, Any] = {"w": w, "n": 1}
            out = await stager.stage(sd)
            same = out["w"].placements == sd["w"].placements
            ok = same and torch.equal(out["w"].to_local(), local)
            seen.append((str(out["w"].placements), ok, recipe(stager) is kept))
            kept = recipe(stager)
            stager.release(out)
    return seen


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_a_dtensor_whose_placements_change_is_planned_again() -> None:
    (seen,) = run_world(stage_dtensor_warm, 1, timeout=90.0)
    assert [ok for _, ok, _ in seen] == [True, True, True], seen
    assert [kept for _, _, kept in seen] == [False, True, False], seen
