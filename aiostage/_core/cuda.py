"""The only module that calls ``torch.cuda``: side streams, non-blocking copies, events, pinning.

Every function here returns without waiting for the GPU: copies are queued on a side stream that
first waits for the caller's current stream, the source memory is marked in use by that stream (so
the caching allocator does not hand it out before the copy ran), and completion is a CUDA event
for the caller to poll.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from ..errors import UsageError

__all__ = []


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


def current_streams(devices: Iterable[torch.device]) -> dict[torch.device, torch.cuda.Stream]:
    """The caller's current stream on each CUDA device among ``devices``.

    Streams are per thread: call it on the thread whose queued work the copies must follow.
    """
    return {d: torch.cuda.current_stream(d) for d in set(devices) if d.type == "cuda"}


class SideStreams:
    """One copy stream per device, created on first use and kept for the stager's lifetime."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def issue_copies(
        self,
        device: torch.device,
        pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
        *,
        after: torch.cuda.Stream,
    ) -> torch.cuda.Event:
        """Queue ``dst.copy_(src, non_blocking=True)`` for each pair once the work queued on
        ``after`` is done; return the completion event. ``dst`` must be pinned host memory or
        the copy would be synchronous. Safe to call from a worker thread.
        """
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        stream.wait_stream(after)
        with torch.cuda.stream(stream):
            for src, dst in pairs:
                dst.copy_(src, non_blocking=True)
                src.record_stream(stream)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(stream)
        return event


def host_register(tensor: torch.Tensor) -> None:
    """Page-lock ``tensor``'s memory so device copies into it run asynchronously (slow)."""
    result = torch.cuda.cudart().cudaHostRegister(  # type: ignore[no-untyped-call]
        tensor.data_ptr(), tensor.nbytes, 0
    )
    if int(result) != 0:
        raise RuntimeError(f"cudaHostRegister failed with error {int(result)}")


def host_unregister(tensor: torch.Tensor) -> None:
    """Undo ``host_register``; the memory stays valid as ordinary pageable memory."""
    torch.cuda.cudart().cudaHostUnregister(tensor.data_ptr())  # type: ignore[no-untyped-call]
