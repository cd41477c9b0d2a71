"""A subscriber's check of a landed version: after the landing, at a lower CPU priority."""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

import anyio
import pytest
import torch

from aiostage._channel.fill import Fill
from aiostage._channel.verify import NICE, _hash_yielding, _lower_priority, check_landed
from aiostage._replication.frames import frame_sources, plan_cpu_frame
from aiostage._storage.digests import source_digests
from aiostage.errors import ReplicationError


def _landed(seed: int) -> tuple[Any, torch.Tensor, list[int]]:
    """A frame's header, its data region as it landed, and its sender's digests."""
    g = torch.Generator().manual_seed(seed)
    state = {f"t{i}": torch.randn(3 + 700 * i, generator=g) for i in range(5)}
    planned = plan_cpu_frame(state)
    data = torch.zeros(planned.header.data_bytes, dtype=torch.uint8)
    fill = Fill(planned.header, planned.sources, data, hashing=True)
    fill.run()
    assert fill.digests is not None
    return planned.header, data, fill.digests


def test_a_frame_as_sent_passes() -> None:
    header, data, digests = _landed(0)
    anyio.run(check_landed, header, data, digests, 3)


def test_a_damaged_byte_is_refused_naming_the_entry_and_the_publisher() -> None:
    header, data, digests = _landed(1)
    entry = header.entries[3]
    data[entry.begin + 5] ^= 0xFF
    with pytest.raises(ReplicationError) as caught:
        anyio.run(check_landed, header, data, digests, 3)
    assert caught.value.phase == "verify"
    assert caught.value.peer == 3
    assert repr(entry.name) in str(caught.value)


def test_its_digests_are_those_of_the_entries() -> None:
    header, data, _ = _landed(2)
    sources = frame_sources(header, data)
    assert _hash_yielding(sources) == source_digests(sources)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_only_the_hashing_thread_gives_way() -> None:
    """The thread that lowers its priority is the one that hashes, not its caller (a pooled
    worker thread would stay lowered: it cannot be raised again without privileges)."""
    seen: list[int] = []

    def hashing() -> None:
        before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        _lower_priority()
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) - before)

    caller = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    thread = threading.Thread(target=hashing)
    thread.start()
    thread.join()
    after = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert after == caller
    assert seen == [min(NICE, 19 - caller)]
    header, data, digests = _landed(4)
    anyio.run(check_landed, header, data, digests, 1)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == caller
