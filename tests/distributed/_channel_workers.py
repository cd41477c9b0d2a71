"""Rank functions for ``test_channel.py``: the weight channel in real gloo worlds.

Rank 0 publishes; the other ranks serve "requests" (a forward pass in a worker thread) and
install updates between requests. Every parameter of version ``v`` holds the value ``v``, so a
request that read half-old, half-new weights sees two values. Top-level so spawned ranks import
them by name; each returns what its rank observed, as plain data (reports, errors and serving
summaries through ``report_seen``, ``error_seen`` and ``serve``), and the test asserts on it.

In the worlds where a subscriber dies, the world fails (``WorldError``) and returns no rank's
result: there the ranks also ``leave`` what they observed in a directory the test reads back.
"""

from __future__ import annotations

import os
import pickle
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import torch
import torch.distributed as dist
from _seen import error_seen, raised

import aiostage
from aiostage._channel import notes as wire
from aiostage._channel.shm import Region
from aiostage.errors import ClosedError, UsageError

#: the publisher's timeout in ``frozen_mid_transfer``: how long it waits for the frozen rank
FROZEN_TIMEOUT = 3.0


def make_model(hidden: int = 64) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 4)
    )
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.0)
    return model


def set_version(model: torch.nn.Module, version: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(version)


def request(model: torch.nn.Module) -> list[float]:
    """One request: a forward pass, then the versions of the weights it read, sorted (one
    value, unless it read a mix)."""
    with torch.no_grad():
        model(torch.ones(2, 16))
        values = {float(v) for p in model.parameters() for v in torch.unique(p)}
    return sorted(values)


async def serve(
    sub: aiostage.WeightSubscriber, model: torch.nn.Module, last: int | None
) -> dict[str, Any]:
    """Answer requests until version ``last`` is installed (``None``: until the stream ended
    and nothing is pending, as a polling loop sees it); install updates between requests.

    What the requests saw: how many there were (``requests``), the versions they read in order
    with repeats folded (``versions``), and the first few that read weights of several versions
    (``mixed``, each the versions it read; none is expected).
    """
    served: dict[str, Any] = {"requests": 0, "versions": [], "mixed": []}
    while sub.version != last if last is not None else not (sub.ended and sub.pending is None):
        update = sub.pending
        if update is not None:
            await update.apply()
        values = await anyio.to_thread.run_sync(request, model)
        served["requests"] += 1
        if len(values) != 1:
            if len(served["mixed"]) < 5:
                served["mixed"].append(values)
        elif served["versions"][-1:] != values:
            served["versions"].append(values[0])
    return served


async def all_live(pub: aiostage.WeightPublisher) -> list[int]:
    """Wait (20 s at most) until every subscriber of ``pub`` has asked for a version, so that
    none is ``"absent"`` from the first report; the live ranks."""
    with anyio.fail_after(20):
        return await pub.wait_for_subscribers()


def report_seen(report: aiostage.PublishReport) -> dict[str, Any]:
    """A ``PublishReport`` as plain data: who got the version, and each subscriber's delivery."""
    return {
        "version": report.version,
        "seconds": report.seconds,
        "delivered": report.delivered,
        "dropped": report.dropped,
        "deliveries": {
            p: {"status": d.status, "shared_memory": d.shared_memory, "error": error_seen(d.error)}
            for p, d in report.deliveries.items()
        },
    }


def leave(out: str, rank: int, seen: dict[str, Any]) -> dict[str, Any]:
    """Leave what this rank observed in ``out`` for the test (see ``left``); return it."""
    path = Path(out) / f"rank{rank}.pickle"
    path.with_suffix(".tmp").write_bytes(pickle.dumps(seen))
    path.with_suffix(".tmp").rename(path)  # whole or absent, even if the rank is killed
    return seen


def left(out: str) -> dict[int, dict[str, Any]]:
    """What the ranks left in ``out`` with ``leave``, by rank."""
    return {
        int(p.stem.removeprefix("rank")): pickle.loads(p.read_bytes())
        for p in sorted(Path(out).glob("rank*.pickle"))
    }


async def publish_five(
    rank: int, world: int, hidden: int, shared: bool, swap: bool
) -> dict[str, Any]:
    """Rank 0 publishes versions 1..5 (overwriting its weights right after each is staged);
    ``shared``: through shared memory (the subscribers are on this host); ``swap``: the
    subscribers re-point their parameters instead of copying.

    Rank 0 returns the reports, whether each publication was done once its report came, how
    the deliveries awaited one by one differ from the report's (``None``: they do not) and
    what submitting version 5 again raised; the subscribers, what they served (``_subscriber``).
    """
    if rank != 0:
        return await _subscriber(hidden, last=5, swap=swap)
    model = make_model(hidden)
    subs = list(range(1, world))
    async with aiostage.WeightPublisher(subscribers=subs, timeout=30, shared_memory=shared) as pub:
        await all_live(pub)
        publications = []
        for v in range(1, 6):
            set_version(model, v)
            publications.append(await pub.submit(model.state_dict(), v))
            set_version(model, -1.0)  # training goes on: the staged copy must not see this
        reports = [await p.report for p in publications]
        done, each = [], []
        for p, r in zip(publications, reports, strict=True):  # each subscriber's, one by one
            done.append(p.done())
            one_by_one = {peer: await d for peer, d in p.deliveries.items()}
            each.append(None if one_by_one == r.deliveries else f"{one_by_one} != {r.deliveries}")
        try:
            await pub.submit(model.state_dict(), 5)
        except ValueError as exc:
            again = error_seen(exc)
        else:
            again = None
    return {
        "subscribers": subs,
        "reports": [report_seen(r) for r in reports],
        "done": done,
        "each": each,
        "again": again,
    }


async def _subscriber(hidden: int, last: int, swap: bool) -> dict[str, Any]:
    """Serve until version ``last``, then read the stream to its end: what was served, the
    newest version received and how many versions were skipped."""
    model = make_model(hidden)
    async with aiostage.WeightSubscriber(publisher=0, target=model, timeout=30, swap=swap) as sub:
        served = await serve(sub, model, last)
        received = sub.received_version
        async for _ in sub:  # the publisher closes after `last`: the stream ends
            pass
    return {"served": served, "received": received, "skipped": sub.skipped}


async def killed_mid_transfer(rank: int, world: int, out: str) -> dict[str, Any]:
    """Rank 2 takes an offer, reads the frame's first message and SIGKILLs itself: the
    publisher drops it fast and keeps serving rank 1. Each rank ``leave``s what it saw in
    ``out``: rank 2 the note it was answered, rank 1 what it served, rank 0 both reports, the
    seconds the first took and the subscribers' states."""
    if rank == 2:
        await _take_offer(out, then=signal.SIGKILL)
    if rank == 1:
        return leave(out, rank, await _serve_until_two())
    first, second, seconds, states = await _publish_two(20.0)
    seen = {"first": report_seen(first), "second": report_seen(second), "seconds": seconds}
    return leave(out, rank, {**seen, "states": states})


async def _serve_until_two() -> dict[str, Any]:
    """Rank 1: serve requests until version 2 is installed; what it served."""
    model = make_model(256)
    async with aiostage.WeightSubscriber(target=model, timeout=20) as sub:
        served = await serve(sub, model, last=2)
    return {"served": served}


async def _publish_two(
    drop_after: float, then: Callable[[], None] = lambda: None
) -> tuple[aiostage.PublishReport, aiostage.PublishReport, float, dict[int, str]]:
    """Rank 0: publish versions 1 and 2 to ranks 1 and 2 (the first one timed), then call
    ``then`` before the publisher closes; the reports, the seconds, the subscribers' states."""
    model = make_model(256)
    async with aiostage.WeightPublisher(subscribers=[1, 2], timeout=drop_after) as pub:
        await all_live(pub)
        set_version(model, 1)
        began = time.perf_counter()
        first = await pub.publish(model.state_dict(), 1)
        seconds = time.perf_counter() - began
        set_version(model, 2)
        second = await pub.publish(model.state_dict(), 2)
        then()
        states = pub.states
    return first, second, seconds, states


async def _take_offer(out: str, then: signal.Signals) -> None:
    """Ask for a version like a subscriber, ``leave`` the note that answers (an offer is
    expected), read the first message of its frame, send ``then`` to this process."""
    offers = wire.Mailbox(dist.group.WORLD, 0, wire.OFFER_TAG)
    offers.post()
    await wire.send_note(dist.group.WORLD, 0, wire.READY_TAG, wire.Note(wire.READY, 0))
    note = await offers.take()
    leave(out, dist.get_rank(), {"kind": note.kind, "note": repr(note)})
    if note.kind != wire.OFFER:  # a guard: no frame follows; the test names the note
        raise RuntimeError(f"expected an offer, got {note}")
    head = torch.zeros(5, dtype=torch.int64)
    await anyio.to_thread.run_sync(lambda: dist.recv(head, 0, tag=wire.FRAME_TAG))
    os.kill(os.getpid(), then)


async def late_joiner(rank: int, world: int) -> dict[str, Any]:
    """Rank 2 subscribes after versions 1..3, which do not wait for it (it is absent): it gets
    version 3 at once, then version 4. The publisher's timeout is long (20 s): waiting for an
    absent subscriber would show in the seconds versions 1..3 took.

    Rank 0 returns the reports, those seconds, who was live before and after rank 2 joined,
    the states then, and what ``wait_for_subscribers`` raised for a bad ``n``, outside
    ``async with`` and after closing; rank 1 what it served; rank 2 the version it was given
    first, what applying it returned, what a request then read, what it served and how many
    versions it skipped."""
    barrier = dist.barrier
    if rank == 1:
        model = make_model()
        async with aiostage.WeightSubscriber(target=model, timeout=20) as sub:
            await anyio.to_thread.run_sync(barrier)
            await anyio.to_thread.run_sync(barrier)
            served = await serve(sub, model, last=4)
        return {"served": served}
    if rank == 2:
        await anyio.to_thread.run_sync(barrier)  # versions 1..3 are out
        model = make_model()
        async with aiostage.WeightSubscriber(target=model, timeout=20) as sub:
            with anyio.fail_after(20):
                update = await sub.wait_for(3)
            joined: dict[str, Any] = {"first": update.version, "applied": await update.apply()}
            joined["request"] = request(model)
            await anyio.to_thread.run_sync(barrier)
            joined["served"] = await serve(sub, model, last=4)
            return {**joined, "skipped": sub.skipped}
    model = make_model()
    reports = []
    unentered = aiostage.WeightPublisher(subscribers=[1, 2])
    seen: dict[str, Any] = {"unentered": await raised(unentered.wait_for_subscribers(), UsageError)}
    async with aiostage.WeightPublisher(subscribers=[1, 2], timeout=20) as pub:
        with anyio.fail_after(20):
            seen["early"] = await pub.wait_for_subscribers(1)  # rank 2 waits at the barrier
        seen["states"] = pub.states
        began = time.perf_counter()
        for v in (1, 2, 3):
            set_version(model, v)
            reports.append(await pub.publish(model.state_dict(), v))
        seen["seconds"] = time.perf_counter() - began
        await anyio.to_thread.run_sync(barrier)
        seen["everyone"] = await all_live(pub)
        await anyio.to_thread.run_sync(barrier)  # rank 2 holds version 3
        set_version(model, 4)
        reports.append(await pub.publish(model.state_dict(), 4))
        seen["bad_n"] = [await raised(pub.wait_for_subscribers(n), ValueError) for n in (-1, 3)]
    seen["closed"] = await raised(pub.wait_for_subscribers(), ClosedError)
    return {**seen, "reports": [report_seen(r) for r in reports]}


async def close_and_rejoin(rank: int, world: int) -> dict[str, Any]:
    """Rank 1 closes its subscriber (BYE), versions go on, then it subscribes again: first with a
    target of another shape (``StateDictMismatch`` on apply), then with the right one.

    Rank 0 returns both reports; rank 1 what each apply returned (the one to the wrong target:
    the ``StateDictMismatch`` it raised, ``None`` if none) and what a request then read."""
    barrier = dist.barrier
    if rank == 1:
        model = make_model()
        async with aiostage.WeightSubscriber(target=model, timeout=20) as sub:
            applied = await (await sub.wait_for(1)).apply()
        await anyio.to_thread.run_sync(barrier)  # A: closed; version 2 goes out
        await anyio.to_thread.run_sync(barrier)  # B
        wrong = make_model(hidden=32)
        async with aiostage.WeightSubscriber(target=wrong, timeout=20) as sub:
            update = await sub.wait_for(2)
            try:
                await update.apply()
            except aiostage.errors.StateDictMismatch as exc:
                mismatch = error_seen(exc)
            else:
                mismatch = None
        async with aiostage.WeightSubscriber(target=model, timeout=20) as sub:
            rejoined = await (await sub.wait_for(2)).apply()
            read = request(model)
        await anyio.to_thread.run_sync(barrier)  # C
        return {"first": applied, "mismatch": mismatch, "rejoined": rejoined, "request": read}
    model = make_model()
    async with aiostage.WeightPublisher(subscribers=[1], timeout=20) as pub:
        await all_live(pub)
        set_version(model, 1)
        first = await pub.publish(model.state_dict(), 1)
        await anyio.to_thread.run_sync(barrier)  # A
        set_version(model, 2)
        second = await pub.publish(model.state_dict(), 2)
        await anyio.to_thread.run_sync(barrier)  # B
        await anyio.to_thread.run_sync(barrier)  # C
    return {"first": report_seen(first), "second": report_seen(second)}


async def frozen_mid_transfer(rank: int, world: int, out: str) -> dict[str, Any]:
    """Rank 2 takes an offer, reads the frame's first message and freezes (SIGSTOP): the
    publisher drops it with a timeout within its bound, keeps serving rank 1, then kills it.
    Each rank ``leave``s what it saw in ``out``: rank 2 the note it was answered, rank 1 what
    it served, rank 0 both reports and the seconds the first took."""
    pid = torch.tensor([os.getpid()])
    if rank == 2:
        await anyio.to_thread.run_sync(lambda: dist.send(pid, 0, tag=77))
        await _take_offer(out, then=signal.SIGSTOP)
    if rank == 1:
        return leave(out, rank, await _serve_until_two())
    await anyio.to_thread.run_sync(lambda: dist.recv(pid, 2, tag=77))
    # the frozen rank's cleanup, once both versions are out
    first, second, seconds, _ = await _publish_two(
        FROZEN_TIMEOUT, lambda: os.kill(int(pid), signal.SIGKILL)
    )
    seen = {"first": report_seen(first), "second": report_seen(second), "seconds": seconds}
    return leave(out, rank, seen)


async def beside_replication(rank: int, world: int) -> dict[str, Any]:
    """A weight channel and a ReplicationStager between the same two ranks of the same group at
    once: each stream keeps to its own tag, so neither takes the other's frames.

    Each rank returns the step and mean of each replica it got; rank 0 who each version was
    delivered to; rank 1 what it served and what a request read at the end."""
    mine: dict[str, Any] = {"x": torch.full((1 << 18,), float(rank)), "step": rank}
    got: list[float] = []
    steps: list[Any] = []
    async with aiostage.ReplicationStager(timeout=30) as stager:

        async def replicate() -> None:
            for _ in range(5):
                replica = await stager.stage(mine)
                steps.append(replica["step"])
                got.append(float(replica["x"].mean()))
                stager.release(replica)

        model = make_model(512)
        if rank == 0:
            delivered = []
            async with (
                aiostage.WeightPublisher(subscribers=[1], timeout=30) as pub,
                anyio.create_task_group() as tg,
            ):
                tg.start_soon(replicate)
                await all_live(pub)
                for v in (1, 2, 3):
                    set_version(model, v)
                    delivered.append((await pub.publish(model.state_dict(), v)).delivered)
            return {"replicas": got, "steps": steps, "delivered": delivered}
        async with (
            aiostage.WeightSubscriber(target=model, timeout=30) as sub,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(replicate)
            served = await serve(sub, model, last=3)
    return {"replicas": got, "steps": steps, "served": served, "request": request(model)}


async def shared_memory_fallback(rank: int, world: int) -> dict[str, Any]:
    """Rank 2 runs with a /dev/shm of its own (as in another container on this host): it cannot
    map the publisher's shared memory, answers NO_SHM and gets each version over gloo; rank 1
    maps it. JSON-ready: rank 0 returns who got each version and through shared memory or not;
    the subscribers what they served, the seconds closing took and what a request then read."""
    model = make_model(256)
    if rank:
        async with aiostage.WeightSubscriber(target=model, timeout=20) as sub:
            served = await serve(sub, model, last=2)
            began = time.perf_counter()
        # closing as the publisher closes: a note that had landed as the receiver was cancelled
        # used to be lost, and closing then waited out the whole timeout
        closing = time.perf_counter() - began
        return {"served": served, "closing": closing, "version": request(model)}
    reports = []
    async with aiostage.WeightPublisher(subscribers=[1, 2], timeout=20, shared_memory=True) as pub:
        await all_live(pub)
        for v in (1, 2):
            set_version(model, v)
            reports.append(await pub.publish(model.state_dict(), v))
    return {
        "delivered": [r.delivered for r in reports],
        "shared": [[r.deliveries[p].shared_memory for p in (1, 2)] for r in reports],
    }


async def shared_memory_unavailable(rank: int, world: int) -> dict[str, Any]:
    """Rank 0 publishes versions 1-3 through shared memory, but torch's shared-memory manager
    fails (as it does when it misses its 1 s answer on a loaded host) for the region version 2
    would take: that version goes as plain frames and version 3 through shared memory again.
    Rank 0 returns who got each version and how; rank 1 what it served."""
    model = make_model(256)
    if rank:
        async with aiostage.WeightSubscriber(target=model, timeout=20) as sub:
            served = await serve(sub, model, last=3)
        return {"served": served, "version": request(model)}
    made = 0
    create = Region.create

    def fails_once(nbytes: int) -> Region:
        nonlocal made
        made += 1
        if made == 2:  # the second buffer the pool makes: version 2's (1's is still held)
            raise RuntimeError("Shared memory manager connection has timed out")
        return create(nbytes)

    Region.create = fails_once  # type: ignore[method-assign]
    reports = []
    try:
        async with aiostage.WeightPublisher(subscribers=[1], timeout=20, shared_memory=True) as pub:
            await all_live(pub)
            for v in (1, 2, 3):
                set_version(model, v)
                reports.append(await pub.publish(model.state_dict(), v))
    finally:
        Region.create = create  # type: ignore[method-assign]
    return {
        "delivered": [r.delivered for r in reports],
        "shared": [r.deliveries[1].shared_memory for r in reports],
    }


async def nothing_outlives_close(rank: int, world: int) -> dict[str, Any]:
    """Rank 0 publishes two versions to rank 1, then both exchange their states through a
    ``ReplicationStager`` with a ``storage_dir``; each rank returns what was left running after
    its objects closed (``_leftovers.left_since``), and what rank 1 received."""
    from _leftovers import Running, left_since

    before = Running.now()
    model = make_model(16)
    if rank == 0:
        async with aiostage.WeightPublisher(subscribers=[1], timeout=30) as pub:
            await all_live(pub)
            for v in (1.0, 2.0):
                set_version(model, v)
                await pub.publish(model.state_dict(), int(v))
        received: list[float] = []
    else:
        async with aiostage.WeightSubscriber(publisher=0, target=model, timeout=30) as sub:
            received = [float(u.version) async for u in sub]
    with tempfile.TemporaryDirectory() as where:
        async with aiostage.ReplicationStager(storage_dir=where, timeout=30) as stager:
            stager.release(await stager.stage({"w": torch.full((64,), float(rank))}))
            await stager.persisted()
    return {"left": await left_since(before), "received": received}
