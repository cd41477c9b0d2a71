"""The collector pause: nested and concurrent pauses share one, and it restores the old state."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest

from aiostage._core import gc_pause


def test_pause_nests_and_restores() -> None:
    assert gc.isenabled()
    with gc_pause.paused():
        assert not gc.isenabled()
        with gc_pause.paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off() -> None:
    gc.disable()
    try:
        with gc_pause.paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_concurrent_pauses_end_with_the_last_one() -> None:
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
    assert not gc.isenabled()  # the other thread's pause is still on
    leave.set()
    t.join(10)
    assert gc.isenabled()


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


class _Clock:
    """``gc_pause``'s clock, moved by hand: the cap is tested without waiting for it."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_pause_runs_out_after_max_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(gc_pause, "_now", clock)
    with gc_pause.paused():
        clock.t += gc_pause.MAX_PAUSE - 0.001
        gc_pause.hand_over()
        with gc_pause.paused():
            pass
        assert not gc.isenabled()  # not yet
        clock.t += 0.001
        gc_pause.hand_over()  # a worker's next hand-over ends it
        assert gc.isenabled()  # collection is back on inside the pause
        with gc_pause.paused():  # a nested pause does not turn it off again
            assert gc.isenabled()
        assert gc.isenabled()
    assert gc.isenabled()
    with gc_pause.paused():  # the next pause is a pause again, timed from its own start
        assert not gc.isenabled()
        clock.t += gc_pause.MAX_PAUSE / 2
        gc_pause.hand_over()
        assert not gc.isenabled()
    assert gc.isenabled()


@pytest.mark.parametrize("where", ["nested start", "nested end"])
def test_back_to_back_nested_pauses_run_out_too(
    monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """Overlapping saves keep the outermost pause open: each nested one's start or end is a check."""
    clock = _Clock()
    monkeypatch.setattr(gc_pause, "_now", clock)
    with gc_pause.paused():
        if where == "nested start":
            clock.t += gc_pause.MAX_PAUSE
            with gc_pause.paused():
                assert gc.isenabled()
        else:
            with gc_pause.paused():
                clock.t += gc_pause.MAX_PAUSE
                assert not gc.isenabled()
            assert gc.isenabled()
    assert gc.isenabled()


def test_a_pause_starts_no_thread() -> None:
    """Nothing of a pause outlives it (a timer thread per pause did, for a moment)."""
    before = set(threading.enumerate())
    with gc_pause.paused():
        assert not gc.isenabled()
        assert set(threading.enumerate()) == before
    assert set(threading.enumerate()) == before
    assert gc.isenabled()
