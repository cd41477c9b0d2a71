"""WorldRunner: the ``aiostage_world`` fixture's object, running functions on spawned gloo ranks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._world import arun_world, run_world

__all__ = ["WorldRunner"]


class WorldRunner:
    """Run a top-level function on ``world_size`` spawned ranks joined in a gloo group.

    ``await runner(fn, 2, *args)`` from async tests, ``runner.run(fn, 2, *args)`` from sync
    ones: ``fn(rank, world_size, *args)`` runs in every rank (``async def`` too) and the result
    is each rank's return value, indexed by rank. The group meets on 127.0.0.1 through a store
    on a port the kernel picks; every rank is reaped before either returns or raises, whatever
    happened. Raises ``WorldError`` naming the rank that failed first (with its remote
    traceback), ``WorldTimeout`` naming the ranks still running after ``timeout`` seconds.
    """

    def __init__(self, *, timeout: float = 60.0, backend: str = "gloo") -> None:
        self.timeout = timeout
        self.backend = backend

    async def __call__(
        self,
        fn: Callable[..., Any],
        world_size: int,
        *args: Any,
        timeout: float | None = None,
    ) -> list[Any]:
        """Await the world without blocking the event loop (``arun_world``); cancellable."""
        deadline = self.timeout if timeout is None else timeout
        return await arun_world(fn, world_size, *args, timeout=deadline, backend=self.backend)

    def run(
        self, fn: Callable[..., Any], world_size: int, *args: Any, timeout: float | None = None
    ) -> list[Any]:
        """Run the world, blocking the calling thread until every rank is reaped (``run_world``)."""
        deadline = self.timeout if timeout is None else timeout
        return run_world(fn, world_size, *args, timeout=deadline, backend=self.backend)
