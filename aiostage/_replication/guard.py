"""The stager's guard: each exchange runs under the timeout, and a failed one breaks the stager."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

import anyio

from ..errors import ReplicationError, ReplicationTimeout

__all__ = ["Breaker"]


class Breaker:
    """Runs the exchanges of rank ``rank`` under ``timeout`` seconds each; the first that fails
    or times out breaks it for good (a send or receive posted to a ProcessGroup cannot be
    withdrawn, so the group is unusable)."""

    def __init__(self, rank: int, timeout: float) -> None:
        self.rank = rank
        self.timeout = timeout
        self.broken: str | None = None

    def check(self) -> None:
        """Raise ``ReplicationError`` (phase ``"broken"``) once an exchange has failed."""
        if self.broken is not None:
            raise ReplicationError(
                f"this stager is broken ({self.broken}); a timed-out or failed exchange cannot "
                "be withdrawn from the process group: recreate the group and the stager",
                phase="broken",
            )

    @contextlib.asynccontextmanager
    async def guard(self, peer: int, phase: str) -> AsyncIterator[None]:
        """Run the body under the timeout. Raises ``ReplicationTimeout`` naming ``peer`` and
        ``phase`` when it expires, ``ReplicationError`` (the failing peer and phase where the
        error names them, else these) when the body fails; either breaks this stager."""
        try:
            with anyio.fail_after(self.timeout):
                yield
        except Exception as exc:
            first = _first_error(exc)
            self.broken = f"rank {self.rank}: {phase} failed: {first}"
            if isinstance(first, TimeoutError):
                raise ReplicationTimeout(
                    f"no progress within {self.timeout} s; the peer is slow, hung or gone",
                    peer=peer,
                    phase=phase,
                ) from exc
            if first is exc and isinstance(exc, ReplicationError):
                raise
            if isinstance(first, ReplicationError):
                raise ReplicationError(first.message, peer=first.peer, phase=first.phase) from exc
            raise ReplicationError(str(first), peer=peer, phase=phase) from exc


def _first_error(e: BaseException) -> BaseException:
    """The error to report from a task group's: its first ``ReplicationError``, else its first."""
    if isinstance(e, BaseExceptionGroup):
        kids = [_first_error(x) for x in e.exceptions]
        return next((k for k in kids if isinstance(k, ReplicationError)), kids[0])
    return e
