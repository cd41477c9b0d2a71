"""Checking a version that landed against its publisher's digests, after the landing, in a
thread of lower CPU priority: on a busy host the hashing gives way to serving and to the
transfers still on the wire, instead of competing with them while the frame arrives."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Sequence

import anyio.to_thread
import torch

from .._format.codec import Header, Source
from .._replication.frames import frame_sources
from .._replication.wire import check_digests
from .._storage.digests import source_digests

__all__ = ["NICE", "check_landed"]

#: how much lower than its caller's the hashing thread's CPU priority is (Linux nice steps):
#: about a tenth of a busy core's share, so it still ends on a host that never idles
NICE = 10


async def check_landed(
    header: Header, data: torch.Tensor, digests: Sequence[int], peer: int
) -> None:
    """Hash each entry of a landed frame (``data``, laid out by ``header``) and compare it with
    the sender's ``digests``. Raises ``ReplicationError(peer, "verify")`` naming the first entry
    that differs. Blocks on nothing; a cancelled check leaves its thread to finish reading."""
    sources = frame_sources(header, data)
    got = await anyio.to_thread.run_sync(_hash_yielding, sources, abandon_on_cancel=True)
    check_digests(header.entries, got, digests, peer, "the publisher")


def _hash_yielding(sources: Sequence[Source]) -> list[int]:
    """``source_digests(sources)`` in a thread of its own at lower CPU priority (a worker
    thread's priority is not lowered: it is pooled, and lowering cannot be undone)."""
    out: list[list[int]] = []
    failed: list[BaseException] = []

    def run() -> None:
        _lower_priority()
        try:
            out.append(source_digests(sources))
        except BaseException as exc:  # handed to the caller below
            failed.append(exc)

    thread = threading.Thread(target=run, name="aiostage verify", daemon=True)
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return out[0]


def _lower_priority() -> None:
    """Lower the calling thread's CPU priority by ``NICE`` (Linux, where the nice value belongs
    to each thread); elsewhere, or where it is refused, nothing."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            tid = threading.get_native_id()
            os.setpriority(
                os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + NICE)
            )
