"""The storage seam: what the writer, reader and front door need from where checkpoints live.

A checkpoint is a named location holding a few files (one data file per rank and
``manifest.json``). A save writes them under a *staging* location of its own (``begin``), then
``commit`` makes the whole checkpoint visible at once at its target, or ``discard`` drops it:
nothing half-written is ever visible under the target's name. Files are created whole
(``create`` + positioned writes + ``finish``) and read by ranges or mapped.

The local POSIX backend (``local.LocalStorage``: temp directory, fsync, rename, directory fsync)
is the first implementation. An object store fits the same calls: ``begin`` picks a private
prefix of its own under the target's, ``create`` starts a multipart upload whose parts are the
writes (in order: such a storage says ``ordered = True``), ``commit`` puts the manifest (which
names the staged objects) with a conditional create, ``kind`` asks for the manifest, and
``map`` with ``ranges`` fetches only the byte ranges a resharding load reads. Two optional
abilities of such a storage: ``MapsLanding`` (its bytes can be checked as they come in) and
``ReadsWhole`` (a file read whole takes one request when the storage is told so first).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import dataclass
from pathlib import PurePath
from typing import Literal, Protocol, runtime_checkable

__all__ = ["WRITE_ALIGN", "Kind", "Leftover", "MapsLanding", "ReadsWhole", "Sink", "Storage"]

#: what is at a location: nothing, a committed checkpoint, an empty directory, another directory,
#: or a file (anything that is not a directory, a symbolic link included)
Kind = Literal["absent", "checkpoint", "empty", "other", "file"]
#: offsets of positioned writes (but the last) are multiples of this (``O_DIRECT``'s block size)
WRITE_ALIGN = 4096


class Sink(Protocol):
    """One new file being written: positioned writes, then ``finish`` makes it durable.

    The writer calls ``write_at`` for several ranges at once (each with its own buffer, which it
    leaves alone until that call returns), unless the storage says ``ordered = True``: then one
    at a time, in order.
    """

    name: str

    async def write_at(self, offset: int, buf: memoryview, n: int) -> None:
        """Write ``buf[:n]`` at ``offset``; ``buf`` past ``n`` is scratch the sink may pad with."""

    async def finish(self, size: int) -> None:
        """The file holds exactly ``size`` bytes, durably."""


@dataclass(frozen=True, slots=True)
class Leftover:
    """What an interrupted save or deletion left in a root: the name it was for, and why."""

    name: str
    interrupted: Literal["save", "overwrite"]


class Storage(Protocol):
    """Where checkpoints live (see the module docstring). Methods raise ``OSError``."""

    # ------------------------------------------------------------ reading and inspecting
    async def kind(self, location: PurePath) -> Kind:
        """What is at ``location``."""

    async def scan(self, root: PurePath, *, leftovers: bool = False) -> list[tuple[str, Kind]]:
        """``(name, kind)`` of every entry of ``root``, sorted (none if ``root`` is absent);
        leftovers (see ``leftover``) only if asked for."""

    def leftover(self, name: str) -> Leftover | None:
        """Whether entry ``name`` of a root is a leftover of an interrupted save or deletion."""

    async def size(self, file: PurePath) -> int:
        """The size of ``file`` in bytes."""

    async def usage(self, location: PurePath) -> tuple[int, float]:
        """The bytes stored under ``location`` (a file or a checkpoint) and the latest time one
        of them was modified (seconds since the epoch)."""

    async def read(self, file: PurePath, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes of ``file`` from ``offset``."""

    async def map(
        self, file: PurePath, size: int, ranges: Sequence[tuple[int, int]] | None = None
    ) -> memoryview:
        """The first ``size`` bytes of ``file`` as writable memory private to this process.

        ``ranges``: only the bytes in these ``(begin, end)`` ranges will be read, so only they
        need to hold the file's (an object store fetches just those; a mapping pages in what
        is touched either way)."""

    # ------------------------------------------------------------ writing a checkpoint
    async def begin(self, target: PurePath, token: str) -> PurePath:
        """A new, empty staging location for a save to ``target`` (``token`` makes it unique)."""

    def staging(self, target: PurePath, token: str) -> PurePath:
        """The staging location ``begin(target, token)`` creates (ranks other than 0 use it)."""

    def create(self, file: PurePath, *, direct: bool) -> AbstractAsyncContextManager[Sink]:
        """A new file ``file`` (``FileExistsError`` if it exists); ``direct``: bypass caches."""

    async def seal(self, staging: PurePath) -> None:
        """Make the list of files written under ``staging`` durable."""

    async def commit(self, staging: PurePath, target: PurePath, *, overwrite: bool) -> None:
        """Make ``staging`` the checkpoint at ``target`` at once (the commit point).

        ``FileExistsError`` if ``target`` exists and not ``overwrite``."""

    async def discard(self, staging: PurePath) -> None:
        """Drop what a failed save wrote (errors ignored: ``sweep`` finds what is left)."""

    # ------------------------------------------------------------ retention and clean-up
    async def make_root(self, root: PurePath) -> None:
        """Create ``root`` (and its parents) for checkpoints to go into."""

    async def delete(self, location: PurePath, token: str) -> None:
        """Delete the checkpoint at ``location`` so that it vanishes at once."""

    async def sweep(
        self, root: PurePath, on_stuck: Callable[[PurePath, OSError], None] | None = None
    ) -> list[PurePath]:
        """Remove the leftovers in ``root``; return them. ``on_stuck``: report one that cannot be
        removed instead of raising."""


@runtime_checkable
class MapsLanding(Protocol):
    """A storage whose ``map`` brings an object's bytes in order (a streamed download), so that
    they can be checked as they land, while the rest is still on its way."""

    async def map_landing(
        self, file: PurePath, size: int, landed: Callable[[memoryview, int], bool] | None
    ) -> memoryview:
        """``map(file, size)``, calling ``landed(data, upto)`` in a worker thread each time the
        bytes before ``upto`` are in; stopping early when it returns False."""


@runtime_checkable
class ReadsWhole(Protocol):
    """A storage that reads a file in one request when told first that it will be read whole
    (an object store: each GET costs a round trip, and some servers read the whole object)."""

    def reading_whole(self, file: PurePath) -> AbstractContextManager[None]:
        """Within (in this task): the first ``read`` of ``file`` from byte 0 starts one
        download of all of it, which later reads and the ``map`` of ``file`` continue; on exit,
        a download nothing mapped is dropped."""
