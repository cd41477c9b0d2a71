"""Rank functions for ``test_channel.py``: how a weight stream ends, and what it hands out once.

The end of the stream as both serving styles see it (``async for`` ends, ``sub.ended`` for a
polling loop), a version handed out once (by ``wait_for``, ``pending`` or iteration), the
docs' trainer and server blocks run as written, and a trainer process that exits while its
subscriber is frozen. That last one runs as a user's script does, not under ``run_world`` (whose
ranks leave with ``os._exit``): ``python _channel_end_workers.py RANK SIZE PORT NAME [ARGS]``
(``by_hand``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import _channel_workers as workers
import anyio
import anyio.to_thread
import torch
import torch.distributed as dist
from _seen import error_seen, raised
from torch._C._distributed_c10d import TCPStore  # torch.distributed.TCPStore, typed

import aiostage
from aiostage._channel import notes as wire
from aiostage._core.completion import wait_until
from aiostage.errors import ReplicationError


async def delivered_once_and_ended(rank: int, world: int) -> dict[str, Any]:
    """Versions 1..4 go out, then version 5 once both subscribers hold 4, then the publisher
    closes. Rank 1 takes version 4 from ``wait_for`` and applies it, then iterates; rank 2
    installs up to 4 by polling ``pending``, then polls until ``ended``, then iterates.

    Rank 0 returns who got each version; rank 1 what ``wait_for`` gave, the versions iteration
    yielded, and ``ended`` before and after; rank 2 what it served before and after version 5,
    ``ended`` then, and what iteration yielded after; both the stream's ``error`` and the
    installed version.
    """
    barrier = dist.barrier
    model = workers.make_model()
    if rank == 0:
        reports = []
        async with aiostage.WeightPublisher(subscribers=[1, 2], timeout=20) as pub:
            await workers.all_live(pub)
            for v in range(1, 6):
                if v == 5:
                    await anyio.to_thread.run_sync(barrier)  # both hold version 4
                workers.set_version(model, v)
                reports.append(await pub.publish(model.state_dict(), v))
        return {"delivered": [r.delivered for r in reports]}
    async with aiostage.WeightSubscriber(target=model, timeout=20) as sub:
        if rank == 1:
            with anyio.fail_after(20):
                update = await sub.wait_for(4)
            seen: dict[str, Any] = {"wait_for": update.version, "applied": await update.apply()}
            seen["ended_before"] = sub.ended
            await anyio.to_thread.run_sync(barrier)
            seen["yielded"] = [await u.apply() async for u in sub]
        else:
            seen = {"before": await workers.serve(sub, model, last=4)}
            await anyio.to_thread.run_sync(barrier)
            seen["after"] = await workers.serve(sub, model, last=None)
            seen["yielded"] = [u.version async for u in sub]
        seen.update(ended=sub.ended, error=error_seen(sub.error), version=sub.version)
    return seen


async def publisher_killed_mid_frame(rank: int, world: int, out: str) -> dict[str, Any]:
    """Rank 0 answers rank 1's READY with an offer and SIGKILLs itself before the frame: rank 1,
    polling, sees the stream end with an error. Rank 1 ``leave``s ``ended``, ``error``, whether
    anything is pending, and what iterating and ``wait_for`` then raise."""
    group = dist.group.WORLD
    if rank == 0:
        ready = wire.Mailbox(group, 1, wire.READY_TAG)
        await ready.take()
        await wire.send_note(group, 1, wire.OFFER_TAG, wire.Note(wire.OFFER, 1, 1))
        os.kill(os.getpid(), signal.SIGKILL)
    async with aiostage.WeightSubscriber(target=workers.make_model(), timeout=20) as sub:
        with anyio.fail_after(20):
            await wait_until(lambda: sub.ended)
        pending = sub.pending is not None
        seen = {"ended": sub.ended, "error": error_seen(sub.error), "pending": pending}
        seen["iterating"] = await raised(anext(aiter(sub)), ReplicationError)
        seen["wait_for"] = await raised(sub.wait_for(1), ReplicationError)
    return workers.leave(out, rank, seen)


async def doc_blocks(rank: int, world: int) -> dict[str, Any]:
    """docs/channel.md's trainer block on rank 0 (6 steps, a version every 2: 0, 2 and 4) and
    its serving block on ranks 1 and 2, exactly as written; each training step adds 1 to every
    weight, so version v holds v + 1. Rank 0 returns the last report's version and who got it;
    the servers the installed version, ``ended``, ``error``, what the last request read, how
    many requests were answered and those that read a mix of versions."""
    from test_doc_examples import python_block, run_block

    model, group = workers.make_model(), dist.group.WORLD
    if rank == 0:

        def train_step() -> None:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)

        names: dict[str, Any] = {"pg": group, "steps": 6, "every": 2, "model": model}
        names.update(train_step=train_step, log=logging.getLogger("trainer"))
        seen = await run_block(python_block("channel.md", "WeightPublisher("), names)
        return {"version": seen["report"].version, "delivered": seen["report"].delivered}
    answered: list[list[float]] = []

    async def requests() -> AsyncIterator[int]:
        n = 0
        while True:
            yield n
            n += 1

    async def answer(request: int) -> None:
        answered.append(await anyio.to_thread.run_sync(workers.request, model))

    names = {"pg": group, "model": model, "requests": requests(), "answer": answer}
    sub = (await run_block(python_block("channel.md", "WeightSubscriber("), names))["sub"]
    return {
        "version": sub.version,
        "ended": sub.ended,
        "error": error_seen(sub.error),
        "last": answered[-1],
        "answered": len(answered),
        "mixed": [a for a in answered if len(a) != 1],
    }


# ---------------------------------------------------------------- by hand, exiting as a script


async def frozen_at_exit(rank: int, world: int, out: str) -> dict[str, Any] | None:
    """Rank 1 of 2 asks for a version, takes the offer and the frame's first message (and
    ``leave``s the note in ``out``), then freezes (SIGSTOP) until the test kills it. Rank 0
    publishes version 1 to it: the send times out (``FROZEN_TIMEOUT``) and the publisher
    closes; it returns the report and the seconds closing took."""
    if rank == 1:
        await workers._take_offer(out, then=signal.SIGSTOP)
        return None
    model = workers.make_model(256)
    async with aiostage.WeightPublisher(subscribers=[1], timeout=workers.FROZEN_TIMEOUT) as pub:
        await workers.all_live(pub)
        workers.set_version(model, 1)
        report = await pub.publish(model.state_dict(), 1)
        began = time.perf_counter()
    return {"report": workers.report_seen(report), "closing": time.perf_counter() - began}


def lingering(within: float = 5.0) -> list[str]:
    """The threads, other than this one, that would keep the interpreter from exiting (not
    daemons) and are still running after ``within`` seconds of joining them."""
    deadline = time.monotonic() + within
    others = [t for t in threading.enumerate() if t is not threading.current_thread()]
    for t in others:
        if not t.daemon:
            t.join(max(0.0, deadline - time.monotonic()))
    return [t.name for t in others if not t.daemon and t.is_alive()]


def by_hand(argv: list[str]) -> None:
    """One rank run as a user's script runs: join the group through the store the test hosts on
    127.0.0.1:PORT, run the rank function NAME (of this module or ``_channel_workers``), print
    ``{"result", "lingering"}`` as JSON, leave the group and exit the interpreter normally, which
    waits for every thread that is not a daemon."""
    rank, size, port = (int(a) for a in argv[:3])
    fn = globals().get(argv[3]) or getattr(workers, argv[3])
    span = timedelta(seconds=60)
    store = TCPStore("127.0.0.1", port, size, False, span)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=size, timeout=span)
    result = anyio.run(fn, rank, size, *argv[4:])
    print(json.dumps({"result": result, "lingering": lingering()}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    by_hand(sys.argv[1:])
