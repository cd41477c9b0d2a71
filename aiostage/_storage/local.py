"""The local backend of the storage seam: POSIX directories, temp names, fsync and rename.

A save writes into the hidden sibling ``.{name}.aiostage-tmp-{token}``; ``commit`` renames it
into place (``renameat2(RENAME_NOREPLACE)``, or ``RENAME_EXCHANGE`` to overwrite) and fsyncs the
parent, so a checkpoint directory is visible only once complete. All I/O goes through
``localfs``, the one module that touches the file system.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path, PurePath

import anyio.to_thread

from .._format.codec import MANIFEST
from ..errors import CheckpointWriteError
from . import localfs
from .backend import Kind, Leftover, Sink

__all__ = ["LOCAL", "LocalStorage"]


class LocalStorage:
    """Checkpoints as directories of a local (or network-mounted POSIX) file system."""

    async def kind(self, location: PurePath) -> Kind:
        """What is at ``location`` (a directory holding ``manifest.json`` is a checkpoint)."""
        return await localfs.path_kind(Path(location), MANIFEST)

    async def scan(self, root: PurePath, *, leftovers: bool = False) -> list[tuple[str, Kind]]:
        """``(name, kind)`` of every entry of ``root``, sorted; leftovers if asked for."""
        found = await localfs.scan_dir(Path(root), MANIFEST)
        return [(n, k) for n, k in found if leftovers or self.leftover(n) is None]

    def leftover(self, name: str) -> Leftover | None:
        """The temp or aside name of an interrupted save or overwrite, else ``None``."""
        m = localfs.TEMP_NAME.match(name)
        if m is None:
            return None
        return Leftover(m["name"], "save" if m["kind"] == "tmp" else "overwrite")

    async def size(self, file: PurePath) -> int:
        """The size of ``file``."""
        return await localfs.file_size(Path(file))

    async def usage(self, location: PurePath) -> tuple[int, float]:
        """The bytes of the files under ``location`` and their latest mtime."""
        found = await localfs.usage(Path(location))
        return found.size, found.mtime

    async def read(self, file: PurePath, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes of ``file`` from ``offset``."""
        return await localfs.read_at(Path(file), offset, n)

    async def map(
        self, file: PurePath, size: int, ranges: Sequence[tuple[int, int]] | None = None
    ) -> memoryview:
        """A private copy-on-write mapping: pages come in from the page cache on first touch
        (so ``ranges``, the bytes that will be read, need no special care)."""
        return memoryview(await localfs.map_private(Path(file), size))

    def staging(self, target: PurePath, token: str) -> PurePath:
        """The hidden sibling ``.{name}.aiostage-tmp-{token}`` of ``target``."""
        return localfs.temp_path(Path(target), token)

    async def begin(self, target: PurePath, token: str) -> PurePath:
        """Create the staging directory beside ``target`` (and ``target``'s missing parents)."""
        tmp = self.staging(target, token)
        await localfs.make_parents(Path(tmp))
        return tmp

    def create(self, file: PurePath, *, direct: bool) -> AbstractAsyncContextManager[Sink]:
        """A new file, ``O_DIRECT`` where the file system allows it and ``direct``."""
        return localfs.create_file(Path(file), direct=direct)

    async def seal(self, staging: PurePath) -> None:
        """fsync the staging directory (its entries)."""
        await localfs.fsync_dir(Path(staging))

    async def commit(self, staging: PurePath, target: PurePath, *, overwrite: bool) -> None:
        """Rename ``staging`` into place (exchanging with an old checkpoint), fsync the parent.

        Raises ``FileExistsError`` if ``target`` appeared meanwhile (without ``overwrite``), and
        ``CheckpointWriteError`` if the rename happened but the parent could not be fsynced.
        """
        tmp, dst = Path(staging), Path(target)
        replace_old = overwrite and await self.kind(dst) != "absent"
        if replace_old:
            await localfs.exchange(tmp, dst)
        else:
            await localfs.rename_noreplace(tmp, dst)
        try:
            await localfs.fsync_dir(dst.parent)
        except OSError as exc:
            raise CheckpointWriteError(
                f"{dst} is in place but its parent directory could not be fsynced ({exc}); it "
                "may not survive a power loss",
                path=dst,
            ) from exc
        if replace_old:
            await localfs.remove_tree(tmp)  # now the previous checkpoint

    async def discard(self, staging: PurePath) -> None:
        """Remove the staging directory, ignoring errors."""
        await localfs.remove_tree(Path(staging))

    async def make_root(self, root: PurePath) -> None:
        """Create ``root`` and its missing parents, each made durable in its parent."""
        await localfs.make_parents(Path(root))

    async def delete(self, location: PurePath, token: str) -> None:
        """Rename to a hidden name, fsync the parent, remove the tree (see ``localfs.retire``)."""
        await localfs.retire(Path(location), token)

    async def sweep(
        self, root: PurePath, on_stuck: Callable[[PurePath, OSError], None] | None = None
    ) -> list[PurePath]:
        """Finish or roll back interrupted overwrites, then remove every leftover of ``root``."""
        stuck: list[tuple[Path, OSError]] | None = [] if on_stuck is not None else None
        removed = await anyio.to_thread.run_sync(localfs.sweep_now, Path(root), MANIFEST, stuck)
        for path, error in stuck or ():
            assert on_stuck is not None
            on_stuck(path, error)
        return list(removed)


#: the one instance: it holds no state
LOCAL = LocalStorage()
