"""Spawned gloo worlds for tests: run one function on N fresh ranks and collect what each returns.

The parent hosts the group's ``TCPStore`` itself on a port the kernel picks (port 0), so no port
is ever guessed and no rank can lose a bind race. Each rank is a "spawn" process that joins the
group through that store, runs ``fn(rank, world_size, *args)`` (``asyncio.run`` when it returns a
coroutine), sends one pickled message back through its own pipe and destroys the group. The
parent waits on the pipes and the process sentinels together, gives the other ranks ``_GRACE``
seconds once one rank has failed, SIGKILLs whatever is left and reaps every child. Failures are
ordered by the (system-wide) monotonic clock reading at which each happened, so the rank that
raised is named before the peers that only saw its connection drop.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import inspect
import math
import multiprocessing
import os
import pickle
import signal
import sys
import time
import traceback
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from multiprocessing.context import SpawnContext, SpawnProcess
from typing import Any

import anyio.from_thread
import anyio.to_thread
import torch.distributed as dist
from torch._C._distributed_c10d import TCPStore  # torch.distributed.TCPStore, typed

__all__ = ["RankFailure", "WorldError", "WorldTimeout", "arun_world", "run_world"]

_HOST = "127.0.0.1"
#: seconds the other ranks get to report on their own once one rank has failed
_GRACE = 3.0
#: longest single wait of the supervisor, so that ``arun_world`` notices cancellation promptly
_POLL = 0.1
#: prctl(2) option: the signal a Linux process gets when the thread that started it ends
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class RankFailure:
    """Why one rank failed: what it raised (with the remote traceback) or how its process ended.

    ``summary`` completes the sentence "rank 1 of 2 ...", ``exitcode`` is the process's exit
    status (negative: the signal that ended it), ``traceback`` the remote traceback text.
    """

    rank: int
    summary: str
    exitcode: int | None = None
    traceback: str | None = None

    @property
    def signal(self) -> str | None:
        """Name of the signal that ended the rank (``"SIGKILL"``), ``None`` if none did."""
        return _signal_name(self.exitcode) if self.exitcode is not None else None


class WorldError(AssertionError):
    """A rank of a ``run_world`` world failed; ``failures`` lists the failed ranks, first first."""

    def __init__(self, message: str, failures: tuple[RankFailure, ...]) -> None:
        super().__init__(message)
        self.failures = failures

    @property
    def ranks(self) -> tuple[int, ...]:
        """The failed ranks, in the order their failures were seen."""
        return tuple(f.rank for f in self.failures)

    @property
    def rank(self) -> int:
        """The rank that failed first."""
        return self.failures[0].rank


class WorldTimeout(WorldError, TimeoutError):
    """The world ran past its timeout; ``ranks`` names the ranks still running (all SIGKILLed)."""

    def __init__(self, message: str, failures: tuple[RankFailure, ...], timeout: float) -> None:
        super().__init__(message, failures)
        self.timeout = timeout


def run_world(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 60.0,
    backend: str = "gloo",
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; return each result.

    Every rank is a fresh "spawn" process joined in a ``torch.distributed`` group (``backend``)
    on 127.0.0.1; ``fn`` may be ``async def`` (run with ``asyncio.run``). ``fn`` and ``args`` are
    pickled by reference, so ``fn`` must be a top-level function of a module the ranks can import
    (they get the parent's ``sys.path``): no lambda, closure or function defined in a test body.
    Results must be picklable; they come back as a list indexed by rank.

    Blocks the calling thread until every rank has exited, at most about ``timeout`` seconds
    (spawn and group set-up included); use ``arun_world`` from async code. Raises ``WorldError``
    naming the rank that raised (with its remote traceback) or died (with its signal or exit
    code), ``WorldTimeout`` naming the ranks still running at the deadline, ``TypeError`` when
    ``fn`` or ``args`` cannot be pickled and ``ValueError`` for a bad ``world_size`` or
    ``timeout``. Every child is reaped before it returns or raises, whatever happened.
    """
    return _run_world(fn, world_size, args, timeout=timeout, backend=backend, check=None)


async def arun_world(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 60.0,  # noqa: ASYNC109 - the world's deadline: it names the hung ranks
    backend: str = "gloo",
) -> list[Any]:
    """Await ``run_world`` (same arguments, results and errors) run in a worker thread.

    Waits without blocking the event loop. Cancelling the caller (``anyio.fail_after`` too)
    SIGKILLs the ranks within about 0.1 s and re-raises the cancellation once every child is
    reaped.
    """
    run = functools.partial(_run_world, fn, world_size, args, timeout=timeout, backend=backend)
    return await anyio.to_thread.run_sync(lambda: run(check=anyio.from_thread.check_cancelled))


# ---------------------------------------------------------------- the parent


@dataclass(frozen=True)
class _Setup:
    """What a spawned rank needs: who it is, the pickled call, and where the store listens."""

    rank: int
    world_size: int
    payload: bytes
    port: int
    backend: str
    timeout: float
    parent: int


@dataclass(eq=False)
class _Rank:
    """The parent's view of one rank: its process, its pipe, and what became of it."""

    rank: int
    process: SpawnProcess
    conn: Connection | None
    message: tuple[Any, ...] | None = None
    exited: bool = False
    killed: bool = False
    failure: RankFailure | None = None
    #: ``time.monotonic()`` of the failure (the rank's own clock reading when it raised)
    failed_at: float = math.inf

    def waitables(self) -> list[Any]:
        """What to wait on for this rank: its pipe until read, its sentinel until it exits."""
        objs: list[Any] = [] if self.conn is None else [self.conn]
        return objs if self.exited else [*objs, self.process.sentinel]

    def update(self, ready: Collection[Any], since: float) -> None:
        """Read a message or reap an exit that ``wait`` reported; ``since``: last seen running."""
        if self.conn is not None and self.conn in ready:
            self._receive(since)
        if not self.exited and self.process.sentinel in ready:
            if self.conn is not None and self.conn.poll():
                self._receive(since)  # the message that was sent just before the exit
            self.process.join()
            self.exited = True
            if self.failure is None:
                self._fail(_exit_failure(self), since)

    def _receive(self, since: float) -> None:
        assert self.conn is not None
        try:
            self.message = pickle.loads(self.conn.recv_bytes())
        except (EOFError, OSError):
            pass  # died before (or while) sending; the exit status tells why
        except Exception as exc:
            summary = f"returned a result the parent cannot unpickle: {exc!r}"
            self.message = ("error", summary, "", since)
        self.conn.close()
        self.conn = None
        if self.message is not None and self.message[0] == "error":
            _, summary, remote, at = self.message
            self._fail(RankFailure(self.rank, summary, traceback=remote or None), at)

    def _fail(self, failure: RankFailure | None, at: float) -> None:
        if failure is not None:
            self.failure, self.failed_at = failure, at


def _exit_failure(r: _Rank) -> RankFailure | None:
    """The failure an exit status reveals: no result, or a non-zero status after one."""
    code = r.process.exitcode
    assert code is not None
    how = f"was killed by signal {_signal_name(code)}" if code < 0 else f"exited with code {code}"
    if r.message is None:
        return RankFailure(r.rank, f"{how} before returning a result", code)
    return RankFailure(r.rank, f"returned a result but then {how}", code) if code else None


def _run_world(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple[Any, ...],
    *,
    timeout: float,
    backend: str,
    check: Callable[[], None] | None,
) -> list[Any]:
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    payload = _pickle_call(fn, args)
    deadline = time.monotonic() + timeout
    ctx = multiprocessing.get_context("spawn")
    span = timedelta(seconds=timeout)
    store = TCPStore(_HOST, 0, None, True, span, wait_for_workers=False)
    ranks: list[_Rank] = []
    try:
        for rank in range(world_size):
            setup = _Setup(rank, world_size, payload, store.port, backend, timeout, os.getpid())
            ranks.append(_start(ctx, setup))
        _supervise(ranks, deadline, check)
    finally:
        _reap(ranks)
    return _outcome(ranks, timeout)


def _pickle_call(fn: Callable[..., Any], args: tuple[Any, ...]) -> bytes:
    try:
        return pickle.dumps((fn, args))
    except Exception as exc:
        raise TypeError(
            f"run_world cannot send {fn!r} and its arguments to spawned ranks ({exc}); pass a "
            "top-level function of an importable module (not a lambda, closure or local "
            "function) and picklable arguments"
        ) from exc


def _start(
    ctx: SpawnContext,
    setup: Any,
    main: Callable[[Any, Connection], None] | None = None,
    name: str | None = None,
) -> _Rank:
    """Spawn rank ``setup.rank`` running ``main(setup, conn)`` (default ``_rank_main``), its
    result to come back through the pipe's reading end."""
    reader, writer = ctx.Pipe(duplex=False)
    process = ctx.Process(
        target=main or _rank_main, args=(setup, writer), name=name or f"rank-{setup.rank}"
    )
    try:
        process.start()
    except BaseException:
        reader.close()
        raise
    finally:
        writer.close()  # the child holds its own copy; ours would hide its EOF
    return _Rank(setup.rank, process, reader)


def _supervise(ranks: list[_Rank], deadline: float, check: Callable[[], None] | None) -> None:
    """Wait until every rank exits, the deadline passes, or ``_GRACE`` after a first failure."""
    limit, since = deadline, time.monotonic()
    while not all(r.exited for r in ranks):
        left = limit - time.monotonic()
        if left <= 0:
            break
        ready = wait([obj for r in ranks for obj in r.waitables()], timeout=min(left, _POLL))
        now = time.monotonic()
        if check is not None:
            check()
        for r in ranks:
            r.update(ready, since)
        if any(r.failure for r in ranks):
            limit = min(limit, now + _GRACE)
        since = now  # whatever ``wait`` did not report was still running then
    for r in ranks:  # settle ranks that exited after the last wait
        if not r.exited and r.process.exitcode is not None:
            r.update(r.waitables(), since)


def _reap(ranks: list[_Rank]) -> None:
    """SIGKILL every rank still running, then join and close everything."""
    for r in ranks:
        if r.process.exitcode is None:
            r.process.kill()
            r.killed = True
    for r in ranks:
        r.process.join()
        r.process.close()
        if r.conn is not None:
            r.conn.close()
            r.conn = None


def _outcome(ranks: list[_Rank], timeout: float) -> list[Any]:
    """The results by rank, or the ``WorldError`` / ``WorldTimeout`` that describes the run."""
    failed = sorted((r for r in ranks if r.failure), key=lambda r: (r.failed_at, r.rank))
    killed = [r.rank for r in ranks if r.killed]
    if failed:
        failures = tuple(r.failure for r in failed if r.failure)
        raise WorldError(_describe(failures, killed, len(ranks)), failures)
    if killed:
        hung = tuple(_hung(r, timeout) for r in ranks if r.killed)
        raise WorldTimeout(_describe(hung, [], len(ranks)), hung, timeout)
    return [r.message[1] if r.message else None for r in ranks]


def _hung(r: _Rank, timeout: float) -> RankFailure:
    where = "in teardown, after returning a result" if r.message else "without returning a result"
    summary = f"was still running {where} when the {timeout} s timeout ran out (SIGKILLed)"
    return RankFailure(r.rank, summary, -signal.SIGKILL)


def _describe(failures: tuple[RankFailure, ...], killed: list[int], world_size: int) -> str:
    lines = [f"rank {f.rank} of {world_size} {f.summary}" for f in failures]
    if killed:
        who = ", ".join(map(str, killed))
        lines.append(f"(then SIGKILLed rank(s) {who}, still running)")
    for f in failures:
        if f.traceback:
            lines += ["", f"--- traceback of rank {f.rank} ---", f.traceback.rstrip()]
    return "\n".join(lines)


def _signal_name(exitcode: int) -> str | None:
    if exitcode >= 0:
        return None
    try:
        return signal.Signals(-exitcode).name
    except ValueError:
        return f"signal {-exitcode}"


# ---------------------------------------------------------------- a rank


def _rank_main(setup: _Setup, conn: Connection) -> None:
    """Entry point of a spawned rank: run the call, send one message, leave the group, exit.

    The message goes out before ``destroy_process_group`` (a peer never sees the connection drop
    first), then ``os._exit``: finalizing, a native thread of torch's can abort it (SIGABRT).
    """
    _die_with_parent(setup.parent)
    try:
        conn.send_bytes(_attempt(setup))
    finally:
        conn.close()
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _attempt(setup: Any, run: Callable[[Any], Any] | None = None) -> bytes:
    """The pickled message for the parent: ``("ok", result)`` or ``("error", ...)``;
    ``run(setup)`` (default ``_run_rank``) runs the call."""
    message: tuple[Any, ...]
    try:
        message = ("ok", (run or _run_rank)(setup))
    except BaseException as exc:  # reported to the parent, which raises WorldError for it
        summary = f"raised {type(exc).__qualname__}: {exc}"
        message = ("error", summary, traceback.format_exc(), time.monotonic())
    try:
        return pickle.dumps(message)
    except Exception as exc:
        summary = f"returned a result that cannot be pickled: {exc!r}"
        return pickle.dumps(("error", summary, "", time.monotonic()))


def _run_rank(setup: _Setup) -> Any:
    try:
        fn, args = pickle.loads(setup.payload)
    except Exception as exc:
        raise RuntimeError(
            "the spawned rank cannot import the function run_world was given; it must be a "
            "top-level function of a module importable from the parent's sys.path"
        ) from exc
    rank, size, span = setup.rank, setup.world_size, timedelta(seconds=setup.timeout)
    store = TCPStore(_HOST, setup.port, size, False, span)
    dist.init_process_group(setup.backend, store=store, rank=rank, world_size=size, timeout=span)
    dist.barrier()  # every pair connected before the call: a rank that returns at once can go
    out = fn(rank, size, *args)
    return asyncio.run(out) if inspect.iscoroutine(out) else out


def _die_with_parent(parent: int) -> None:
    """Have Linux SIGKILL this rank if the parent dies first, so no rank outlives a killed run."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
