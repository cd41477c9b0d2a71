"""CPU buffer sets for staged or received state: page-aligned arenas, pinning, byte copies.

A buffer set holds one uint8 tensor (its own storage) per storage span of a layout, carved from
one private anonymous mapping (transparent huge pages when asked), or one ``/dev/shm`` storage
each when it must be shared with other processes. Allocation and freeing block (page faults,
``cudaHostRegister``, unmapping), so callers run them in worker threads.

A page-locked range is unregistered exactly once (``cuda.REGISTERED``): by ``free``, or, for a
set nobody frees (``reuse_buffers=False``: the caller owns the staged copy), when the last
tensor over its mapping is gone, before the mapping is unmapped, so the next mapping at the same
address can be registered again. A set whose copies a GPU may still be writing (a cancelled
stage) is retired: kept, never reused nor freed, until its copies are done.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import anyio.from_thread
import anyio.to_thread
import torch

from . import cuda
from .completion import wait_until
from .storages import Layout, Span

__all__ = []

_T = TypeVar("_T")

_MiB = 1 << 20
#: spans of 64 KiB or more start on page boundaries inside an arena (O_DIRECT-friendly)
_PAGE = 4096
_SMALL = 64 * 1024


@dataclass(eq=False)
class Buffers:
    """CPU memory for one layout: one uint8 tensor per span, each with its own storage."""

    layout: Layout
    flats: tuple[torch.Tensor, ...]
    pinned: tuple[torch.Tensor, ...]
    busy: bool = True
    made: Any = None  # the staged tensors last built over these buffers (reused by ``fill``)
    #: ``None``, or whether the copies a cancelled stage queued into these buffers are done
    settled: Callable[[], bool] | None = None

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes

    def ready(self) -> bool:
        """Whether no copy may still write into these buffers (polls; never blocks)."""
        if self.settled is not None and self.settled():
            self.settled = None
        return self.settled is None


def allocate(
    layout: Sequence[tuple[str, int]], share: bool, pin: bool, huge: bool, device: Any = None
) -> Buffers:
    """Allocate buffers for ``layout`` (blocking: run it in a worker thread); with ``pin``,
    page-locked on ``device``'s context (the caller's CUDA device)."""
    _bury()
    layout = layout if isinstance(layout, Layout) else Layout(layout)
    sizes = [n for _, n in layout]
    if share:
        flats = tuple(
            torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(n))  # type: ignore[no-untyped-call]
            for n in sizes
        )
        pinned = flats
    else:
        flats, whole = _arena(sizes, huge, pin, device)
        pinned = (whole,) if pin else ()
    if not pin:
        return Buffers(layout, flats, ())
    if share:
        for t in pinned:
            cuda.REGISTERED.add(t.data_ptr(), t.nbytes, device)
    return Buffers(layout, flats, pinned)


def _arena(
    sizes: list[int], huge: bool, pin: bool, device: Any
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """One private mapping holding every span (page-aligned where large): a tensor per span and
    one over the whole, page-locked with ``pin`` until the last of them is gone."""
    offsets, total = [], 0
    for n in sizes:
        align = _PAGE if n >= _SMALL else 64  # 4,096 tiny tensors must not cost 4,096 pages
        total = -(-total // align) * align
        offsets.append(total)
        total += n
    # private, not mmap's default MAP_SHARED: shmem gets no huge pages and unmaps slowly
    arena = mmap.mmap(-1, max(total, _PAGE), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge and total >= 2 * _MiB and hasattr(mmap, "MADV_HUGEPAGE"):
        arena.madvise(mmap.MADV_HUGEPAGE)
    if pin and hasattr(mmap, "MADV_DONTFORK"):  # a fork()ed child's copy-on-write must never
        arena.madvise(mmap.MADV_DONTFORK)  # move a page the GPU writes to
    # one memoryview for all: each span's storage starts at its offset of it (a memoryview per
    # span would be one more object the collector walks per tensor of a state dict)
    view = memoryview(arena)
    flats = tuple(_span(view, o, n) for o, n in zip(offsets, sizes, strict=True))
    whole = torch.frombuffer(view, dtype=torch.uint8)
    if pin:
        cuda.REGISTERED.add(whole.data_ptr(), whole.nbytes, device)
        _Unpin(arena, whole.data_ptr(), [view])
    return flats, whole


def _span(view: memoryview, offset: int, n: int) -> torch.Tensor:
    """A uint8 tensor of its own storage over ``view[offset:offset + n]``."""
    if n == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(view, dtype=torch.uint8, count=n, offset=offset)


class _Unpin:
    """Unregisters a page-locked mapping once every view of it is gone, then lets it go.

    Each tensor over the mapping keeps its memoryview alive; when the last view dies its
    finalizer unregisters the range while this object still holds the mapping, so the unmapping
    (when the mapping's last reference goes) always comes after the unregistering.
    """

    def __init__(self, arena: mmap.mmap, ptr: int, views: list[memoryview]) -> None:
        self._arena: mmap.mmap | None = arena
        self._ptr, self._left = ptr, len(views)
        self._lock = threading.Lock()
        for v in views:
            weakref.finalize(v, self._gone).atexit = False  # exiting needs no unregister

    def _gone(self) -> None:
        with self._lock:
            self._left -= 1
            if self._left:
                return
        try:
            cuda.REGISTERED.remove(self._ptr)  # a no-op when ``free`` did it first
        finally:
            self._arena = None  # now the mapping may go


def touch(buffers: Buffers) -> None:
    """Fault in every page of ``buffers`` now (blocking: a worker thread), so the first copy
    into them runs at the speed of the later ones."""
    for t in buffers.flats:
        t.zero_()


def free(doomed: list[Buffers]) -> None:
    """Unpin and drop ``doomed`` (a worker thread: unmapping a GiB takes ~0.1-0.2 s); a set that
    is not ``ready`` is retired instead, and freed by a later call once it is.

    The caller passes its only references, so the memory is returned here, not on the loop;
    staged copies a caller still holds keep theirs alive.
    """
    _bury()
    for buffers in doomed:
        if not buffers.ready():
            retire(buffers)
            continue
        for t in buffers.pinned:
            cuda.REGISTERED.remove(t.data_ptr())
    doomed.clear()


async def let_go(doomed: list[Any]) -> None:
    """Drop ``doomed`` (emptied: the caller's only references to large buffers) in a worker
    thread, shielded: the last reference frees the memory (unmapping a GiB takes ~0.1-0.2 s),
    which must not run on the loop."""
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(doomed.clear)


def retire(buffers: Buffers) -> None:
    """Keep ``buffers``, whose copies may still be running, until they are ``ready``."""
    with _RETIRED_LOCK:
        _RETIRED.append(buffers)


def retired() -> int:
    """How many retired sets are still waiting for their copies."""
    return len(_RETIRED)


def _bury() -> None:
    """Free the retired sets whose copies are done (a worker thread)."""
    with _RETIRED_LOCK:
        done = [b for b in _RETIRED if b.ready()]
        _RETIRED[:] = [b for b in _RETIRED if b not in done]
    for buffers in done:
        for t in buffers.pinned:
            cuda.REGISTERED.remove(t.data_ptr())


#: sets a cancelled stage left with copies in flight (a GPU may still write into them)
_RETIRED: list[Buffers] = []
_RETIRED_LOCK = threading.Lock()


def _pieces(sizes: Iterable[int], chunk: int) -> Iterator[tuple[int, int, int]]:
    """``(item, start, end)`` of each piece of at most ``chunk`` bytes of items of ``sizes``
    bytes, in order, checking for the worker's cancellation once per ``chunk`` handed out."""
    since_check = 0
    for k, n in enumerate(sizes):
        for a in range(0, n, chunk):
            if since_check >= chunk:
                anyio.from_thread.check_cancelled()
                since_check = 0
            b = min(a + chunk, n)
            yield k, a, b
            since_check += b - a


def copy_chunks(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], chunk: int) -> None:
    """Copy each ``src`` into ``dst`` in a worker thread, checking for cancellation per chunk."""
    for k, a, b in _pieces([src.numel() for src, _ in pairs], chunk):
        src, dst = pairs[k]
        copy_bytes(src[a:b], dst[a:b])


#: spans of at least this many bytes are copied by ``move_chunks`` where ``one_thread()``: torch
#: splits a copy of 32768 elements or more (64 KiB of a 2-byte dtype) over its intra-op threads
ONE_THREAD_BYTES = 64 * 1024


def one_thread() -> bool:
    """Whether host copies run in the calling thread alone (``move_chunks``): torch's parallel
    copies would take every CPU this process may run on, and an event loop woken meanwhile then
    waits milliseconds for the scheduler (2-4 ms on 2 cores). A memory-bound copy is about as
    fast in one thread there. ``torch.set_num_threads`` is no way to do it per call: it also
    sets process-wide state (the default for new threads, a shared pool, oneDNN's cache)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return torch.get_num_threads() >= cpus


def move_chunks(moves: Sequence[tuple[int, int, int]], chunk: int) -> None:
    """Copy each (destination address, source address, bytes) of CPU memory in this thread with
    the GIL released (``ctypes.memmove``), checking for cancellation per ``chunk`` bytes; the
    caller keeps both memories alive."""
    for k, a, b in _pieces([n for _, _, n in moves], chunk):
        dst, src, _ = moves[k]
        ctypes.memmove(dst + a, src + a, b - a)


async def run_whole(func: Callable[..., _T], *args: Any) -> _T:
    """``func(*args)`` in a worker thread, never cut short: for copies into a caller's tensors,
    which must end untouched or fully written, never half.

    A cancellation that arrives before the thread starts ``func`` leaves it unrun; one that
    arrives while it runs waits (shielded) for its end, then propagates. Cancellation by anyio
    scopes and native asyncio cancellation (``asyncio.timeout``) alike.
    """
    lock, done, state = threading.Lock(), threading.Event(), ["queued"]

    def run() -> _T:
        with lock:
            if state[0] == "dropped":  # the caller was cancelled first: nobody waits for it
                raise RuntimeError("cancelled before it started")
            state[0] = "running"
        try:
            return func(*args)
        finally:
            done.set()

    def drop() -> bool:
        with lock:
            state[0] = "dropped" if state[0] == "queued" else state[0]
            return state[0] == "dropped"

    try:
        return await anyio.to_thread.run_sync(run, abandon_on_cancel=True)
    finally:
        if not done.is_set() and not drop():
            with anyio.CancelScope(shield=True):
                await wait_until(done.is_set)


def copy_bytes(src: torch.Tensor, dst: torch.Tensor) -> None:
    """``dst.copy_(src)`` for uint8 tensors, through int64 views where aligned (~10% faster)."""
    wide = src.numel() // 8 * 8
    if wide and src.storage_offset() % 8 == 0 and dst.storage_offset() % 8 == 0:
        dst[:wide].view(torch.int64).copy_(src[:wide].view(torch.int64))
        src, dst = src[wide:], dst[wide:]
    if src.numel():
        dst.copy_(src)


def source_bytes(source: torch.UntypedStorage, span: Span) -> torch.Tensor:
    out = torch.empty(0, dtype=torch.uint8, device=source.device)
    return out.set_(source, span.start, (span.nbytes,), (1,))
