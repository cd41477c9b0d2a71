"""The ``Checkpointer``: a save returns once the state is staged; replication, persistence,
commit and retention go on in the background.

It runs them one save at a time in a task it owns (so every rank issues its collectives in the
same order), on a private gloo group (so they never interleave with the training loop's own
collectives), and deletes old checkpoints only after a newer one is committed. See
``docs/checkpointer.md`` and, for ``local_dir``, ``durable_every`` and ``restore``,
``docs/tiers.md``.
"""

from __future__ import annotations

import time
from datetime import timedelta
from types import TracebackType
from typing import Any, Literal

import anyio.lowlevel

from .._async_save import CheckpointReport, Job, SaveHandle, Settler, persist_job, unstorable
from .._core import dist
from .._core.timeouts import DEFAULT_TIMEOUT, seconds
from .._format.codec import step_name
from .._replication.stager import ReplicationStager
from .._staging import AsyncStager, DefaultStager, StagingOptions
from .._storage.locate import PathLike, locate
from .._storage.reader import load
from .._tiers.memory import Shared
from .._tiers.policy import TierPolicy
from .._tiers.report import RestoreReport
from .._tiers.tiers import Tiers
from .._train_state import as_state_dict
from ..errors import CheckpointNotFound, ClosedError, UsageError
from .agreement import agree, skipped
from .background import Background
from .steps import RootSteps

__all__ = ["Checkpointer"]


class Checkpointer:
    """Checkpoint a training loop every few steps into ``root/step_NNNNNNNNN``.

    ``async with Checkpointer(root) as ckpt: handle = await ckpt.save(step, state)`` returns
    once ``state`` is staged (the training-visible stall); replication (``replicate=True``:
    a ``ReplicationStager`` keeps each rank's state in its partner's memory, see ``recover``),
    the durable write, the commit and retention (``keep_last`` newest committed checkpoints
    kept; older ones deleted only after a newer one is committed) run in a background task.
    At most ``max_in_flight`` saves are staged or persisting; beyond that ``save`` waits
    (``on_busy="wait"``) or returns a skipped handle (``"skip"``, agreed by every rank).

    On entry it clears what crashed saves left (``sweep``) and warns (``AiostageWarning``) about
    entries of ``root`` that are not checkpoints. A failed background save is raised at the next
    ``save`` and at ``aclose`` unless its handle already delivered it; ``aclose`` waits for saves
    in flight. With ``pg`` (gloo; every rank of the default group enters the Checkpointer, as it
    creates private groups), ``root`` must be shared by the ranks; group rank 0 deletes old steps.
    ``timeout`` (seconds or ``timedelta``, default 600) is the longest any one wait for another
    rank may take (a collective, a send or a receive); past it that save fails
    (``CheckpointWriteError``, or ``ReplicationTimeout`` from the replication). Raises
    ``ValueError`` for a bad ``keep_last``, ``max_in_flight``, ``on_busy`` or ``timeout``.

    Tiers (docs/tiers.md): with ``local_dir`` (a node-local directory) every save is also
    written there (``local_dir/rank_NNNNN``, and with ``replicate`` the partner's replica in
    ``local_dir/replica_of_rank_NNNNN``; ``keep_local`` steps each) and, with ``replicate``,
    kept in memory (this rank's staged copy and its partner's) until the next save; only
    steps that are multiples of ``durable_every`` (or ``save(..., durable=True)``) reach
    ``root``. ``restore`` brings every rank back to the newest step they all can reach.
    """

    def __init__(
        self,
        root: PathLike,
        *,
        keep_last: int | None = 3,
        stager: AsyncStager | None = None,
        pg: Any = None,
        replicate: bool = False,
        max_in_flight: int = 1,
        on_busy: Literal["wait", "skip"] = "wait",
        timeout: float | timedelta = DEFAULT_TIMEOUT,
        local_dir: PathLike | None = None,
        durable_every: int = 1,
        keep_local: int | None = 2,
    ) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be at least 1 (or None: keep all), got {keep_last}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        if on_busy not in ("wait", "skip"):
            raise ValueError(f'on_busy must be "wait" or "skip", got {on_busy!r}')
        self._storage, self.root = locate(root)
        self.keep_last, self.max_in_flight, self.on_busy = keep_last, max_in_flight, on_busy
        self._pg, self._replicate, self._timeout = pg, replicate, seconds(timeout)
        local = locate(local_dir)[1] if local_dir is not None else None
        policy = TierPolicy(local, durable_every, keep_local, replicate)
        self._own_stager = stager is None
        kept = int(replicate and (local is not None or durable_every > 1))  # the memory tier's
        self._copies = max_in_flight + kept  # staged copies held at once, at most
        self._stager = stager or DefaultStager(StagingOptions(pool_size=self._copies))
        self._rank, self._world = dist.rank_and_size(pg) if pg is not None else (0, 1)
        tiered = local is not None or durable_every > 1
        self._tiers = Tiers(policy, self.root, self._rank, self._world) if tiered else None
        self._durable: dict[int, bool] = {}  # the tier each pending step goes to
        self._bg: Any = None  # private groups: background saves, and each save's agreement
        self._fg: Any = None
        self._repl: ReplicationStager | None = None
        self._saves = Background(max_in_flight, self._persist, self._committed, self._ended)
        self._steps = RootSteps(self._storage, self.root, keep_last, self._rank)
        self._pending: list[int] = []  # steps accepted by save, not yet committed or failed
        self._state = "new"

    # ------------------------------------------------------------ lifetime

    async def __aenter__(self) -> Checkpointer:
        if self._state != "new":
            raise UsageError("a Checkpointer can be entered once; create a new one")
        self._state = "open"
        await self._join()
        if self._tiers is not None:
            await self._tiers.prepare(self._repl.receive_from if self._repl is not None else None)
        try:
            await self._steps.prepare()
        except UsageError:
            self._state = "closed"
            raise
        await self._saves.start()
        return self

    async def _join(self) -> None:
        """The private groups over ``pg`` and the replication stager on them."""
        if self._pg is not None and self._world > 1:
            self._bg = await dist.private_group(self._pg)
            self._fg = await dist.private_group(self._pg)
        if self._replicate:
            verify = self._tiers is not None  # its replicas are written again: check them now
            self._repl = ReplicationStager(
                self._bg, timeout=self._timeout, verify_on_arrival=verify
            )

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._close(raise_failure=e is None)  # never mask the body's own exception

    async def aclose(self) -> None:
        """Wait for the saves in flight, stop the background task and free the buffers; then
        raise the first background failure nobody received. Idempotent."""
        await self._close(raise_failure=True)

    async def _close(self, *, raise_failure: bool) -> None:
        if self._state != "open":
            await anyio.lowlevel.checkpoint()
            return
        self._state = "closed"
        try:
            await self._saves.close()
        finally:
            if self._tiers is not None:
                self._tiers.memory.clear()
            if self._repl is not None:
                await self._repl.aclose()
            if self._own_stager:
                await self._stager.aclose()
        if raise_failure:
            self._raise_failure()

    # ------------------------------------------------------------ saving

    async def save(
        self,
        step: int,
        state_dict: Any,
        metadata: dict[str, Any] | None = None,
        *,
        overwrite: bool = False,
        overlap: bool = False,
        durable: bool | None = None,
    ) -> SaveHandle:
        """Stage ``state_dict`` as checkpoint ``step``; return once it is staged.

        ``overlap=True`` (zero-stall): return as soon as the copy is issued, so it overlaps the
        next forward and backward pass; ``await handle.staged`` before anything changes the
        state in place (``optimizer.step()``). A tensor changed before that fails the save with
        ``StagingError`` naming its key (at ``handle.staged`` and ``handle.committed``), as
        does any other staging error after the copy was issued.

        ``metadata`` (JSON) is stored with ``"step"`` added. ``step`` must be newer than every
        step committed or being saved (the newest again only with ``overwrite=True``, which
        replaces it); with ``pg`` the ranks agree first (a small all-gather) and all save or all
        raise. Blocks on a free slot (``on_busy="wait"``) and on staging. Raises an earlier
        background failure first (that save is lost; this one is not attempted),
        ``UnsupportedValueError`` naming the key of a value the format cannot store (before
        staging), ``UsageError`` for a step that exists or is older or outside ``async with``
        (``ClosedError`` after it), and what staging raises.

        ``durable``: with tiers, whether this save reaches ``root`` (default: ``step`` is a
        multiple of ``durable_every``); the same on every rank. ``handle.path`` is then the
        durable path, else this rank's local copy.
        """
        self._check_open()
        began = time.perf_counter()
        to_root = self._tiers is None or self._tiers.policy.durable(step, durable)
        path = self._tiers.path(step, to_root) if self._tiers else self.root / step_name(step)
        meta = {**(metadata or {}), "step": step}
        state_dict = await as_state_dict(state_dict)
        refused = await unstorable(state_dict, meta)
        if await self._agree(step, overwrite, refused, to_root):
            return skipped(step, path, began)
        job = Job(Settler(step, path), None, self._stager, meta, began)
        self._pending.append(step)
        self._durable[step] = to_root
        try:
            await self._saves.queue(job, state_dict, overlap)
        except BaseException:
            self._pending.remove(step)
            raise
        return job.handle

    async def reserve(self, state_dict: Any) -> None:
        """Prepare the staging buffers for state dicts laid out like ``state_dict`` now (e.g.
        ``train_state(model, optimizer)`` right after building them), so the first ``save``
        stalls training no longer than the later ones. Blocks on nothing; a no-op with a
        ``stager`` that has no ``reserve``."""
        self._check_open()
        reserve = getattr(self._stager, "reserve", None)
        if reserve is not None:
            await reserve(await as_state_dict(state_dict), self._copies)

    def _check_open(self) -> None:
        """Saving needs the background task that ``async with`` runs (reading does not)."""
        if self._state == "new":
            raise UsageError(
                "this Checkpointer was not entered: save, reserve and recover need `async with "
                "Checkpointer(root) as ckpt:` (latest, load and steps work without)"
            )
        if self._state == "closed":
            raise ClosedError("this Checkpointer is closed; create a new one to save again")

    async def _agree(
        self, step: int, overwrite: bool, unstorable: Exception | None, durable: bool = True
    ) -> bool:
        """This rank's side of the save agreement (``agreement.agree``): raise what stops the
        save on every rank; return whether every rank skips it."""
        failure = self._saves.unseen_failure()
        fast = self._tiers.newest() if self._tiers is not None else -1
        newest = max([*self._steps.committed, *self._pending, fast])
        busy = self.on_busy == "skip" and self._saves.busy()
        mine = [step, newest, overwrite, busy, unstorable is not None, failure is not None]
        mine.append(durable)
        return await agree(
            self._fg, [int(v) for v in mine], failure=failure, unstorable=unstorable,
            root=self.root, keep_last=self.keep_last, pg_timeout=self._timeout,
        )  # fmt: skip

    async def _persist(self, job: Job) -> tuple[CheckpointReport, bool]:
        """Replicate, write and commit ``job`` to its tiers; whether it reached ``root``."""
        if self._tiers is None:
            args = {"pg": self._bg, "replication": self._repl, "pg_timeout": self._timeout}
            return await persist_job(job, **args), True
        assert job.handle.step is not None
        step, durable = job.handle.step, self._durable[job.handle.step]
        shared = Shared(job.staged, job.stager.release)
        try:
            done = await self._tiers.persist(
                shared, step, job.metadata or {}, durable, pg=self._bg, repl=self._repl,
                pg_timeout=self._timeout,
            )  # fmt: skip
        finally:
            shared.drop()
        return CheckpointReport(
            step, job.handle.path, False, job.stall, job.wait, job.stage, done.replicate_seconds,
            done.persist_seconds, time.perf_counter() - job.began, job.stage_bytes, done.save,
        ), durable  # fmt: skip

    async def _committed(self, step: int | None) -> None:
        """``step`` reached the root: count it, then apply retention."""
        self._steps.add(step)
        await self._steps.retain()

    def _ended(self, job: Job) -> None:
        """``job`` is over (committed, failed or cancelled): its step is no longer pending."""
        if job.handle.step is not None:
            self._pending.remove(job.handle.step)
            self._durable.pop(job.handle.step, None)

    def _raise_failure(self) -> None:
        """Raise the first background failure that no ``await handle.committed`` delivered."""
        error = self._saves.unseen_failure()
        if error is not None:
            raise error

    # ------------------------------------------------------------ steps and loading

    def steps(self) -> list[int]:
        """The committed steps this Checkpointer knows of: found on entry or saved since, less
        those its retention deleted (no file-system access; ``latest`` rescans)."""
        return list(self._steps.committed)

    async def latest(self) -> int | None:
        """The newest committed step in ``root`` (rescanned: another process may have saved
        one), or ``None``."""
        found = await self._steps.scan()
        return found[-1] if found else None

    async def load(self, step: int | None = None, *, into: Any = None) -> Any:
        """Load checkpoint ``step`` (default: the latest) through ``aiostage.load``.

        Raises ``CheckpointNotFound`` when there is none (or ``step`` was not committed), and
        whatever ``aiostage.load`` raises.
        """
        if step is None:
            step = await self.latest()
            if step is None:
                raise CheckpointNotFound(f"no committed checkpoint in {self.root}", path=self.root)
        return await load(self.root / step_name(step), into=into, pg=self._pg)

    async def recover(self, *, lost: bool, like: Any = None) -> Any:
        """``ReplicationStager.recover`` of the latest replicated save (``replicate=True``)."""
        self._check_open()
        if self._repl is None:
            raise UsageError("recover() needs Checkpointer(..., replicate=True)")
        return await self._repl.recover(lost=lost, like=like)

    async def restore(self, *, into: Any) -> RestoreReport:
        """Bring every rank back to the newest step all of them can reach (a collective).

        Each rank offers the steps it can supply from each tier (its memory, its local disk,
        a partner's memory or disk, ``root``); the ranks agree on the newest step whose every
        rank's state is obtainable, and each copies its state into ``into`` (a state dict of
        existing tensors) from its fastest source, verified by checksum: a source that fails
        is skipped for the next (``report.skipped``), which overwrites what it left (a
        partner's copy lands in ``into``'s tensors as it arrives, so a restore that raises may
        leave ``into`` partly written). Newer local copies are deleted.
        Runs over the private groups under ``timeout``. Raises ``CheckpointNotFound`` on every
        rank (naming what each had) when no step is obtainable everywhere,
        ``ReplicationTimeout`` naming a rank that did not answer, ``StateDictMismatch`` when
        ``into`` differs, and ``UsageError`` without tiers (``local_dir=``, ``durable_every=``).
        """
        self._check_open()
        if self._tiers is None:
            raise UsageError("restore() needs tiers: Checkpointer(..., local_dir=...)")
        await self._saves.wait_idle()  # no save in flight: it would hold the groups
        try:
            durable = await self._steps.scan()
            return await self._tiers.restore(into, durable, pg=self._fg, pg_timeout=self._timeout)
        finally:
            self._saves.resume()

    async def rejoin(self, pg: Any) -> None:
        """Move onto ``pg``, the process group rebuilt after ranks were restarted, keeping
        what this process holds in memory; then call ``restore``.

        Collective: every rank of the new default group calls it, or enters a new
        ``Checkpointer`` (a restarted rank). Waits for the saves in flight (their peer is
        gone: they fail). Raises ``UsageError`` when this rank's group rank or the group's
        size changed.
        """
        self._check_open()
        if dist.rank_and_size(pg) != (self._rank, self._world):
            raise UsageError(
                f"rejoin: rank {self._rank} of {self._world} is rank "
                f"{dist.rank_and_size(pg)[0]} of {dist.rank_and_size(pg)[1]} in the new group; "
                "keep every rank's number and the world size"
            )
        await self._saves.wait_idle()
        old = self._repl
        try:
            self._pg = pg
            await self._join()
        finally:
            self._saves.resume()
        if self._tiers is not None:
            self._tiers.memory.orphan_replica()
        if old is not None:
            await old.aclose()
