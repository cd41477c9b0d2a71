"""Results that arrive later: a read-only ``Outcome`` for callers, a ``Resolver`` for the producer.

Work that goes on in the background (a save, a weight publication) hands its caller
``Outcome``s: awaitable any number of times, from any task, with no way to settle them. The
object doing the work keeps the matching ``Resolver`` and settles it once. An error that no
``await`` received by the time both are gone is logged (logger ``aiostage``, level ERROR), so a
background failure is never silent.
"""

from __future__ import annotations

import logging
from collections.abc import Generator
from typing import Any, Generic, TypeVar

import anyio

__all__ = ["Outcome", "Resolver", "wait_settled"]

_T = TypeVar("_T")
_log = logging.getLogger("aiostage")


class Resolver(Generic[_T]):
    """The producer's side of one ``Outcome``: ``set`` or ``fail`` it; the first call counts.

    ``report_unseen=False``: an error nobody received is not logged (it is reported elsewhere).
    """

    __slots__ = ("_error", "_event", "_result", "_seen", "_what")

    def __init__(self, what: str, *, report_unseen: bool = True) -> None:
        self._what = what
        self._error: BaseException | None = None
        self._seen = not report_unseen
        self._result: tuple[_T] | None = None
        self._event = anyio.Event()

    def settled(self) -> bool:
        """Whether the result or the error is set."""
        return self._event.is_set()

    def set(self, value: _T) -> None:
        """Settle with ``value`` (ignored once settled)."""
        if not self._event.is_set():
            self._result = (value,)
            self._event.set()

    def fail(self, error: BaseException, *, seen: bool = False) -> None:
        """Settle with ``error``, which every ``await`` raises (ignored once settled).
        ``seen``: never log it (the caller knows already)."""
        if not self._event.is_set():
            self._error = error
            self._seen = self._seen or seen
            self._event.set()

    def unseen_error(self) -> BaseException | None:
        """The error if no ``await`` received it yet (it counts as received now)."""
        if self._error is None or self._seen:
            return None
        self._seen = True
        return self._error

    async def wait_settled(self) -> None:
        """Block until settled; raise nothing."""
        await self._event.wait()

    async def get(self) -> _T:
        """Block until settled; return the result or raise the error."""
        await self._event.wait()
        if self._error is not None:
            self._seen = True
            raise self._error
        assert self._result is not None
        return self._result[0]

    def __del__(self) -> None:
        if self._error is not None and not self._seen:
            _log.error("aiostage: %s failed and nobody awaited it: %r", self._what, self._error)


class Outcome(Generic[_T]):
    """A result that arrives later: ``await outcome`` returns it, or raises the error the work
    failed with, as often as asked and from any task; ``done()`` says whether it arrived.

    Read-only: the object doing the work settles it. ``await`` blocks until then and raises
    what the work raised; an error that no ``await`` received is logged (logger ``aiostage``).
    """

    __slots__ = ("_source",)

    def __init__(self, source: Resolver[_T]) -> None:
        self._source = source

    def done(self) -> bool:
        """Whether the result (or the error) has arrived; never blocks."""
        return self._source.settled()

    def __await__(self) -> Generator[Any, None, _T]:
        return self._source.get().__await__()

    def __repr__(self) -> str:
        return f"<aiostage.Outcome {'done' if self.done() else 'pending'}>"


async def wait_settled(outcome: Outcome[Any]) -> None:
    """Block until ``outcome`` is settled; raise nothing (its error stays unreceived)."""
    await outcome._source.wait_settled()
