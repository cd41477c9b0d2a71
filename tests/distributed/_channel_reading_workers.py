"""Rank functions for ``test_channel_reading.py``: a subscriber whose reading section stays open
while newer versions land and an ``apply`` is due. Every parameter of version ``v`` holds
``v``; top-level so spawned ranks import them by name."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.to_thread
import torch
import torch.distributed as dist
from _channel_workers import all_live, make_model, set_version

import aiostage
from aiostage._core.completion import wait_until

LAST = 5


def _versions(model: torch.nn.Module) -> list[float]:
    with torch.no_grad():
        return sorted({float(v) for p in model.parameters() for v in torch.unique(p)})


async def section_held_across_landings(rank: int, world: int, swap: bool) -> dict[str, Any]:
    """Rank 0 publishes version 1, waits until rank 1 holds a reading section open, then
    publishes 2..LAST. Rank 1 installs 1, opens a section, and keeps it open until LAST has
    landed while another task tries to install each newer version; it returns what the section
    read at its start and its end, the version it was given, and what was installed after."""
    if rank == 0:
        model = make_model(64)
        async with aiostage.WeightPublisher(subscribers=[1], timeout=30) as pub:
            await all_live(pub)
            set_version(model, 1)
            await pub.publish(model.state_dict(), 1)
            await anyio.to_thread.run_sync(dist.barrier)
            for v in range(2, LAST + 1):
                set_version(model, v)
                await pub.publish(model.state_dict(), v)
        return {}
    return await _hold_a_section(swap)


async def _hold_a_section(swap: bool) -> dict[str, Any]:
    model = make_model(64)
    seen: dict[str, Any] = {}
    async with aiostage.WeightSubscriber(target=model, timeout=30, swap=swap) as sub:
        with anyio.fail_after(20):
            await (await sub.wait_for(1)).apply()

            async def install_each() -> None:
                async for update in sub:
                    await update.apply()

            async with anyio.create_task_group() as tg:
                async with sub.reading() as version:
                    seen["given"] = version
                    seen["start"] = await anyio.to_thread.run_sync(_versions, model)
                    tg.start_soon(install_each)
                    await anyio.to_thread.run_sync(dist.barrier)
                    await wait_until(lambda: sub.received_version == LAST)
                    seen["end"] = await anyio.to_thread.run_sync(_versions, model)
                    seen["installed_meanwhile"] = sub.version
                await wait_until(lambda: sub.version == LAST)
                seen["after"] = await anyio.to_thread.run_sync(_versions, model)
                tg.cancel_scope.cancel()
    return seen
