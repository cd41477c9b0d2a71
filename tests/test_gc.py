"""The collector pause: nested and concurrent pauses share one, and it restores the old state."""

from __future__ import annotations

import gc
import threading
import weakref

from aiostage._core import gc_pause


def _full_collections_deferred() -> bool:
    return gc.get_threshold()[2] >= 1 << 30


def test_pause_nests_and_restores() -> None:
    before = gc.get_threshold()
    with gc_pause.paused():
        assert gc.isenabled()  # young collections go on
        assert _full_collections_deferred()
        with gc_pause.paused():
            assert _full_collections_deferred()
        assert _full_collections_deferred()
    assert gc.get_threshold() == before


def test_a_collector_that_was_off_stays_off() -> None:
    gc.disable()
    try:
        with gc_pause.paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_concurrent_pauses_end_with_the_last_one() -> None:
    before = gc.get_threshold()
    inside, leave = threading.Event(), threading.Event()

    def other() -> None:
        with gc_pause.paused():
            inside.set()
            leave.wait(10)

    t = threading.Thread(target=other)
    t.start()
    inside.wait(10)
    with gc_pause.paused():
        pass
    assert _full_collections_deferred()  # the other thread's pause is still on
    leave.set()
    t.join(10)
    assert gc.get_threshold() == before


def _young() -> int:
    return len(gc.get_objects(generation=0)) + len(gc.get_objects(generation=1))


def test_a_worker_that_builds_while_freeing_leaves_the_young_generations_small() -> None:
    """Built objects reach the old generation in small passes, not one pass the size of all of
    them after the pause (tens of milliseconds holding the GIL at tens of thousands of tensors).
    Freeing old objects while building keeps the allocation count low, so the automatic young
    collections alone would not run: the hand-overs collect."""
    old = [[i] for i in range(50_000)]
    gc.collect()  # ``old`` is in the oldest generation
    built: list[object] = []
    young_seen: list[int] = []

    def work() -> None:
        with gc_pause.paused():
            for i in range(50_000):
                old.pop()  # a free for each allocation
                built.append([i])
                if i % 1000 == 999:
                    gc_pause.hand_over()
                    young_seen.append(_young())

    t = threading.Thread(target=work)
    t.start()
    t.join(60)
    assert len(built) == 50_000 and not old
    assert max(young_seen) < 5_000, max(young_seen)  # without the collections: 1000, 2000, ...
    assert _young() < 5_000  # and nothing big left for the loop's next allocation


class _Leaf:
    """An object whose death is seen through a weak reference."""


def test_dismantle_frees_big_containers_it_owns_and_leaves_shared_ones_whole() -> None:
    leaves = [_Leaf() for _ in range(5000)]
    seen = [weakref.ref(x) for x in leaves]
    shared = list(range(5000))
    doomed = [{"dict": [[str(i), {"x": x}] for i, x in enumerate(leaves)]}, shared]
    del leaves
    assert gc_pause._big(doomed[0], 3)  # a big list inside a small wrapper is taken apart too
    gc_pause.dismantle(doomed)
    assert doomed == []
    assert all(ref() is None for ref in seen)
    assert shared == list(range(5000))  # still referenced here: never mutated
