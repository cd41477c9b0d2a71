"""Host copies in one thread: where torch's copy threads would take every CPU, large spans are
moved in the worker thread alone (``buffers.move_chunks``); both ways give the same copy."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import anyio.to_thread
import pytest
import torch

import aiostage
from aiostage._core.buffers import ONE_THREAD_BYTES, move_chunks, one_thread
from aiostage.testing import assert_state_dict_equal

_BIG = ONE_THREAD_BYTES // 4  # float32 elements of a span copied as bytes in one-thread mode


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@pytest.fixture(params=["one thread", "torch threads"])
def mode(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each way of copying host spans, set through torch's intra-op thread count (restored)."""
    before = torch.get_num_threads()
    if request.param == "one thread":
        torch.set_num_threads(_cpus())
    elif _cpus() > 1:
        torch.set_num_threads(1)
    else:
        pytest.skip("one CPU: host copies always run in one thread")
    try:
        yield request.param
    finally:
        torch.set_num_threads(before)


def large() -> dict[str, Any]:
    """Spans above and below ``ONE_THREAD_BYTES``: whole, aliased, strided, tied, a view that
    starts off the span alignment, a Parameter, and small ones."""
    base = torch.randn(4 * _BIG + 3)
    emb = torch.nn.Parameter(torch.randn(_BIG // 8, 16))
    return {
        "big": torch.randn(3 * _BIG + 5),
        "exact": torch.randn(_BIG),  # exactly the threshold
        "under": torch.randn(_BIG - 1),
        "base": base,
        "late_view": base[7 : 7 + 2 * _BIG].view(2, _BIG),
        "strided": torch.randn(_BIG // 64, 128).t(),
        "emb": emb,
        "tied": emb,
        "small": [torch.randn(5) for _ in range(40)],
        "half": torch.randn(2 * _BIG + 1, dtype=torch.float16),
        "step": 3,
    }


def _bump(sd: dict[str, Any]) -> None:
    with torch.no_grad():
        for key in ("big", "exact", "under", "base", "strided", "emb", "half"):
            sd[key].add_(1)
        for t in sd["small"]:
            t.mul_(2)


async def test_both_ways_of_copying_give_the_same_copy_cold_and_warm(mode: str) -> None:
    assert one_thread() is (mode == "one thread")
    sd = large()
    async with aiostage.DefaultStager(pool_size=1) as stager:
        for _ in range(3):  # cold, then warm with new values in the same tensors
            staged = await stager.stage(sd)
            assert_state_dict_equal(staged, sd, check_aliasing=True)
            assert staged["big"].data_ptr() != sd["big"].data_ptr()
            stager.release(staged)
            _bump(sd)
        recipe = stager._planner.last
        assert recipe is not None
        as_bytes = {k for k, _ in recipe.bytewise}
        big = {k for k, span in enumerate(recipe.spans) if span.nbytes >= ONE_THREAD_BYTES}
        assert len(big) == 6  # big, exact, base, strided, emb, half
        assert (big <= as_bytes) is (mode == "one thread")


async def test_a_later_change_to_the_source_never_reaches_the_copy(mode: str) -> None:
    sd = large()
    async with aiostage.DefaultStager(pool_size=2) as stager:
        stager.release(await stager.stage(sd))
        staged = await stager.stage(sd)
        kept = {k: sd[k].clone() for k in ("big", "base", "half")}
        _bump(sd)
        for k, want in kept.items():
            assert torch.equal(staged[k], want), k
        stager.release(staged)


@pytest.mark.parametrize("chunk", [4096, 4097, 1 << 20])
async def test_move_chunks_copies_every_byte_across_chunk_ends(chunk: int) -> None:
    src = [torch.randint(0, 256, (n,), dtype=torch.uint8) for n in (1, 4095, 4096, 12289, 70000)]
    dst = [torch.zeros_like(s) for s in src]
    moves = [(d.data_ptr(), s.data_ptr(), s.nbytes) for s, d in zip(src, dst, strict=True)]
    await anyio.to_thread.run_sync(move_chunks, moves, chunk)  # it checks for cancellation
    for s, d in zip(src, dst, strict=True):
        assert torch.equal(s, d)


async def test_move_chunks_writes_only_its_range() -> None:
    src = torch.arange(100, dtype=torch.uint8)
    dst = torch.zeros(100, dtype=torch.uint8)
    await anyio.to_thread.run_sync(
        move_chunks, [(dst[10:].data_ptr(), src[20:].data_ptr(), 30)], 4096
    )
    assert torch.equal(dst[10:40], src[20:50])
    assert not dst[:10].any()
    assert not dst[40:].any()
