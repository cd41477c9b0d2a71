"""The only module that calls ``torch.cuda``: devices, side streams, copies, events, pinning.

Every function here returns without waiting for the GPU: copies are queued on a side stream that
first waits for the caller's streams, the source memory is marked in use by that stream (so the
caching allocator does not hand it out before the copy ran), and completion is a CUDA event for
the caller to poll.

The current device and the current stream are per thread: a worker thread starts on device 0,
whatever device its caller uses. So a caller notes its device and streams on its own thread at
call entry (``resolve``, ``current_streams``) and carries them into every worker call
(``bound``), which runs on that device; no worker ever falls back to ``cuda:0``.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch

from ..errors import UsageError

__all__ = []

_T = TypeVar("_T")

#: cudaHostRegisterPortable: the range counts as pinned for every device's context, so copies
#: from any GPU of a state dict into it run asynchronously
_PORTABLE = 1


def available() -> bool:
    """Whether a CUDA device can be used by this process."""
    return torch.cuda.is_available()


def check_device(device: torch.device, what: str) -> None:
    """Raise ``UsageError`` (``what`` names the argument) unless ``device`` can be used here: a
    CUDA device that exists, or any other device. Never initialises CUDA for a CPU device."""
    if device.type != "cuda":
        return
    count = torch.cuda.device_count()
    if count == 0:
        why = "a build without CUDA" if torch.version.cuda is None else "no GPU is visible"
        raise UsageError(
            f"{what}={str(device)!r}: no CUDA device is available to this process (torch "
            f"{torch.__version__}, {why}); use 'cpu', or run where a GPU is visible"
        )
    if device.index is not None and device.index >= count:
        raise UsageError(
            f"{what}={str(device)!r}: this process sees {count} CUDA device(s), cuda:0 to "
            f"cuda:{count - 1}"
        )


def resolve(device: torch.device) -> torch.device:
    """``device`` with an index: a bare ``cuda`` becomes this thread's current CUDA device.

    Call it on the caller's thread (the loop), never in a worker, whose current device is 0.
    """
    if device.type != "cuda" or _index(device) is not None:
        return device
    if not in_use():  # set_device initialises CUDA: before that, every thread is on device 0
        return torch.device("cuda", 0)
    return torch.device("cuda", torch.cuda.current_device())


def _index(device: torch.device) -> int | None:
    """The index of ``device``: ``None`` for a bare ``cuda`` (typed so, unlike the stubs)."""
    index: int | None = device.index
    return index


def in_use() -> bool:
    """Whether this process has initialised CUDA (no CUDA tensor can exist before); asking
    initialises nothing."""
    return torch.cuda.is_available() and torch.cuda.is_initialized()  # type: ignore[no-untyped-call]


def caller_device() -> torch.device | None:
    """This thread's current CUDA device, or ``None`` while CUDA is not in use."""
    return resolve(torch.device("cuda")) if in_use() else None


@contextlib.contextmanager
def on_device(device: torch.device | None) -> Iterator[None]:
    """Run the block with ``device`` as this thread's current CUDA device, then restore it.

    A no-op for ``None`` and non-CUDA devices. Raises ``ValueError`` for a CUDA device without
    an index: it would mean device 0 in a worker thread (``resolve`` it on the caller's thread).
    """
    if device is None or device.type != "cuda":
        yield
        return
    with torch.cuda.device(_indexed(device)):
        yield


def _indexed(device: torch.device) -> int:
    """The index of a CUDA ``device`` carried into a worker; ``ValueError`` without one."""
    index = _index(device)
    if index is None:
        raise ValueError(
            "a CUDA device carried into a worker thread needs an index (cuda.resolve it on the "
            "caller's thread): a bare 'cuda' there means cuda:0"
        )
    return index


def bound(device: torch.device | None, func: Callable[..., _T]) -> Callable[..., _T]:
    """``func`` made to run on ``device`` (``on_device``) in whatever thread calls it: wrap every
    function a worker thread runs for a caller that may use CUDA."""
    if device is not None and device.type == "cuda":
        _indexed(device)  # a ValueError without an index, before any thread starts
    return functools.partial(_run_on, device, func)


def _run_on(device: torch.device | None, func: Callable[..., _T], *args: Any) -> _T:
    with on_device(device):
        return func(*args)


def current_streams(
    extra: Iterable[Any] = (),
) -> dict[torch.device, list[Any]]:
    """The streams copies must wait for, by device: the calling thread's current stream on every
    visible CUDA device, plus the streams ``extra`` (an optimizer's side stream, FSDP's), each
    under its own device.

    Streams are per thread: call it on the caller's thread at call entry, before any await (a
    task that switches streams across an await would change what a later call sees). Asking
    creates no CUDA context. Empty while CUDA is not in use.
    """
    if not in_use():
        return {}
    out: dict[torch.device, list[Any]] = {
        torch.device("cuda", i): [torch.cuda.current_stream(i)]
        for i in range(torch.cuda.device_count())
    }
    for stream in extra:
        out.setdefault(stream.device, []).append(stream)
    return out


class SideStreams:
    """One copy stream per device, created on first use and kept for the stager's lifetime."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def _side(self, device: torch.device, after: Iterable[Any]) -> torch.cuda.Stream:
        """The side stream of ``device``, made to wait for the work queued on ``after`` (streams
        of ``device``)."""
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        for other in after:
            stream.wait_stream(other)
        return stream

    def issue_copies(
        self,
        device: torch.device,
        pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
        *,
        after: Iterable[Any],
    ) -> torch.cuda.Event:
        """Queue ``dst.copy_(src, non_blocking=True)`` for each pair once the work queued on the
        streams ``after`` (those of ``device`` among them) is done; return the completion event.
        ``dst`` must be pinned host memory or the copy would be synchronous. Safe to call from a
        worker thread.
        """
        stream = self._side(device, after)
        with torch.cuda.stream(stream):
            for src, dst in pairs:
                dst.copy_(src, non_blocking=True)
                src.record_stream(stream)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(stream)
        return event

    def ordered(
        self,
        devices: Iterable[torch.device],
        after: Mapping[torch.device, Iterable[Any]],
        func: Callable[[], _T],
    ) -> _T:
        """``func()`` with each of ``devices``' side stream current, each first made to wait for
        the streams ``after[device]``: its blocking copies (to pageable memory, or into a
        caller's tensors) then follow the caller's queued work, and all are done when it
        returns (blocking: a worker thread)."""
        used = sorted(set(devices), key=str)
        with contextlib.ExitStack() as stack:
            for device in used:
                stack.enter_context(torch.cuda.stream(self._side(device, after.get(device, ()))))
            out = func()
            for device in used:  # device-side copies may still be queued
                self._streams[device].synchronize()
        return out


# ---------------------------------------------------------------- page-locking host memory


def _isolated(func: Callable[[], int], device: torch.device | None) -> int:
    """``func()`` in a short-lived thread of its own, on ``device``, joined before returning.

    A failed CUDA runtime call leaves that thread's "last error" set, and PyTorch's next kernel
    launch check on the same thread would raise it; the pooled worker threads never see it.
    """
    result: list[int] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            with on_device(device):
                result.append(func())
        except BaseException as exc:  # handed to the caller below
            failed.append(exc)

    thread = threading.Thread(target=run, name="aiostage cudaHostRegister")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return result[0]


def host_register(ptr: int, nbytes: int, device: torch.device | None) -> None:
    """Page-lock ``nbytes`` at ``ptr`` (portable: pinned for every GPU) so device copies into
    them run asynchronously (slow: a worker thread). Raises ``RuntimeError`` on failure."""
    cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
    code = _isolated(lambda: int(cudart.cudaHostRegister(ptr, nbytes, _PORTABLE)), device)
    if code != 0:
        raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed with CUDA error {code}")


def host_unregister(ptr: int, device: torch.device | None) -> None:
    """Undo ``host_register`` for the range at ``ptr``; the memory stays valid, pageable."""
    cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
    code = _isolated(lambda: int(cudart.cudaHostUnregister(ptr)), device)
    if code != 0:
        raise RuntimeError(f"cudaHostUnregister failed with CUDA error {code}")


class Registrations:
    """The host ranges this process page-locked, each unregistered exactly once.

    ``add`` registers a range and notes it; ``remove`` unregisters it if it is still noted (the
    owner's ``free`` and the memory's finalizer may both ask; the first one does it). The
    register and unregister functions are injectable, so the bookkeeping is testable without
    a GPU.
    """

    def __init__(
        self,
        register: Callable[[int, int, torch.device | None], None] = host_register,
        unregister: Callable[[int, torch.device | None], None] = host_unregister,
    ) -> None:
        self._register, self._unregister = register, unregister
        self._live: dict[int, tuple[int, torch.device | None]] = {}
        self._lock = threading.Lock()

    def add(self, ptr: int, nbytes: int, device: torch.device | None) -> None:
        """Page-lock ``nbytes`` at ``ptr`` on ``device``'s context (blocking: a worker thread).
        Raises ``RuntimeError`` for a range already noted (it was never unregistered)."""
        with self._lock:
            if ptr in self._live:
                raise RuntimeError(f"host range at {ptr:#x} is already page-locked")
            self._live[ptr] = (nbytes, device)
        try:
            self._register(ptr, nbytes, device)
        except BaseException:
            with self._lock:
                del self._live[ptr]
            raise

    def remove(self, ptr: int) -> bool:
        """Unregister the range at ``ptr`` if it is still registered; whether it was."""
        with self._lock:
            entry = self._live.pop(ptr, None)
        if entry is None:
            return False
        self._unregister(ptr, entry[1])
        return True

    def live(self) -> Mapping[int, int]:
        """The registered ranges now: address to size."""
        with self._lock:
            return {p: n for p, (n, _) in self._live.items()}


#: every range aiostage page-locks in this process
REGISTERED = Registrations()
