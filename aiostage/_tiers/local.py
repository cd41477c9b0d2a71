"""The node-local tier: each rank's own copies and the replicas it received, written as one-rank
checkpoints with the durable tier's temp/fsync/rename commit, and its retention."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

from .._format.codec import STEP_NAME, step_name
from .._storage.locate import locate
from .._storage.save import SaveReport, save
from .policy import TierPolicy, local_holder

__all__ = ["LocalTier"]

_log = logging.getLogger("aiostage")


class LocalTier:
    """The local directories of group rank ``rank``: its own copies and those of ``of`` (the
    rank whose replicas it receives), ``keep`` steps each."""

    def __init__(self, policy: TierPolicy, rank: int, of: int | None) -> None:
        assert policy.local_dir is not None
        self.storage = locate(policy.local_dir)[0]
        self.policy, self.rank, self.of = policy, rank, of

    async def prepare(self) -> None:
        """Create the directories and clear what interrupted writes left (found at entry)."""
        for where in self._dirs():
            await self.storage.make_root(where)
            await self.storage.sweep(where, _stuck)

    def _dirs(self) -> list[Path]:
        own = self.policy.own_dir(self.rank)
        replica = self.policy.replica_dir(self.of) if self.of is not None else None
        return [d for d in (own, replica) if d is not None]

    async def write_own(self, step: int, staged: Any, world: int) -> SaveReport:
        """Write this rank's staged copy of ``step`` and apply retention."""
        meta = {"step": step, "rank": self.rank, "world_size": world}
        where = self.policy.own_dir(self.rank)
        assert where is not None
        return await self._write(where, step, staged, meta)

    async def write_replica(self, step: int, replica: Any, world: int) -> SaveReport:
        """Write the replica of rank ``of`` at ``step`` received from it; apply retention."""
        assert self.of is not None
        where = self.policy.replica_dir(self.of)
        assert where is not None
        meta = {"step": step, "replica_of": self.of, "rank": self.rank, "world_size": world}
        return await self._write(where, step, replica, meta)

    async def _write(self, where: Path, step: int, state: Any, meta: dict[str, Any]) -> SaveReport:
        report = await save(state, where / step_name(step), overwrite=True, metadata=meta)
        await self._retain(where)
        return report

    async def steps(self, where: Path | None) -> list[int]:
        """The committed steps in ``where`` (none when it does not exist)."""
        if where is None or await self.storage.kind(where) == "absent":
            return []
        found = await self.storage.scan(where)
        return sorted(
            int(m["step"])
            for name, kind in found
            if (m := STEP_NAME.match(name)) and kind == "checkpoint"
        )

    async def replicas(self) -> dict[int, list[int]]:
        """The steps of every rank whose replicas this node holds, by rank."""
        assert self.policy.local_dir is not None
        out: dict[int, list[int]] = {}
        if await self.storage.kind(self.policy.local_dir) == "absent":
            return out
        for name, _ in await self.storage.scan(self.policy.local_dir):
            holder = local_holder(name)
            if holder is not None and holder[0] == "replica":
                steps = await self.steps(self.policy.local_dir / name)
                if steps:
                    out[holder[1]] = steps
        return out

    async def forget_after(self, step: int) -> None:
        """Delete the copies newer than ``step`` (a history a restore went back from)."""
        for where in self._dirs():
            for newer in [s for s in await self.steps(where) if s > step]:
                await self._delete(where / step_name(newer))

    async def _retain(self, where: Path) -> None:
        """Delete the oldest steps in ``where`` beyond ``keep_local``; log what cannot go."""
        keep = self.policy.keep_local
        steps = await self.steps(where)
        if keep is None or len(steps) <= keep:
            return
        for step in steps[:-keep]:
            await self._delete(where / step_name(step))

    async def _delete(self, path: Path) -> None:
        """Delete a local copy at once; one that cannot go is logged (it is never restored
        from unless every other rank has its step too)."""
        try:
            await self.storage.delete(path, uuid.uuid4().hex)
        except OSError as exc:
            _log.warning("the local tier could not delete %s (%s)", path, exc)


def _stuck(path: Any, error: OSError) -> None:
    """A leftover of an interrupted local write that cannot be removed: logged, then ignored."""
    _log.warning("%s: a leftover of an interrupted local write stays (%s)", path, error)
