"""Frames of a repeated layout land in one go (``transport._open``), in step with every other
kind of frame, in a real two-rank gloo world on 127.0.0.1."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from aiostage._format.codec import Source
from aiostage._replication import transport
from aiostage._replication.frames import plan_cpu_frame
from aiostage._replication.receive import ReceiveBuffers
from aiostage._replication.wire import limits_of
from aiostage._storage.digests import source_digests
from aiostage.errors import ReplicationError
from aiostage.testing import run_world

pytestmark = [pytest.mark.distributed]

#: what rank 0 sends, in order: (state, whether its digests are damaged); ``None``: nothing
ROUNDS: list[tuple[str, int, bool] | None] = [
    ("w", 1, False),  # the first frame: its header is decoded
    ("w", 2, False),  # the same layout, new bytes: landed in one go
    ("v", 3, False),  # a header of the same length and data size, another key
    ("w", 4, False),  # back to the first layout (decoded again)
    ("w", 5, True),  # a repeat whose digests do not match: refused, the link stays in step
    None,  # send_nothing after a known header
    ("w", 6, False),  # a repeat once more
    ("big", 7, False),  # a larger state
]


def _state(key: str, seed: int) -> dict[str, Any]:
    """A small state: one tensor of several messages at ``key``, small ones packed together."""
    gen = torch.Generator().manual_seed(seed)
    size = 1_200_000 if key == "big" else 600_000
    return {key: torch.randn(size, generator=gen), "b": torch.randn(10, generator=gen), "n": seed}


def _region(sources: list[Source]) -> torch.Tensor:
    """The data region the entries ``sources`` make: each one's bytes, then its zero padding."""
    parts = []
    for data, pad in sources:
        parts += [
            data.contiguous().view(torch.uint8).flatten(),
            torch.zeros(pad, dtype=torch.uint8),
        ]
    return torch.cat(parts)


async def _repeat(rank: int, world: int) -> list[Any]:
    link = transport.Link(dist.group.WORLD, torch.device("cpu"), 60.0)
    seen: list[Any] = []
    if rank == 0:
        for r in ROUNDS:
            if r is None:
                await transport.send_nothing(link, 1)
                continue
            planned = plan_cpu_frame(_state(r[0], r[1]))
            digests = source_digests(planned.sources)
            given = [d ^ 1 for d in digests] if r[2] else None
            await transport.send_frame(link, 1, planned.header, planned.sources, given)
        return seen
    buffers = ReceiveBuffers()
    asked: list[int] = []

    async def buffer(n: int) -> torch.Tensor:
        asked.append(n)
        return await buffers.get(n, "receiving")

    for r in ROUNDS:
        limits = limits_of(64 << 20)
        try:
            got = await transport.recv_frame(link, 0, buffer, limits=limits, check=True)
        except ReplicationError as exc:
            seen.append({"phase": exc.phase, "peer": exc.peer})
            buffers.clear()
            continue
        if got is None:
            seen.append(None)
            continue
        header, data, digests = got
        planned = plan_cpu_frame(_state(r[0], r[1]))  # type: ignore[index]
        seen.append(
            {
                "names": [e.name for e in header.entries],
                "want_names": [e.name for e in planned.header.entries],
                "same": torch.equal(data, _region(planned.sources)),
                "digests": list(digests) == source_digests(planned.sources),
            }
        )
        buffers.drop(data, "receiving")
    return [seen, asked]


@pytest.mark.timeout(90)
def test_repeated_layouts_land_in_step_with_every_other_frame() -> None:
    _, (seen, asked) = run_world(_repeat, 2, timeout=60.0)
    assert len(seen) == len(ROUNDS)
    for i, (r, got) in enumerate(zip(ROUNDS, seen, strict=True)):
        if r is None:
            assert got is None, f"round {i}: send_nothing came back as {got}"
        elif r[2]:
            assert got == {"phase": "verify", "peer": 0}, f"round {i}: {got}"
        else:
            assert got["names"] == got["want_names"], f"round {i}: {got['names']}"
            assert got["same"], f"round {i}: the bytes that landed differ from those sent"
            assert got["digests"], f"round {i}: not the sender's digests"
    # one buffer per frame that carried data (the refused one landed before its check)
    assert len(asked) == sum(r is not None for r in ROUNDS), asked
