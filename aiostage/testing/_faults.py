"""FaultyWrites: make aiostage's own durable writes fail, tear or stall, in this process."""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from .._storage import localfs

__all__ = ["FaultyWrites"]

#: O_DIRECT writes must stay block-aligned, so a short one writes whole blocks
_BLOCK = 4096
_Replacement = Callable[[int, memoryview], int]


@dataclass
class _Rule:
    kind: str  # "error", "short", "torn" or "slow"
    nth: int
    times: int | None
    match: str
    err: int = 0
    seconds: float = 0.0
    seen: int = 0  # matching writes so far


class FaultyWrites:
    """Inject faults into the writes of every ``aiostage`` save in this process while active.

    ``with FaultyWrites() as faults: faults.fail(2)`` makes the 2nd write fail with ``ENOSPC``;
    every write a save makes to a local disk counts, including those made inside
    ``aiostage.save`` and anything built on it. Each rule counts the writes whose file name
    matches its ``match`` pattern (``fnmatch``, e.g. ``"*.safetensors"`` or ``"manifest.json"``)
    from 1, and applies to ``times`` consecutive ones from the ``nth`` (``None``: every one from
    then on). A write is one positioned write of a chunk, a header or a manifest; ``writes``
    records each one seen while active and ``injected`` says what was done. The faulty write itself runs in the
    writer's worker thread; nothing here blocks the event loop. Spawned processes (the ranks of
    ``run_world``) are not affected: install it in the rank function. The rule methods return
    the ``FaultyWrites`` (to chain them) and raise ``ValueError`` unless ``nth`` and ``times``
    are at least 1.
    """

    def __init__(self) -> None:
        self.writes: list[tuple[str, int, int]] = []  # (file, offset, bytes) of every write
        self.injected: list[str] = []  # one line per fault applied, in order
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()

    def fail(
        self, nth: int, err: int = errno.ENOSPC, *, match: str = "*", times: int | None = 1
    ) -> FaultyWrites:
        """The ``nth`` write raises ``OSError(err)`` (``ENOSPC``, ``EIO``, ...)."""
        return self._add(_Rule("error", nth, times, match, err=err))

    def short(self, nth: int, *, match: str = "*", times: int | None = 1) -> FaultyWrites:
        """The ``nth`` write stores only a prefix and says so, as ``write(2)`` may; the writer
        must write the rest itself. On a file opened ``O_DIRECT`` the prefix is whole 4 KiB
        blocks, so a write of a single block is not shortened."""
        return self._add(_Rule("short", nth, times, match))

    def torn(self, nth: int, *, match: str = "*", times: int | None = 1) -> FaultyWrites:
        """The ``nth`` write stores only a prefix but reports it all written (a lost write):
        the checksums must catch it when the checkpoint is read."""
        return self._add(_Rule("torn", nth, times, match))

    def slow(
        self, nth: int, seconds: float, *, match: str = "*", times: int | None = 1
    ) -> FaultyWrites:
        """The ``nth`` write first sleeps ``seconds`` in the writer's worker thread."""
        return self._add(_Rule("slow", nth, times, match, seconds=seconds))

    def _add(self, rule: _Rule) -> FaultyWrites:
        if rule.nth < 1 or (rule.times is not None and rule.times < 1):
            raise ValueError(f"nth and times count from 1, got nth={rule.nth} times={rule.times}")
        with self._lock:
            self._rules.append(rule)
        return self

    def __enter__(self) -> FaultyWrites:
        localfs.write_hooks.append(self)
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        localfs.write_hooks.remove(self)

    def __call__(self, file: str, offset: int, n: int) -> _Replacement | None:
        """The write hook: called by the writer, on the loop, before each write."""
        name = Path(file).name
        replacement = None
        with self._lock:
            self.writes.append((file, offset, n))
            for rule in self._rules:
                if not fnmatch.fnmatchcase(name, rule.match):
                    continue
                rule.seen += 1
                last = None if rule.times is None else rule.nth + rule.times - 1
                if rule.seen >= rule.nth and (last is None or rule.seen <= last):
                    replacement = self._apply(rule, file, offset, n)
        return replacement

    def _apply(self, rule: _Rule, file: str, offset: int, n: int) -> _Replacement:
        what = f"write {rule.seen} of {Path(file).name} ({n} bytes at offset {offset})"
        if rule.kind == "error":
            self.injected.append(f"{errno.errorcode.get(rule.err, rule.err)} on {what}")
            return _raising(rule.err, file)
        if rule.kind == "slow":
            self.injected.append(f"{rule.seconds} s delay before {what}")
            return _sleeping(rule.seconds)
        self.injected.append(f"{rule.kind} {what}")
        return _partial(n, claim_all=rule.kind == "torn")


def _raising(err: int, file: str) -> _Replacement:
    def write(fd: int, data: memoryview) -> int:
        raise OSError(err, os.strerror(err), file)

    return write


def _sleeping(seconds: float) -> _Replacement:
    def write(fd: int, data: memoryview) -> int:
        time.sleep(seconds)  # the writer's worker thread, never the loop
        return 0  # nothing written: the writer goes on to write it all

    return write


def _partial(n: int, *, claim_all: bool) -> _Replacement:
    def write(fd: int, data: memoryview) -> int:
        direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0))
        part = (len(data) // 2) // _BLOCK * _BLOCK if direct else max(1, n // 2)
        wrote = os.write(fd, data[:part]) if part else 0
        if not claim_all:
            return wrote
        os.lseek(fd, len(data) - wrote, os.SEEK_CUR)  # where a complete write would have left it
        return len(data)

    return write
