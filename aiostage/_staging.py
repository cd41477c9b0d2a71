"""Staging: copy a state dict into leased CPU buffers without ever blocking the event loop.

``DefaultStager.stage`` walks the state dict once (``tree``), groups tensors by shared storage,
leases a set of CPU buffers sized for that layout from a pool, and fills them: CUDA bytes by
non-blocking copies on a side stream whose event the loop polls, every other byte by
``Tensor.copy_`` in a worker thread (it releases the GIL) in bounded chunks, so cancellation
lands between chunks. A staged copy stays reserved until ``release(staged)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, TypeVar, runtime_checkable

import anyio
import anyio.lowlevel
import torch

from ._core import cuda, gc_pause
from ._core.buffers import Buffers, Layout, allocate, copy_chunks, free, source_bytes, touch
from ._core.completion import Backoff, wait_until
from ._core.storages import StoragePlan, plan_storages, view_tensor
from ._core.tree import Tree, flatten, unflatten
from .errors import ClosedError, LeaseTimeout, UsageError

__all__ = ["AsyncStager", "DefaultStager", "StagerStatistics", "StagingOptions"]

_T = TypeVar("_T")
_MiB = 1 << 20

#: polling a CUDA event: one bare yield, then 0.2 ms doubling to 2 ms (a copy of a few MiB
#: ends within milliseconds; a longer one costs at most 2 ms of latency)
_CUDA_POLL = Backoff(0.0002, 0.002)


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
    huge_pages: bool = True

    def __post_init__(self) -> None:
        if self.pool_size < 1:
            raise ValueError(f"pool_size must be at least 1, got {self.pool_size}")
        if self.chunk_bytes < 4096:
            raise ValueError(f"chunk_bytes must be at least 4096, got {self.chunk_bytes}")
        if self.lease_timeout is not None and self.lease_timeout < 0:
            raise ValueError(f"lease_timeout must be >= 0 or None, got {self.lease_timeout}")


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
    """

    def __init__(self, options: StagingOptions | None = None) -> None:
        self.options = options or StagingOptions()
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

    async def stage(self, state_dict: _T) -> _T:
        """Copy ``state_dict`` to CPU and return the copy; see the class docstring."""
        self._check_open()
        self._enter()
        try:
            began = time.perf_counter()
            tree, plan = await anyio.to_thread.run_sync(_plan, state_dict)
            buffers = await self._acquire(plan.layout)
            try:
                staged: _T = await self._fill(tree, plan, buffers)
            except BaseException:
                self._give_back(buffers)
                raise
            self._last_seconds = time.perf_counter() - began
            self._stats["stages"] += 1
            self._stats["bytes_staged"] += plan.nbytes
            if self.options.reuse_buffers:
                self._leases[id(staged)] = (staged, buffers)
            return staged
        finally:
            self._exit()

    async def reserve(self, state_dict: Any, copies: int = 1) -> None:
        """Allocate and fault in pooled buffers for ``copies`` staged copies laid out like
        ``state_dict`` (nothing is copied), so that even the first ``stage`` of such a state
        dict runs warm: call it at start-up, off the training path.

        Page faults of fresh memory make a first stage several times slower (more under memory
        pressure); this moves that cost here. Blocks on nothing (worker threads). At most
        ``pool_size`` copies are kept; a no-op with ``reuse_buffers=False``.
        """
        self._check_open()
        if not self.options.reuse_buffers:
            await anyio.lowlevel.checkpoint()
            return
        _, plan = await anyio.to_thread.run_sync(_plan, state_dict)
        have = sum(1 for b in self._pool if b.layout == plan.layout)
        for _ in range(min(copies, self.options.pool_size) - have):
            if len(self._pool) >= self.options.pool_size:
                break
            buffers = await self._allocate(plan.layout, pooled=True)
            try:
                await anyio.to_thread.run_sync(touch, buffers)
            finally:
                self._give_back(buffers)

    def release(self, staged: Any) -> None:
        """Hand back the buffers of ``staged``; the copy must not be read afterwards.

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

    async def _acquire(self, layout: Layout) -> Buffers:
        """A free buffer set for ``layout``: reused, newly allocated, or waited for."""
        try:
            with anyio.fail_after(self.options.lease_timeout):
                return await self._acquire_forever(layout)
        except TimeoutError as exc:
            raise LeaseTimeout(
                f"all {self.options.pool_size} staged copies stayed leased for "
                f"{self.options.lease_timeout} s; call stager.release(staged) when a copy is "
                "consumed, or raise StagingOptions.pool_size"
            ) from exc

    async def _acquire_forever(self, layout: Layout) -> Buffers:
        if not self.options.reuse_buffers:
            return await self._allocate(layout)
        while True:
            self._check_open()
            idle = [i for i, b in enumerate(self._pool) if not b.busy]
            match = next((self._pool[i] for i in idle if self._pool[i].layout == layout), None)
            if match is not None:
                match.busy = True
                await anyio.lowlevel.checkpoint()
                return match
            if len(self._pool) >= self.options.pool_size and idle:
                # an idle set of another layout makes room; freed off the loop thread
                await anyio.to_thread.run_sync(free, [self._pool.pop(idle[0])])
            if len(self._pool) < self.options.pool_size:
                return await self._allocate(layout, pooled=True)
            await self._changed.wait()

    async def _allocate(self, layout: Layout, *, pooled: bool = False) -> Buffers:
        o = self.options
        placeholder = Buffers(layout, (), ())
        if pooled:
            self._pool.append(placeholder)  # holds the slot while the thread allocates
        try:
            buffers = await anyio.to_thread.run_sync(
                allocate, layout, o.share_memory, self._pin, o.huge_pages
            )
        finally:
            if pooled:
                self._pool.remove(placeholder)
        self._stats["allocations"] += 1
        if pooled:
            self._pool.append(buffers)
        return buffers

    async def _fill(self, tree: Tree, plan: StoragePlan, buffers: Buffers) -> Any:
        """Fill ``buffers`` from a worker thread and rebuild the tree over them.

        CUDA copies the thread queued are always awaited (shielded) before returning or raising,
        so a cancelled stage never hands back buffers a copy may still write.
        """
        streams = self._streams if self._pin and self.options.non_blocking else None
        job = _CopyJob(tree, plan, buffers, self.options.chunk_bytes)
        if streams is not None:
            job.cuda = (streams, cuda.current_streams(s.device for s in plan.spans))
        try:
            staged = await anyio.to_thread.run_sync(job.run, abandon_on_cancel=False)
        finally:
            with anyio.CancelScope(shield=True):
                for event in job.events:
                    await wait_until(event.query, _CUDA_POLL)
        await anyio.lowlevel.checkpoint_if_cancelled()
        return staged


def _plan(state_dict: Any) -> tuple[Tree, StoragePlan]:
    """Walk the state dict and plan its storages (a worker thread: large dicts take a while)."""
    with gc_pause.paused():
        tree = flatten(state_dict)
        return tree, plan_storages([leaf.data for leaf in tree.leaves])


@dataclass(eq=False)
class _CopyJob:
    """One stage's copies, run in a worker thread; ``events`` collects the queued CUDA copies."""

    tree: Tree
    plan: StoragePlan
    buffers: Buffers
    chunk: int
    cuda: tuple[cuda.SideStreams, dict[torch.device, Any]] | None = None
    events: list[Any] = field(default_factory=list)

    def run(self) -> Any:
        """Queue the CUDA copies, copy the rest in chunks, rebuild the tree over the buffers."""
        host: list[tuple[torch.Tensor, torch.Tensor]] = []
        by_device: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        spans = zip(self.plan.spans, self.plan.sources, self.buffers.flats, strict=True)
        for span, source, dst in spans:
            pair = (source_bytes(source, span), dst)
            if self.cuda is not None and span.device.type == "cuda":
                by_device.setdefault(span.device, []).append(pair)
            else:
                host.append(pair)
        if self.cuda is not None:
            streams, current = self.cuda
            for device, pairs in by_device.items():
                self.events.append(streams.issue_copies(device, pairs, after=current[device]))
        copy_chunks(host, self.chunk)
        with gc_pause.paused():
            storages = self.buffers.storages()
            return unflatten(self.tree, [view_tensor(v, storages) for v in self.plan.views])
