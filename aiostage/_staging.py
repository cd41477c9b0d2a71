"""Staging: copy a state dict into leased CPU buffers without ever blocking the event loop.

``DefaultStager.stage`` walks the state dict once (``tree``), groups tensors by shared storage,
leases a set of CPU buffers sized for that layout from a pool, and fills them: CUDA bytes by
non-blocking copies on a side stream whose event the loop polls, every other byte by batched
copies in a worker thread (they release the GIL) in bounded chunks, so cancellation lands
between chunks. A state dict of an unchanged structure reuses the plan and the staged tensors of
the last stage (``_core/fill.py``); nothing on the loop thread grows with the number of tensors.
A staged copy stays reserved until ``release(staged)``.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import math
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, TypeVar, runtime_checkable

import anyio
import anyio.lowlevel
import torch

from ._core import cuda
from ._core.buffers import Buffers, allocate, free, retire, touch
from ._core.completion import Backoff, wait_until
from ._core.fill import Fill, Planner, Prepared, Recipe, prime, versions
from ._core.storages import Layout
from ._core.tree import TensorLeaf, key_str
from .errors import AiostageWarning, ClosedError, LeaseTimeout, StagingError, UsageError

__all__ = ["AsyncStager", "DefaultStager", "StagerStatistics", "StagingOptions"]

_T = TypeVar("_T")
_MiB = 1 << 20

#: polling a CUDA event: one bare yield, then 0.2 ms doubling to 2 ms (a copy of a few MiB
#: ends within milliseconds; a longer one costs at most 2 ms of latency)
_CUDA_POLL = Backoff(0.0002, 0.002)
#: how often ``stage`` looks again at a pooled set a cancelled stage retired
_RETIRED_POLL = 0.002


@dataclass(frozen=True, slots=True)
class _Entry:
    """What a stage notes on the caller's thread before its first await: the current CUDA
    device and, by device, the streams its copies must wait for (both per thread)."""

    device: torch.device | None
    after: dict[torch.device, list[Any]]


@runtime_checkable
class AsyncStager(Protocol):
    """Anything that can stage a state dict as a coroutine (``DefaultStager``, replication).

    ``stage`` returns a CPU copy that later changes to the input never reach; ``release`` hands
    its buffers back for reuse; ``aclose`` waits for in-flight work and frees the buffers.
    """

    async def stage(self, state_dict: _T) -> _T:
        """Return a staged copy of ``state_dict`` with the same structure."""
        ...

    def release(self, staged: Any) -> None:
        """Hand the buffers of a copy returned by ``stage`` back to the stager."""
        ...

    async def aclose(self) -> None:
        """Wait for in-flight stages and free every buffer; idempotent."""
        ...

    async def __aenter__(self) -> Any:
        """Return the stager itself."""
        ...

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Close the stager."""
        ...


@dataclass(frozen=True, kw_only=True)
class StagingOptions:
    """How ``DefaultStager`` allocates and fills its CPU buffers.

    - ``pin_memory``: page-lock the buffers when CUDA is available, so device-to-host copies run
      asynchronously at full speed (ignored without CUDA).
    - ``share_memory``: allocate the buffers in shared memory (``/dev/shm``) so staged tensors can
      be handed to another process with ``torch.multiprocessing`` without a copy.
    - ``reuse_buffers``: keep buffers in a pool and refill them on the next ``stage`` of the same
      layout; a staged copy is then leased until ``release``. ``False``: fresh memory every call,
      owned by the caller, ``release`` is a no-op.
    - ``pool_size``: how many staged copies may be leased at once; ``stage`` waits for a
      ``release`` beyond that (backpressure), it never overwrites a copy still in use.
    - ``non_blocking``: issue CUDA copies on a side stream and poll their event from the loop
      (needs ``pin_memory``); ``False`` copies from a worker thread instead.
    - ``chunk_bytes``: bytes copied between two cancellation checks on the CPU path.
    - ``lease_timeout``: seconds ``stage`` may wait for a free buffer before raising
      ``LeaseTimeout`` (``None``: wait as long as it takes).
    - ``lease_warning``: seconds ``stage`` may wait for a free buffer before it warns
      (``AiostageWarning``) that every copy is still leased and what to do; it goes on waiting
      (``None``: never warn; a task that waits for its own copy would wait forever, silently).
    - ``huge_pages``: ask the kernel for transparent huge pages for the buffers, which makes the
      first ``stage`` (page faults) several times faster.
    """

    pin_memory: bool = True
    share_memory: bool = False
    reuse_buffers: bool = True
    pool_size: int = 2
    non_blocking: bool = True
    chunk_bytes: int = 64 * _MiB
    lease_timeout: float | None = None
    lease_warning: float | None = 10.0
    huge_pages: bool = True

    def __post_init__(self) -> None:
        if self.pool_size < 1:
            raise ValueError(f"pool_size must be at least 1, got {self.pool_size}")
        if self.chunk_bytes < 4096:
            raise ValueError(f"chunk_bytes must be at least 4096, got {self.chunk_bytes}")
        if self.lease_timeout is not None and self.lease_timeout < 0:
            raise ValueError(f"lease_timeout must be >= 0 or None, got {self.lease_timeout}")
        if self.lease_warning is not None and not self.lease_warning > 0:
            raise ValueError(f"lease_warning must be > 0 or None, got {self.lease_warning}")


@dataclass(frozen=True, slots=True)
class StagerStatistics:
    """Counters of a stager: stages done, bytes copied, buffer sets allocated, leases held."""

    stages: int
    bytes_staged: int
    allocations: int
    leased: int
    pooled_bytes: int
    last_stage_seconds: float


# ---------------------------------------------------------------- the stager


class DefaultStager:
    """Stage state dicts into pooled CPU buffers; the event loop never blocks.

    ``staged = await stager.stage(sd)`` returns a CPU copy with the same structure, dtypes,
    shapes, strides, aliasing and wrappers (``nn.Parameter``, DTensor, ShardedTensor). It waits
    only for a free buffer (backpressure, ``pool_size``) and for the copy itself. Raises
    ``StagingError`` naming the key of an unsupported leaf, ``LeaseTimeout`` and ``ClosedError``.

    Options come as one ``StagingOptions`` or as its fields by keyword
    (``DefaultStager(pool_size=1)``; keywords override ``options``); an unknown one is a
    ``TypeError`` listing the options.
    """

    def __init__(self, options: StagingOptions | None = None, **changes: Any) -> None:
        known = [f.name for f in dataclasses.fields(StagingOptions)]
        if unknown := sorted(set(changes) - set(known)):
            raise TypeError(
                f"DefaultStager() got unknown option(s) {unknown}; the options: {known}"
            )
        self.options = dataclasses.replace(options or StagingOptions(), **changes)
        self._cuda = cuda.available()
        self._pin = self.options.pin_memory and self._cuda
        self._streams = cuda.SideStreams() if self._cuda else None
        self._pool: list[Buffers] = []
        self._leases: dict[int, tuple[Any, Buffers]] = {}
        self._changed = anyio.Event()
        self._idle = anyio.Event()
        self._idle.set()
        self._in_flight = 0
        self._closed = False
        self._stats = {"stages": 0, "bytes_staged": 0, "allocations": 0}
        self._last_seconds = 0.0
        self._planner = Planner(self.options.chunk_bytes)

    async def __aenter__(self) -> DefaultStager:
        self._check_open()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def statistics(self) -> StagerStatistics:
        """Counters since creation; ``pooled_bytes`` is the CPU memory the pool holds now."""
        return StagerStatistics(
            **self._stats,
            leased=len(self._leases),
            pooled_bytes=sum(b.nbytes for b in self._pool),
            last_stage_seconds=self._last_seconds,
        )

    async def stage(
        self,
        state_dict: _T,
        *,
        issued: Callable[[], object] | None = None,
        streams: Iterable[Any] = (),
    ) -> _T:
        """Copy ``state_dict`` to CPU and return the copy; see the class docstring.

        CUDA copies wait for the work queued, when ``stage`` is called, on the calling thread's
        current stream of every device, and on ``streams`` (other CUDA streams that
        write the state: an optimizer's side stream, FSDP's); work queued later, or on any
        other stream, is not waited for. Every copy is done when ``stage`` returns.

        ``issued`` (zero-stall saves): called once the state dict has been walked and the
        version counter of each of its tensors noted, before any byte is copied; the caller may
        then run on (a forward and backward pass) but must not change a tensor in place until
        ``stage`` returns. One that was changed meanwhile (``optimizer.step()``, BatchNorm
        statistics updated by a forward in train mode) makes ``stage`` raise ``StagingError``
        naming its key: the copy may be torn, and it is discarded.
        """
        self._check_open()
        entry = self._note(streams)  # per thread: noted before any await
        self._enter()
        try:
            began = time.perf_counter()
            prepared, noted = await anyio.to_thread.run_sync(
                self._prepare, state_dict, issued is not None
            )
            if issued is not None:
                issued()
            layout = prepared.recipe.layout
            buffers = await self._acquire(layout, entry.device)
            try:
                staged: _T = await self._fill(prepared, buffers, entry)
                if noted is not None:
                    await anyio.to_thread.run_sync(_check_unchanged, noted)
            except BaseException:
                if not buffers.ready() and not self.options.reuse_buffers:
                    retire(buffers)  # kept until its copies are done, never freed before
                self._give_back(buffers)
                raise
            self._last_seconds = time.perf_counter() - began
            self._stats["stages"] += 1
            self._stats["bytes_staged"] += layout.nbytes
            if self.options.reuse_buffers:
                self._leases[id(staged)] = (staged, buffers)
            return staged
        finally:
            self._exit()

    def _note(self, streams: Iterable[Any]) -> _Entry:
        """The caller's device and streams (``_Entry``), on the caller's thread."""
        return _Entry(cuda.caller_device(), cuda.current_streams(streams))

    def _prepare(self, state_dict: Any, note: bool) -> tuple[Prepared, _Noted | None]:
        """The plan of ``state_dict`` and, with ``note``, its tensors and their version
        counters (a worker thread; the fill lets go of ``prepared.datas``)."""
        prepared = self._planner.prepare(state_dict)
        if not note:
            return prepared, None
        datas = list(prepared.datas)
        return prepared, (datas, versions(datas), prepared.recipe.leaves)

    async def reserve(self, state_dict: Any, copies: int = 1) -> None:
        """Allocate and fault in pooled buffers for ``copies`` staged copies laid out like
        ``state_dict`` (nothing is copied), so that even the first ``stage`` of such a state
        dict runs warm: call it at start-up, off the training path.

        Page faults of fresh memory make a first stage several times slower (more under memory
        pressure); this moves that cost here. So does the full collection that a new plan's
        objects (about ten per tensor, and the staged tensors) call for: run here once, in a
        worker thread, while automatic collection is on, it does not fall inside one of the
        first training steps (about 0.2 s with the GIL held at ~20k tensors). Blocks on nothing
        (worker threads). At most ``pool_size`` copies are kept; a no-op with
        ``reuse_buffers=False``.
        """
        self._check_open()
        if not self.options.reuse_buffers:
            await anyio.lowlevel.checkpoint()
            return
        device = self._note(()).device
        known = self._planner.last
        recipe = (await anyio.to_thread.run_sync(self._planner.prepare, state_dict)).recipe
        await self._reserve(recipe, device, copies)
        if recipe is not known and gc.isenabled():
            await anyio.to_thread.run_sync(gc.collect)

    async def _reserve(self, recipe: Recipe, device: torch.device | None, copies: int) -> None:
        """Allocate, fault in and prime pooled buffers for ``recipe`` up to ``copies``."""
        have = sum(1 for b in self._pool if b.layout == recipe.layout)
        for _ in range(min(copies, self.options.pool_size) - have):
            if len(self._pool) >= self.options.pool_size:
                break
            buffers = await self._allocate(recipe.layout, device, pooled=True)
            try:
                await anyio.to_thread.run_sync(touch, buffers)
                await anyio.to_thread.run_sync(prime, recipe, buffers)
            finally:
                self._give_back(buffers)

    def release(self, staged: Any) -> None:
        """Hand back the buffers of ``staged``; the copy must not be read afterwards: a later
        ``stage`` of the same structure refills them and may hand out the same tensor objects
        again (any that were changed, not just read, are built afresh).

        A no-op with ``reuse_buffers=False`` or after ``aclose``. Raises ``UsageError`` for an
        object this stager did not return (or one already released).
        """
        if not self.options.reuse_buffers or self._closed:
            return
        entry = self._leases.get(id(staged))
        if entry is None or entry[0] is not staged:
            raise UsageError(
                "release() got an object that is not a staged copy leased from this stager "
                "(pass the exact object stage() returned, once)"
            )
        del self._leases[id(staged)]
        self._give_back(entry[1])

    async def aclose(self) -> None:
        """Wait for in-flight stages, then unpin and drop every buffer; idempotent.

        Staged copies already returned stay readable (their memory lives as long as they do).
        """
        if self._closed:
            await anyio.lowlevel.checkpoint()
            return
        self._closed = True
        self._notify()
        await self._idle.wait()
        doomed, self._pool = self._pool, []
        self._leases.clear()
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(free, doomed)

    # -- internals

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("this stager is closed; create a new DefaultStager")

    def _enter(self) -> None:
        self._in_flight += 1
        self._idle = anyio.Event() if self._in_flight == 1 else self._idle

    def _exit(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def _give_back(self, buffers: Buffers) -> None:
        buffers.busy = False
        self._notify()

    async def _acquire(self, layout: Layout, device: torch.device | None) -> Buffers:
        """A free buffer set for ``layout``: reused, newly allocated, or waited for."""
        try:
            with anyio.fail_after(self.options.lease_timeout):
                return await self._acquire_forever(layout, device)
        except TimeoutError as exc:
            raise LeaseTimeout(self._all_leased(self.options.lease_timeout)) from exc

    def _all_leased(self, seconds: float | None) -> str:
        return (
            f"all {self.options.pool_size} staged copies stayed leased for {seconds} s; call "
            "stager.release(staged) when a copy is consumed, or raise StagingOptions.pool_size"
        )

    async def _wait_for_release(self, warn_at: float) -> float:
        """Wait for a release (or, while a retired set waits for its copies, a short while); at
        ``warn_at`` (loop time) warn once: return when to warn next."""
        retired = any(not b.busy and b.settled is not None for b in self._pool)
        poll = anyio.current_time() + _RETIRED_POLL if retired else math.inf
        with anyio.CancelScope(deadline=min(warn_at, poll)):
            await self._changed.wait()
            return warn_at
        if anyio.current_time() < warn_at:
            return warn_at
        warnings.warn(
            f"stage() is waiting for a free buffer: {self._all_leased(self.options.lease_warning)}"
            " (it goes on waiting; StagingOptions.lease_timeout makes it raise LeaseTimeout)",
            AiostageWarning,
            stacklevel=5,  # the caller of stage()
        )
        return math.inf

    async def _acquire_forever(self, layout: Layout, device: torch.device | None) -> Buffers:
        if not self.options.reuse_buffers:
            return await self._allocate(layout, device)
        warning = self.options.lease_warning
        warn_at = math.inf if warning is None else anyio.current_time() + warning
        while True:
            self._check_open()
            idle = [i for i, b in enumerate(self._pool) if not b.busy and b.ready()]
            match = next((self._pool[i] for i in idle if self._pool[i].layout == layout), None)
            if match is not None:
                match.busy = True
                await anyio.lowlevel.checkpoint()
                return match
            if len(self._pool) >= self.options.pool_size and idle:
                # an idle set of another layout makes room; freed off the loop thread
                await anyio.to_thread.run_sync(free, [self._pool.pop(idle[0])])
            if len(self._pool) < self.options.pool_size:
                return await self._allocate(layout, device, pooled=True)
            warn_at = await self._wait_for_release(warn_at)

    async def _allocate(
        self, layout: Layout, device: torch.device | None, *, pooled: bool = False
    ) -> Buffers:
        """Fresh buffers for ``layout``, page-locked on ``device``'s context; shared memory is
        page-locked only when pooled (``free`` unregisters it; nothing else would)."""
        o = self.options
        pin = self._pin and (pooled or not o.share_memory)
        placeholder = Buffers(layout, (), ())
        if pooled:
            self._pool.append(placeholder)  # holds the slot while the thread allocates
        try:
            buffers = await anyio.to_thread.run_sync(
                allocate, layout, o.share_memory, pin, o.huge_pages, device
            )
        finally:
            if pooled:
                self._pool.remove(placeholder)
        self._stats["allocations"] += 1
        if pooled:
            self._pool.append(buffers)
        return buffers

    async def _fill(self, prepared: Prepared, buffers: Buffers, entry: _Entry) -> Any:
        """Fill ``buffers`` from a worker thread and build the staged copy over them.

        CUDA copies wait for the caller's streams (``entry``): queued on side streams into
        page-locked buffers and awaited by polling their events, else blocking copies in the
        worker on side streams. A stage that fails or is cancelled while copies may still run
        does not wait for them: it marks ``buffers`` unsettled (never reused nor freed before
        they are done, ``Buffers.ready``) and returns at once, even behind a hung kernel.
        """
        devices = prepared.recipe.devices
        job = Fill(prepared, buffers, self.options.chunk_bytes)
        run: Callable[[], Any] = job.run
        if devices and self._streams is not None:
            if buffers.pinned and self.options.non_blocking:
                job.cuda = (self._streams, entry.after)
            else:
                run = functools.partial(self._streams.ordered, devices, entry.after, job.run)
        finished = threading.Event()

        def settled() -> bool:
            return finished.is_set() and all(e.query() for e in job.events)

        try:
            staged = await anyio.to_thread.run_sync(
                cuda.bound(entry.device, _flagged(run, finished)),
                abandon_on_cancel=bool(devices),  # a CUDA call may block behind a hung kernel
            )
            await wait_until(settled, _CUDA_POLL)
        except BaseException:
            if not settled():
                buffers.settled = settled
            raise
        return staged


def _flagged(func: Callable[[], _T], done: threading.Event) -> Callable[[], _T]:
    """``func`` that sets ``done`` when it returns or raises (worker thread)."""

    def run() -> _T:
        try:
            return func()
        finally:
            done.set()

    return run


_Noted = tuple[list[torch.Tensor], list[int], tuple[TensorLeaf, ...]]


def _check_unchanged(noted: _Noted) -> None:
    """Raise ``StagingError`` naming the first tensor changed in place since it was noted."""
    datas, then, leaves = noted
    now = versions(datas)
    if now == then:
        return
    i = next(i for i, (a, b) in enumerate(zip(now, then, strict=True)) if a != b)
    raise StagingError(
        "changed in place while it was being staged (before `await handle.staged`, e.g. by "
        "optimizer.step() or a forward pass updating BatchNorm statistics): the copy may be "
        "torn and was discarded; await handle.staged before changing the state",
        key=key_str(leaves[i].path),
    )
