"""What staging and saving keep of the caller's state: nothing. A stager's plan and staged
tensors outlive a stage, so a user who drops a model after ``stage`` or ``save`` must still get
its memory back (the plan keeps plain data, never the caller's tensors or storages)."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import anyio
import torch

import aiostage
from aiostage._core.completion import Backoff, wait_until

Refs = list[weakref.ref[Any]]


def model_state() -> dict[str, Any]:
    """Enough tensors for several read slices, with parameters, a tie, a view and a value."""
    layers = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(200)])
    many = [torch.randn(4) for _ in range(600)]
    return {
        "model": dict(layers.state_dict(keep_vars=True)),
        "many": many,
        "tied": many[0],
        "view": many[1][1:3],
        "big": torch.randn(1 << 17),  # large enough to be copied as bytes
        "step": 3,
    }


def watch(sd: dict[str, Any]) -> tuple[Refs, Refs]:
    """Weak references to every tensor of ``sd`` and to every storage under them (torch keeps
    a storage's Python object as long as its memory lives: that reference dies with the
    memory)."""
    tensors: list[torch.Tensor] = [
        *sd["model"].values(),
        *sd["many"],
        sd["tied"],
        sd["view"],
        sd["big"],
    ]
    return [weakref.ref(t) for t in tensors], [weakref.ref(t.untyped_storage()) for t in tensors]


def alive(refs: Refs) -> int:
    gc.collect()
    return sum(r() is not None for r in refs)


async def freed(tensors: Refs, storages: Refs) -> tuple[int, int]:
    """How many of the watched tensors and storages are alive once nothing keeps them: polled
    for up to 10 s, because the worker thread that ran a stage's last job drops its arguments
    just after it hands the result to the loop, which may resume first (a moment's reference,
    not one kept)."""
    with anyio.move_on_after(10):
        await wait_until(lambda: alive(tensors) + alive(storages) == 0, Backoff(0.001, 0.05))
    return alive(tensors), alive(storages)


async def test_a_dropped_state_dict_is_freed_after_warm_stages() -> None:
    sd = model_state()
    tensors, storages = watch(sd)
    async with aiostage.DefaultStager(pool_size=1) as stager:
        # cold, warm (the plan and the staged tensors are kept), warm noting versions (zero-stall)
        for issued in (None, None, lambda: None):
            staged = await stager.stage(sd, issued=issued)
            stager.release(staged)
        del sd
        assert await freed(tensors, storages) == (0, 0)
        again = model_state()  # the stager goes on working with a new state dict
        staged = await stager.stage(again)
        assert torch.equal(staged["big"], again["big"])
        stager.release(staged)


async def test_a_dropped_state_dict_is_freed_after_saves(tmp_path: Path) -> None:
    sd = model_state()
    tensors, storages = watch(sd)
    for k in range(2):  # the second save reuses the encoded header of the first
        await aiostage.save(sd, tmp_path / f"ck{k}")
    del sd
    assert await freed(tensors, storages) == (0, 0)


async def test_a_warm_stage_leaves_no_per_tensor_list_for_the_collector() -> None:
    """A young collection after a stage walks every young container alive (the GIL held): a
    warm stage leaves only its staged copy's containers there, no list per tensor."""
    sd = {
        f"layer{i}": {"w": torch.randn(4), "b": torch.randn(2), "n": torch.randn(1)}
        for i in range(1000)
    }
    count = 3 * len(sd)
    async with aiostage.DefaultStager(pool_size=1) as stager:
        stager.release(await stager.stage(sd))
        was = gc.isenabled()
        gc.collect()
        gc.disable()  # what the stage leaves young stays in generation 0 to be looked at
        try:
            staged = await stager.stage(sd)
            young = [o for o in gc.get_objects(generation=0) if o is not staged]
            big = [
                type(o).__name__
                for o in young
                if isinstance(o, list | tuple | dict) and len(o) >= count
            ]
        finally:
            if was:
                gc.enable()
        assert big == []
        assert torch.equal(staged["layer7"]["w"], sd["layer7"]["w"])
        stager.release(staged)


def _kinds(*kinds: type) -> int:
    gc.collect()
    return sum(type(o) in kinds for o in gc.get_objects())


async def test_a_first_stage_makes_no_storage_or_memoryview_object_per_tensor() -> None:
    """The first stage of a structure plans it and builds its buffers: every object it leaves
    alive is walked by the collections that follow, with the GIL held (tens of ms at 20k
    tensors). It makes no storage object for the caller's tensors (each would live as long as
    their memory) and none per staging buffer, nor a memoryview per buffer."""
    sd = {f"t{i}": torch.randn(3) for i in range(3000)}
    before = _kinds(torch.UntypedStorage, memoryview)
    async with aiostage.DefaultStager(pool_size=1) as stager:
        staged = await stager.stage(sd)
        made = _kinds(torch.UntypedStorage, memoryview) - before
        assert made < 50, f"{made} storage and memoryview objects for 3000 tensors"
        assert all(torch.equal(staged[k], sd[k]) for k in ("t0", "t1234", "t2999"))
        assert (
            staged["t5"].untyped_storage().data_ptr() != staged["t6"].untyped_storage().data_ptr()
        )
        stager.release(staged)


async def test_a_save_makes_no_storage_object_for_the_callers_tensors(tmp_path: Path) -> None:
    """Saving groups tensors by their storage's address read from the tensor: a storage object
    made for each would stay as long as the caller's tensors, for every full collection to walk."""
    sd = {f"t{i}": torch.randn(3) for i in range(3000)}
    sd["view"] = sd["t7"][1:]  # shares a storage: still found to
    before = _kinds(torch.UntypedStorage)
    await aiostage.save(sd, tmp_path / "ckpt")
    made = _kinds(torch.UntypedStorage) - before
    assert made < 50, f"{made} storage objects for 3001 tensors"
    back = await aiostage.load(tmp_path / "ckpt")
    assert torch.equal(back["t2999"], sd["t2999"])
    assert back["view"].untyped_storage().data_ptr() == back["t7"].untyped_storage().data_ptr()


def _full_collections() -> int:
    return int(gc.get_stats()[2]["collections"])


async def test_reserve_runs_the_full_collection_a_new_plan_calls_for() -> None:
    """A new plan's objects would tip the collector into a full collection during the first
    training steps; ``reserve`` runs it itself, once per new plan, and never while the program
    has automatic collection off."""
    sd = {f"t{i}": torch.randn(3) for i in range(500)}
    async with aiostage.DefaultStager(pool_size=1) as stager:
        was = gc.isenabled()
        gc.enable()
        try:
            before = _full_collections()
            await stager.reserve(sd)
            assert _full_collections() > before
            gc.disable()
            other = {f"u{i}": torch.randn(2) for i in range(500)}
            before = _full_collections()
            await stager.reserve(other)  # a new plan, but the program turned collection off
            assert _full_collections() == before
            assert not gc.isenabled()
        finally:
            if was:
                gc.enable()
            else:
                gc.disable()
        staged = await stager.stage(other)
        assert torch.equal(staged["u499"], other["u499"])
        stager.release(staged)
