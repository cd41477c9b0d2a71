"""File-system primitives: the one module of aiostage that touches the file system.

Open (O_DIRECT when possible), positioned writes, fsync, rename, remove, list, map. Every
blocking call runs in a worker thread (aiofiles or ``anyio.to_thread``); nothing here blocks the
event loop. Checkpoint directories are committed by renaming a temporary sibling
``.{name}.aiostage-tmp-{token}`` into place; ``temp_path`` and ``TEMP_NAME`` define those names.
A checkpoint's files are read only if they are regular files: a link inside a checkpoint is never
followed and a FIFO never waited on (``CheckpointCorrupt`` instead).
``local.LocalStorage`` composes these into the storage seam's local backend.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import re
import shutil
import stat
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiofiles
import aiofiles.os
import anyio
import anyio.to_thread

from .._core.buffers import run_whole
from ..errors import CheckpointCorrupt
from .backend import Kind

__all__ = [
    "ALIGN",
    "TEMP_NAME",
    "LocalFile",
    "Usage",
    "WriteHook",
    "create_file",
    "exchange",
    "file_size",
    "fsync_dir",
    "list_dir",
    "make_dir",
    "make_parents",
    "map_private",
    "path_kind",
    "read_at",
    "remove_tree",
    "rename_noreplace",
    "retire",
    "scan_dir",
    "sweep_now",
    "temp_path",
    "usage",
    "write_hooks",
]
#: O_DIRECT needs offsets, lengths and memory aligned to the logical block size; 4096 covers all
ALIGN = 4096
#: a process-wide fault-injection hook (``aiostage.testing.FaultyWrites``), called on the loop
#: before every write with (file, offset, bytes), in the order the writes are issued; it may raise
#: (``OSError(ENOSPC)``), or return ``write(fd, data) -> bytes written``, which replaces the first
#: ``os.pwrite`` of that write: it runs in a worker thread with the file's position at ``offset``
WriteHook = Callable[[str, int, int], Callable[[int, memoryview], int] | None]
#: the hooks every ``LocalFile`` consults (tests only)
write_hooks: list[WriteHook] = []
#: names of what an unfinished save leaves next to its target: kind "tmp" or "old"
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.aiostage-(?P<kind>tmp|old)-(?P<token>[0-9a-f]{32})$")
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
_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range: Any = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def temp_path(path: Path, token: str, kind: str = "tmp") -> Path:
    """The sibling of ``path`` a save with ``token`` writes into (``kind`` "tmp") or moves aside."""
    return path.with_name(f".{path.name}.aiostage-{kind}-{token}")


# ---------------------------------------------------------------- files and directories


class LocalFile:
    """A new file being written: positioned writes (``O_DIRECT`` where possible), then ``finish``.

    Each write is one worker-thread call (``os.pwrite`` at its offset, no seek), so several may be
    in flight at once; the device then never waits for the next write to be handed over. Without
    ``O_DIRECT`` (``direct`` false) each write also starts the write-back of its pages, so the
    final fsync has little left to wait for.
    """

    def __init__(self, fd: int, name: str, *, direct: bool) -> None:
        self._fd = fd
        self.name = name
        self._direct = direct
        self._positioned = threading.Lock()  # replacement writes use the file's one position

    async def write_at(self, offset: int, buf: memoryview, n: int) -> None:
        """Write ``buf[:n]`` at ``offset``; ``buf`` past ``n`` is scratch, used to pad the write
        to ``ALIGN`` with zeros (``finish`` cuts the padding). Raises ``OSError``."""
        padded = min(-(-n // ALIGN) * ALIGN, len(buf))
        if padded > n:
            buf[n:padded] = bytes(padded - n)
        replaced = _hooked(self.name, offset, n)
        await anyio.to_thread.run_sync(self._write, offset, buf[:padded], replaced)

    def _write(
        self, offset: int, data: memoryview, replaced: Callable[[int, memoryview], int] | None
    ) -> None:
        """``pwrite`` all of ``data`` at ``offset``, a hook's replacement first (worker thread)."""
        done = 0
        if replaced is not None:
            with self._positioned:
                os.lseek(self._fd, offset, os.SEEK_SET)
                done = replaced(self._fd, data)
        while done < len(data):
            wrote = os.pwrite(self._fd, data[done:], offset + done)
            if not wrote:  # no progress: write(2) would spin here forever
                at = offset + done
                raise OSError(errno.EIO, f"a write to {self.name} stored nothing at {at}")
            done += wrote
        if not self._direct:
            _start_writeback(self._fd, offset, done)

    async def finish(self, size: int) -> None:
        """Cut the file to ``size`` bytes (dropping alignment padding) and fsync it."""
        await anyio.to_thread.run_sync(self._finish, size)

    def _finish(self, size: int) -> None:
        os.ftruncate(self._fd, size)
        os.fsync(self._fd)


def _start_writeback(fd: int, offset: int, n: int) -> None:
    """Start writing ``n`` bytes at ``offset`` of ``fd`` back to the device, without waiting
    (``sync_file_range(SYNC_FILE_RANGE_WRITE)``; nothing where libc lacks it). Durability still
    comes from the fsync alone: this only moves the work earlier."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, n, _SYNC_FILE_RANGE_WRITE)  # an error: fsync reports it


def _hooked(name: str, offset: int, n: int) -> Callable[[int, memoryview], int] | None:
    """Consult ``write_hooks``; the last replacement write offered wins."""
    replaced = None
    for hook in tuple(write_hooks):
        replaced = hook(name, offset, n) or replaced
    return replaced


@contextlib.asynccontextmanager
async def create_file(path: Path, *, direct: bool = False) -> AsyncIterator[LocalFile]:
    """``async with create_file(path) as f``: a new file (``FileExistsError`` if ``path``
    exists), closed on exit. ``direct``: open ``O_DIRECT`` (no page cache) where the file system
    allows it."""
    fd = -1
    if direct and hasattr(os, "O_DIRECT"):
        try:
            fd = await _open_whole(path, _CREATE | os.O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: this file system has no O_DIRECT
                raise
    direct = fd >= 0
    if not direct:
        fd = await _open_whole(path, _CREATE)
    try:
        yield LocalFile(fd, str(path), direct=direct)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(os.close, fd)


#: how ``create_file`` opens: a new file only, written, not inherited by children
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


async def _open_whole(path: Path, flags: int) -> int:
    """Create ``path``: in a worker thread a cancellation never abandons, so the descriptor a
    cancelled caller's thread opened is closed, never leaked."""
    opened: list[int] = []

    def create() -> None:
        opened.append(os.open(path, flags, 0o644))

    try:
        await run_whole(create)
    except BaseException:
        for fd in opened:
            os.close(fd)
        raise
    return opened[0]


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


def _scan_dir(root: Path, manifest: str) -> list[tuple[str, Kind]]:
    """Entries removed or renamed meanwhile (another rank's retention or commit) are left out."""
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return []
    found = [(name, _path_kind(root / name, manifest)) for name in names]
    return [(name, kind) for name, kind in found if kind != "absent"]


async def scan_dir(root: Path, manifest: str) -> list[tuple[str, Kind]]:
    """``(name, path_kind)`` of every entry of ``root`` (nothing if ``root`` is not a directory)."""
    return await anyio.to_thread.run_sync(_scan_dir, root, manifest)


def _remove(path: Path) -> OSError | None:
    """Remove a file or a directory tree; the error instead of raising it. A tree another
    process removed meanwhile (a rank sweeping the same root) is gone: no error."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except OSError as exc:
        if isinstance(exc, FileNotFoundError) and not os.path.lexists(path):
            return None
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


# ---------------------------------------------------------------- small reads and queries


async def read_at(path: Path, offset: int, n: int) -> bytes:
    """Up to ``n`` bytes of ``path`` from ``offset`` (fewer at the end of the file, and never a
    buffer larger than the file): opened, read and closed in one worker-thread call, so a
    cancellation never leaves it open. ``CheckpointCorrupt`` if ``path`` is not a regular file."""
    return await anyio.to_thread.run_sync(_read_at, path, offset, n)


def _read_at(path: Path, offset: int, n: int) -> bytes:
    fd, size = _open_regular(path)
    try:
        left, chunks = max(0, min(n, size - offset)), []  # never a buffer past the file's end
        while left > 0:
            chunk = os.pread(fd, left, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset, left = offset + len(chunk), left - len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


#: a checkpoint file is opened for reading so that a link planted in its place fails to open
#: (``O_NOFOLLOW``, on the last component only: the directory may be a link the user made) and a
#: FIFO opens at once instead of waiting for a writer (``O_NONBLOCK``), to be refused by ``fstat``
_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
_NOT_REGULAR = (
    (stat.S_ISLNK, "a symbolic link", "aiostage does not follow links inside a checkpoint"),
    (stat.S_ISDIR, "a directory", ""),
    (stat.S_ISFIFO, "a FIFO", ""),
    (stat.S_ISSOCK, "a socket", ""),
    (stat.S_ISCHR, "a character device", ""),
    (stat.S_ISBLK, "a block device", ""),
)


def _not_regular(path: Path, mode: int) -> CheckpointCorrupt | None:
    """The error naming ``path`` and what it is, unless ``mode`` is a regular file's."""
    if stat.S_ISREG(mode):
        return None
    what, why = next(((w, y) for test, w, y in _NOT_REGULAR if test(mode)), ("not a file", ""))
    why = why or "a checkpoint holds only regular files"
    return CheckpointCorrupt(f"{path} is not a regular file ({what}); {why}", path=path)


#: a save's own directory inside a checkpoint (an object store's layout copied to a disk): a
#: link there is refused too, as the files in it are
_SAVE_DIR = re.compile(r"[0-9a-f]{32}")


def _open_regular(path: Path) -> tuple[int, int]:
    """A read-only descriptor of ``path`` and its size; ``CheckpointCorrupt`` if ``path`` is not
    a regular file (a link, a FIFO, a directory, a device), which is never followed nor waited on.
    """
    _no_linked_save_dir(path)
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError as exc:  # ELOOP for a link, ENXIO for a socket: say what it is
        refused = None
        with contextlib.suppress(OSError):
            refused = _not_regular(path, os.lstat(path).st_mode)
        if refused is not None:
            raise refused from exc
        raise
    try:
        st = os.fstat(fd)
        refused = _not_regular(path, st.st_mode)
        if refused is not None:
            raise refused
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def _no_linked_save_dir(path: Path) -> None:
    """``CheckpointCorrupt`` if ``path`` is in a save's own directory (``_SAVE_DIR``) that is
    not a directory itself (a link to one, say)."""
    if not _SAVE_DIR.fullmatch(path.parent.name):
        return
    mode = os.lstat(path.parent).st_mode
    if not stat.S_ISDIR(mode):
        raise _not_regular(path.parent, mode) or CheckpointCorrupt(
            f"{path.parent} is not a directory", path=path.parent
        )


def _regular_size(path: Path) -> int:
    _no_linked_save_dir(path)
    st = os.lstat(path)
    refused = _not_regular(path, st.st_mode)
    if refused is not None:
        raise refused
    return st.st_size


async def file_size(path: Path) -> int:
    """The size of ``path`` in bytes (``FileNotFoundError`` if it is missing, ``CheckpointCorrupt``
    if it is not a regular file: a link is not followed)."""
    return await anyio.to_thread.run_sync(_regular_size, path)


async def list_dir(path: Path) -> list[str]:
    """The names in directory ``path``."""
    return await aiofiles.os.listdir(path)


async def make_dir(path: Path) -> None:
    """Create directory ``path`` (its parent must exist)."""
    await aiofiles.os.mkdir(path)


def _path_kind(path: Path, manifest: str) -> Kind:
    if not os.path.lexists(path):
        return "absent"
    if path.is_symlink() or not path.is_dir():
        return "file"
    if os.path.lexists(path / manifest):  # whatever it is: reading it says if it is sound
        return "checkpoint"
    try:
        return "other" if any(path.iterdir()) else "empty"
    except (FileNotFoundError, NotADirectoryError):  # removed or renamed since it was seen
        return "absent"


async def path_kind(path: Path, manifest: str) -> Kind:
    """What is at ``path``: "absent", "checkpoint" (a directory holding an entry named
    ``manifest``, not opened here), "empty" (an empty directory), "other" (another directory) or
    "file" (anything else)."""
    return await anyio.to_thread.run_sync(_path_kind, path, manifest)


def _map_private(path: Path, size: int) -> mmap.mmap:
    fd, has = _open_regular(path)
    try:
        if has < size:  # mmap would raise ValueError; the file was cut since its size was read
            raise CheckpointCorrupt(
                f"{path}: {has} bytes, fewer than the {size} expected (truncated)", path=path
            )
        return mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


async def map_private(path: Path, size: int) -> mmap.mmap:
    """A private, copy-on-write mapping of the first ``size`` bytes of ``path``.

    Pages come in from the page cache on first touch; writing one copies it, never the file.
    Raises ``CheckpointCorrupt`` if ``path`` is not a regular file or is shorter than ``size``.
    """
    return await anyio.to_thread.run_sync(_map_private, path, size)


@dataclass(frozen=True, slots=True)
class Usage:
    """What a directory tree holds: its files' bytes and the latest modification time."""

    size: int
    mtime: float


def _usage(path: Path) -> Usage:
    st = path.stat()
    if not path.is_dir():
        return Usage(st.st_size, st.st_mtime)
    size, mtime = 0, st.st_mtime
    for folder, _, names in os.walk(path):
        for name in names:
            st = os.stat(os.path.join(folder, name), follow_symlinks=False)
            size, mtime = size + st.st_size, max(mtime, st.st_mtime)
    return Usage(size, mtime)


async def usage(path: Path) -> Usage:
    """The bytes of the files under directory ``path`` and their latest mtime (or the file's)."""
    return await anyio.to_thread.run_sync(_usage, path)
