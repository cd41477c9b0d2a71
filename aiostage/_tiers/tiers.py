"""The tiers of one Checkpointer composed: a save's one staged copy fanned out to peer memory,
the node-local disk and (by the policy) the durable root; the restore negotiation driven to a
step every rank reaches."""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import ExceptionGroup

from .._format.codec import step_name
from .._replication.stager import ReplicationStager
from .._storage.save import SaveReport, save
from ..errors import ReplicationError
from .fetch import Fetched, Holdings, fetch, limits_for
from .inplace import plan_apart
from .local import LocalTier
from .memory import Kept, MemoryTier, Shared
from .plan import Choice, Offer, choose
from .policy import TierPolicy
from .report import RestoredRank, RestoreReport, SkippedSource
from .roll import roll_call

__all__ = ["TierSave", "Tiers"]


@dataclass(frozen=True, slots=True)
class TierSave:
    """What one save cost per tier (seconds) and the report of its last write (the durable
    one when there was one)."""

    replicate_seconds: float
    persist_seconds: float
    save: SaveReport | None


class Tiers:
    """The fast tiers of group rank ``rank`` of ``world`` and their restore."""

    def __init__(self, policy: TierPolicy, root: Path, rank: int, world: int) -> None:
        self.policy, self.root, self.rank, self.world = policy, root, rank, world
        self.memory = MemoryTier()
        self.local: LocalTier | None = None
        self._newest = -1

    async def prepare(self, of: int | None) -> None:
        """Open the local tier (``of``: the rank whose replicas this one receives)."""
        if self.policy.local_dir is not None:
            self.local = LocalTier(self.policy, self.rank, of)
            await self.local.prepare()
            own = await self.local.steps(self.policy.own_dir(self.rank))
            self._newest = max(own, default=-1)

    def newest(self) -> int:
        """The newest step in a fast tier of this rank (-1: none)."""
        return self._newest

    def path(self, step: int, durable: bool) -> Path:
        """Where the save of ``step`` is reported: the durable root, else the local copy."""
        local = self.policy.own_path(self.rank, step)
        return local if local is not None and not durable else self.root / step_name(step)

    async def persist(
        self, shared: Shared, step: int, meta: dict[str, Any], durable: bool, *,
        pg: Any, repl: ReplicationStager | None, pg_timeout: float,
    ) -> TierSave:  # fmt: skip
        """Send ``shared``'s copy to the partner (kept in memory, as is the copy itself), write
        it and the partner's to the local disk, then to the durable root if ``durable``."""
        t0 = time.perf_counter()
        replica = None
        if repl is not None:
            replica = await repl.stage(shared.staged)
            release = repl.release
            self.memory.keep_replica(
                Kept(repl.receive_from, step, replica, lambda: release(replica))
            )
            self.memory.keep_own(Kept(self.rank, step, shared.staged, shared.hold().drop))
        t1 = time.perf_counter()
        report = None
        if self.local is not None:
            report = await self.local.write_own(step, shared.staged, self.world)
            if replica is not None:
                await self.local.write_replica(step, replica, self.world)
        self._newest = max(self._newest, step)
        if durable:
            report = await save(
                shared.staged, self.root / step_name(step), pg=pg, overwrite=True,
                metadata=meta, timeout=pg_timeout,
            )  # fmt: skip
        return TierSave(t1 - t0, time.perf_counter() - t1, report)

    async def offer(self, durable: list[int]) -> Offer:
        """What this rank can supply (``durable``: the committed steps of the root)."""
        own, replica = self.memory.own, self.memory.replica
        local, stored = [], {}
        if self.local is not None:
            local = await self.local.steps(self.policy.own_dir(self.rank))
            stored = {r: s for r, s in (await self.local.replicas()).items() if r != self.rank}
        return Offer(
            [own.step] if own is not None else [], local,
            {replica.of: [replica.step]} if replica is not None else {}, stored, durable,
        )  # fmt: skip

    async def restore(
        self, into: Any, durable: list[int], *, pg: Any, pg_timeout: float
    ) -> RestoreReport:
        """The collective restore over ``pg`` (see ``Checkpointer.restore``)."""
        began = time.perf_counter()
        have = Holdings(self.rank, pg, self.memory, self.local, self.root, pg_timeout)
        try:
            async with anyio.create_task_group() as tg:  # while the ranks agree: what a
                tg.start_soon(self._plan_replica)  # partner may be given, and may send
                tg.start_soon(_limits, have, into)
                rows = await roll_call(pg, (await self.offer(durable)).row(),
                                       pg_timeout=pg_timeout, what="restore")  # fmt: skip
        except ExceptionGroup as group:  # the roll call's own error (the others raise none)
            raise group.exceptions[0] from None
        offers = [_offer(r, row) for r, row in enumerate(rows)]
        bad: set[Choice] = set()
        skipped: list[SkippedSource] = []
        while True:
            plan = choose(offers, bad)
            got = await fetch(have, plan, into)
            outcomes = await roll_call(pg, _outcome(got), pg_timeout=pg_timeout, what="restore")
            failed = _failures(plan, outcomes)
            if not failed:
                break
            bad.update(plan[s.rank] for s in failed)
            skipped += failed
        await self._forget_after(plan[0].step)
        ranks = tuple(
            RestoredRank(c.rank, c.source, c.holder, int(o["bytes"]), float(o["seconds"]))
            for c, o in zip(plan, outcomes, strict=True)
        )
        elapsed = time.perf_counter() - began
        return RestoreReport(plan[0].step, self.rank, ranks, tuple(skipped), elapsed, got.state)

    async def _plan_replica(self) -> None:
        """Lay out the partner's replica in memory to give (``plan_apart``), once; what fails
        here fails again where it is given, and is raised there."""
        kept = self.memory.replica
        if kept is None or kept.planned is not None:
            await anyio.lowlevel.checkpoint()
            return
        with contextlib.suppress(Exception):
            kept.planned = await anyio.to_thread.run_sync(plan_apart, kept.state)

    async def _forget_after(self, step: int) -> None:
        """After restoring ``step``, newer fast copies belong to a history that is gone: they
        go, and the ordering check starts from ``step``."""
        self._newest = step
        if self.local is not None:
            await self.local.forget_after(step)
        for kept in (self.memory.own, self.memory.replica):
            if kept is not None and kept.step > step:
                self.memory.clear()
                return


async def _limits(have: Holdings, into: Any) -> None:
    """``have.limits`` for ``into``; what fails here fails again in ``fetch``, raised there."""
    with contextlib.suppress(Exception):
        have.limits = await anyio.to_thread.run_sync(limits_for, into)


def _offer(rank: int, row: Any) -> Offer:
    try:
        return Offer.of_row(row)
    except (ValueError, TypeError) as exc:
        raise ReplicationError(f"a malformed offer: {exc}", peer=rank, phase="restore") from exc


def _outcome(got: Fetched) -> dict[str, Any]:
    """This rank's fetch as the roll call's row."""
    return {
        "ok": got.state is not None, "reason": got.reason, "bytes": got.bytes,
        "seconds": got.seconds, "unable": [[r, why] for r, why in got.unable],
    }  # fmt: skip


def _failures(plan: list[Choice], outcomes: list[Any]) -> list[SkippedSource]:
    """The ranks whose fetch failed, each with the holder's reason where it gave one."""
    unable = {int(r): str(why) for o in outcomes for r, why in o["unable"]}
    return [
        SkippedSource(c.rank, c.step, c.source, c.holder, unable.get(c.rank, str(o["reason"])))
        for c, o in zip(plan, outcomes, strict=True)
        if not o["ok"]
    ]
