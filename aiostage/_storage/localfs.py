"""File-system primitives for checkpoints: open (O_DIRECT when possible), fsync, rename, remove.

Every blocking call runs in a worker thread (aiofiles or ``anyio.to_thread``); nothing here
blocks the event loop. Checkpoint directories are committed by renaming a temporary sibling
``.{name}.aiostage-tmp-{token}`` into place; ``temp_path`` and ``TEMP_NAME`` define those names.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import aiofiles
import aiofiles.os
import anyio
import anyio.to_thread

__all__ = [
    "ALIGN",
    "TEMP_NAME",
    "cut",
    "exchange",
    "file_size",
    "fsync",
    "fsync_dir",
    "list_dir",
    "make_dir",
    "make_parents",
    "map_private",
    "open_file",
    "path_kind",
    "pipeline",
    "read_at",
    "remove_tree",
    "rename_noreplace",
    "retire",
    "ring",
    "scan_dir",
    "sweep_now",
    "temp_path",
]

#: O_DIRECT needs offsets, lengths and memory aligned to the logical block size; 4096 covers all
ALIGN = 4096


#: names of what an unfinished save leaves next to its target: kind "tmp" or "old"
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.aiostage-(?P<kind>tmp|old)-(?P<token>[0-9a-f]{32})$")


_J = TypeVar("_J")


_AT_FDCWD = -100


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


_libc = ctypes.CDLL(None, use_errno=True)


_renameat2: Any = getattr(_libc, "renameat2", None)


if _renameat2 is not None:
    _renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]


def temp_path(path: Path, token: str, kind: str = "tmp") -> Path:
    """The sibling of ``path`` a save with ``token`` writes into (``kind`` "tmp") or moves aside."""
    return path.with_name(f".{path.name}.aiostage-{kind}-{token}")


@contextlib.asynccontextmanager
async def ring(slots: int, size: int) -> AsyncIterator[list[memoryview]]:
    """``async with ring(slots, size) as bufs``: page-aligned buffers of anonymous memory.

    Mapped and unmapped in worker threads: unmapping tens of MiB takes milliseconds.
    """
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS  # mmap's default, MAP_SHARED, is shmem
    arena = await anyio.to_thread.run_sync(lambda: mmap.mmap(-1, slots * size, flags=flags))
    views = [memoryview(arena)[i * size : (i + 1) * size] for i in range(slots)]
    try:
        yield views
    finally:
        for v in views:
            v.release()
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_unmap, arena)


def _unmap(arena: mmap.mmap) -> None:
    with contextlib.suppress(BufferError):  # a view still alive: the collector unmaps it later
        arena.close()


def cut(lengths: Sequence[int], chunk: int) -> Iterator[list[tuple[int, int, int]]]:
    """Cut consecutive segments of ``lengths`` bytes into chunks of ``chunk`` bytes.

    Yields, per chunk, its pieces as ``(segment, start within the segment, bytes)``; every
    chunk but the last is full.
    """
    pieces: list[tuple[int, int, int]] = []
    room = chunk
    for segment, total in enumerate(lengths):
        at = 0
        while at < total:
            n = min(room, total - at)
            pieces.append((segment, at, n))
            at, room = at + n, room - n
            if room == 0:
                yield pieces
                pieces, room = [], chunk
    if pieces:
        yield pieces


async def pipeline(
    slots: int,
    jobs: Iterable[_J],
    first: Callable[[int, _J], Awaitable[None]],
    second: Callable[[int, _J], Awaitable[None]],
) -> None:
    """Run ``first(slot, job)`` then ``second(slot, job)`` for every job, in order.

    ``first`` of job k+1 runs while ``second`` of job k does, with at most ``slots`` jobs (and
    ring buffers) between the two stages. A failure in either stage cancels the other and
    surfaces as the task group's ``ExceptionGroup``.
    """
    send_full, recv_full = anyio.create_memory_object_stream[tuple[int, _J]](slots)
    send_free, recv_free = anyio.create_memory_object_stream[int](slots)
    for slot in range(slots):
        send_free.send_nowait(slot)

    async def drain() -> None:
        async with recv_full, send_free:
            async for slot, job in recv_full:
                await second(slot, job)
                send_free.send_nowait(slot)

    with recv_free:
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain)
            async with send_full:
                try:
                    for job in jobs:
                        slot = await recv_free.receive()
                        await first(slot, job)
                        await send_full.send((slot, job))
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return  # ``second`` failed: its error alone leaves the task group


@contextlib.asynccontextmanager
async def open_file(
    path: Path, mode: Literal["rb", "xb"], *, direct: bool = False
) -> AsyncIterator[Any]:
    """``async with open_file(path, mode) as f``: an unbuffered aiofiles file, closed on exit.

    ``direct``: open ``O_DIRECT`` (no page cache) where the file system allows it. Files opened
    for reading are flagged sequential, which doubles the kernel's readahead. Raises ``OSError``.
    """
    f = None
    if direct and hasattr(os, "O_DIRECT"):
        try:
            f = await aiofiles.open(path, mode, buffering=0, opener=_open_direct)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: this file system has no O_DIRECT
                raise
    if f is None:
        f = await aiofiles.open(path, mode, buffering=0, opener=_open_plain)
    try:
        yield f
    finally:
        with anyio.CancelScope(shield=True):
            await f.close()


def _open_direct(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_DIRECT, 0o644)


def _open_plain(path: str, flags: int) -> int:
    fd = os.open(path, flags, 0o644)
    if flags & os.O_ACCMODE == os.O_RDONLY and hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    return fd


async def fsync(fd: int) -> None:
    """``fsync(fd)`` in a worker thread."""
    await anyio.to_thread.run_sync(os.fsync, fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` durable (fsync of the directory itself)."""
    await anyio.to_thread.run_sync(_fsync_dir, path)


def _make_parents(path: Path) -> None:
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for p in reversed(missing):
        p.mkdir(exist_ok=True)
        _fsync_dir(p.parent)


async def make_parents(path: Path) -> None:
    """Create directory ``path`` and its missing parents, each made durable in its parent."""
    await anyio.to_thread.run_sync(_make_parents, path)


def _rename2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2``; ``False`` where libc, kernel or file system do not offer it."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def _rename_noreplace(src: Path, dst: Path) -> None:
    if not _rename2(src, dst, _RENAME_NOREPLACE):
        if dst.exists():
            raise FileExistsError(errno.EEXIST, "target exists", str(dst))
        os.rename(src, dst)


async def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; ``FileExistsError`` if ``dst`` exists (atomic where possible)."""
    await anyio.to_thread.run_sync(_rename_noreplace, src, dst)


def _exchange(new: Path, path: Path) -> None:
    if _rename2(new, path, _RENAME_EXCHANGE):
        return
    old = temp_path(path, TEMP_NAME.match(new.name)["token"], "old")  # type: ignore[index]
    os.rename(path, old)  # the one crash window: ``sweep`` rolls it forward
    os.rename(new, path)
    os.rename(old, new)


async def exchange(new: Path, path: Path) -> None:
    """Swap directory ``new`` (a temp name) with ``path``: afterwards ``new`` holds the old one.

    One atomic ``renameat2(RENAME_EXCHANGE)`` where the file system offers it; otherwise three
    renames, with ``.{name}.aiostage-old-{token}`` briefly holding the old directory.
    """
    await anyio.to_thread.run_sync(_exchange, new, path)


async def remove_tree(path: Path) -> None:
    """Remove ``path`` and everything under it, ignoring errors (``sweep`` finds what is left)."""
    await anyio.to_thread.run_sync(lambda: shutil.rmtree(path, ignore_errors=True))


def _retire(path: Path, token: str) -> None:
    hidden = temp_path(path, token)
    os.rename(path, hidden)
    _fsync_dir(path.parent)
    shutil.rmtree(hidden)  # an error leaves a hidden leftover: raised, and swept later


async def retire(path: Path, token: str) -> None:
    """Delete directory ``path`` so it vanishes at once: rename it to a temporary name (which
    ``sweep`` removes if this is interrupted), fsync the parent, then remove the tree. Raises
    ``OSError``; once the rename is done, what could not be removed stays hidden."""
    await anyio.to_thread.run_sync(_retire, path, token)


def _scan_dir(root: Path, manifest: str) -> list[tuple[str, str]]:
    if not root.is_dir():
        return []
    return [(name, _path_kind(root / name, manifest)) for name in sorted(os.listdir(root))]


async def scan_dir(root: Path, manifest: str) -> list[tuple[str, str]]:
    """``(name, path_kind)`` of every entry of ``root`` (nothing if ``root`` is not a directory)."""
    return await anyio.to_thread.run_sync(_scan_dir, root, manifest)


def _remove(path: Path) -> OSError | None:
    """Remove a file or a directory tree; the error instead of raising it."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except OSError as exc:
        return exc
    return None


def sweep_now(
    root: Path, manifest: str, stuck: list[tuple[Path, OSError]] | None = None
) -> list[Path]:
    """The blocking body of ``aiostage.sweep`` (run it in a worker thread). With ``stuck``, a
    leftover that cannot be removed is listed there instead of raised."""
    for name in sorted(os.listdir(root)):
        m = TEMP_NAME.match(name)
        if m and m["kind"] == "old" and not (root / m["name"]).exists():
            new = temp_path(root / m["name"], m["token"])
            os.rename(new if (new / manifest).exists() else root / name, root / m["name"])
    removed = []
    for path in [root / n for n in sorted(os.listdir(root)) if TEMP_NAME.match(n)]:
        error = _remove(path)
        if error is None:
            removed.append(path)
        elif stuck is None:
            raise error
        else:
            stuck.append((path, error))
    if removed:
        _fsync_dir(root)
    return removed


async def read_at(path: Path, offset: int, n: int) -> bytes:
    """Up to ``n`` bytes of ``path`` from ``offset`` (fewer at the end of the file)."""
    async with aiofiles.open(path, "rb") as f:
        await f.seek(offset)
        return await f.read(n)


async def file_size(path: Path) -> int:
    """The size of ``path`` in bytes (``FileNotFoundError`` if it is missing)."""
    return (await aiofiles.os.stat(path)).st_size


async def list_dir(path: Path) -> list[str]:
    """The names in directory ``path``."""
    return await aiofiles.os.listdir(path)


async def make_dir(path: Path) -> None:
    """Create directory ``path`` (its parent must exist)."""
    await aiofiles.os.mkdir(path)


def _path_kind(path: Path, manifest: str) -> str:
    if not os.path.lexists(path):
        return "absent"
    if path.is_dir() and not path.is_symlink():
        if (path / manifest).is_file():
            return "checkpoint"
        if not any(path.iterdir()):
            return "empty"
    return "other"


async def path_kind(path: Path, manifest: str) -> str:
    """What is at ``path``: "absent", "checkpoint" (a directory holding ``manifest``), "empty"
    (an empty directory) or "other"."""
    return await anyio.to_thread.run_sync(_path_kind, path, manifest)


def _map_private(path: Path, size: int) -> mmap.mmap:
    fd = os.open(path, os.O_RDONLY)
    try:
        return mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


async def map_private(path: Path, size: int) -> mmap.mmap:
    """A private, copy-on-write mapping of the first ``size`` bytes of ``path``.

    Pages come in from the page cache on first touch; writing one copies it, never the file.
    """
    return await anyio.to_thread.run_sync(_map_private, path, size)
