"""Installing weight versions without a world: double-buffered swap and copy, against reading
sections that run concurrently with ``install`` (tasks on the loop and worker threads)."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.to_thread
import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from aiostage._channel.install import Installer, Received
from aiostage._core.completion import wait_until
from aiostage._replication.frames import frame_views, plan_cpu_frame
from aiostage.errors import StateDictMismatch

LAYERS = 6


def _model() -> torch.nn.Sequential:
    return torch.nn.Sequential(*(torch.nn.Linear(8, 8) for _ in range(LAYERS)))


def _state(version: int) -> dict[str, torch.Tensor]:
    """The published state of ``version``: every tensor holds the value ``version``."""
    return {k: torch.full_like(v, float(version)) for k, v in _model().state_dict().items()}


def _landed(state: dict[str, Any], version: int) -> Received:
    """``state`` landed as ``version`` in a fresh buffer, as the subscriber's receiver hands it
    over (laying out a frame walks the state: a worker thread)."""
    planned = plan_cpu_frame(state)
    data = torch.zeros(planned.header.data_bytes, dtype=torch.uint8)
    for e, (src, _) in zip(planned.header.entries, planned.sources, strict=True):
        data[e.begin : e.begin + src.numel()] = src
    views = frame_views(planned.header, data, 0)
    return Received(version, version, planned.header, data, 0.0, views)


async def _received(version: int, state: dict[str, Any] | None = None) -> Received:
    state = _state(version) if state is None else state
    return await anyio.to_thread.run_sync(_landed, state, version)


def _versions(model: torch.nn.Module) -> set[float]:
    return {float(v) for p in model.parameters() for v in torch.unique(p.detach())}


@pytest.mark.parametrize("swap", [True, False], ids=["swap", "copy"])
async def test_no_reading_section_sees_two_versions(swap: bool) -> None:
    model = _model()
    installer = Installer(model, swap=swap)
    await installer.install(await _received(0), {})
    seen: list[set[float]] = []
    done = False

    async def read_on_the_loop() -> None:
        while not done:
            async with installer.reading():
                values = set()
                for p in model.parameters():  # other tasks (the install) run in between
                    values |= {float(v) for v in torch.unique(p.detach())}
                    await anyio.lowlevel.checkpoint()
                seen.append(values)

    async def read_in_a_thread() -> None:
        while not done:
            async with installer.reading():
                seen.append(await anyio.to_thread.run_sync(_versions, model))

    async with anyio.create_task_group() as tg:
        for read in (read_on_the_loop, read_on_the_loop, read_in_a_thread):
            tg.start_soon(read)
        for version in range(1, 21):
            await installer.install(await _received(version), {})
            await anyio.lowlevel.checkpoint()
        done = True
    assert [s for s in seen if len(s) != 1] == [], "a section read two versions"
    assert len({min(s) for s in seen}) > 2, f"the readers saw too few versions: {seen}"
    assert _versions(model) == {20.0}


async def test_a_swap_waits_for_open_sections_and_keeps_their_buffer() -> None:
    model = _model()
    installer = Installer(model, swap=True)
    one, two = await _received(1), await _received(2)
    assert await installer.install(one, {}), "a CPU target views the buffer it swapped to"
    first = next(model.parameters())
    async with anyio.create_task_group() as tg, installer.reading():
        tg.start_soon(installer.install, two, {})
        await wait_until(lambda: installer._changing)  # due: new sections would wait
        for _ in range(20):  # the install gets every chance to run; it must not change
            await anyio.lowlevel.checkpoint()
        assert _versions(model) == {1.0}
        assert first.untyped_storage().data_ptr() == one.data.data_ptr()
        # the section ended: the swap runs; the old buffer is free now
    assert _versions(model) == {2.0}
    assert next(model.parameters()) is first, "the parameter objects themselves are re-pointed"
    assert first.untyped_storage().data_ptr() == two.data.data_ptr()
    one.data.fill_(99)  # reused for a later landing: nothing installed changes
    assert _versions(model) == {2.0}


async def test_a_new_section_waits_for_a_due_change() -> None:
    model = _model()
    installer = Installer(model, swap=True)
    await installer.install(await _received(1), {})
    order: list[str] = []

    async def late_reader() -> None:
        async with installer.reading():
            order.append(f"read {_versions(model)}")

    async with anyio.create_task_group() as tg, installer.reading():
        tg.start_soon(installer.install, await _received(2), {})
        await wait_until(lambda: installer._changing)
        tg.start_soon(late_reader)
        for _ in range(20):
            await anyio.lowlevel.checkpoint()
        assert order == [], "a section opened while a change was due"
        order.append("first section ends")
    assert order == ["first section ends", "read {2.0}"]


async def test_copy_installs_into_the_targets_own_memory() -> None:
    a, c = torch.zeros(4), torch.zeros(2, 3)
    target = {"a": a, "b": {"c": c}}
    own = a.data_ptr()
    received = await _received(1, {"a": torch.ones(4), "b": {"c": torch.full((2, 3), 2.0)}})
    assert not await Installer(target, swap=False).install(received, {})
    assert a.data_ptr() == own
    assert torch.equal(a, torch.ones(4))
    assert torch.equal(c, torch.full((2, 3), 2.0))


async def test_a_swap_lets_go_of_the_memory_it_replaced_and_nothing_else() -> None:
    a, b = torch.zeros(1024), torch.zeros(16)
    kept = b[4:8]  # the caller's own view of b's memory
    replaced = StorageWeakRef(a.untyped_storage())
    installer = Installer({"a": a, "b": b}, swap=True)
    assert await installer.install(
        await _received(1, {"a": torch.ones(1024), "b": torch.ones(16)}), {}
    )
    assert torch.equal(a, torch.ones(1024))
    assert torch.equal(b, torch.ones(16))
    assert replaced.expired()  # only the target viewed it: freed, nothing of ours keeps it
    assert torch.equal(kept, torch.zeros(4))  # the caller's view keeps its memory and values
    assert await installer.install(
        await _received(2, {"a": torch.full((1024,), 2.0), "b": torch.full((16,), 2.0)}), {}
    )
    assert torch.equal(a, torch.full((1024,), 2.0))
    assert torch.equal(kept, torch.zeros(4))


@pytest.mark.parametrize("swap", [True, False], ids=["swap", "copy"])
async def test_a_version_that_does_not_fit_changes_nothing(swap: bool) -> None:
    model = _model()
    installer = Installer(model, swap=swap)
    await installer.install(await _received(1), {})
    received = await _received(2, {"0.weight": torch.zeros(3)})
    with pytest.raises(StateDictMismatch, match=r"0\.weight"):
        await installer.install(received, {})
    assert _versions(model) == {1.0}
    async with installer.reading():  # not left "changing"
        pass


def test_tied_parameters_are_changed_once() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model[1].weight = model[0].weight
    installer = Installer(model, swap=True)
    state = {k: torch.full_like(v, 3.0) for k, v in model.state_dict().items()}
    plan = installer._plan(_landed(state, 1))
    assert len(plan.here) == 3, [tuple(d.shape) for d, _ in plan.here]
