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


def test_a_pause_runs_out_after_max_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gc_pause, "MAX_PAUSE", 0.05)
    ran_out = threading.Event()
    original = gc_pause._run_out

    def run_out() -> None:
        original()
        ran_out.set()

    monkeypatch.setattr(gc_pause, "_run_out", run_out)
    with gc_pause.paused():
        assert not gc.isenabled()
        assert ran_out.wait(10)
        assert gc.isenabled()  # collection is back on inside the pause
        with gc_pause.paused():  # a nested pause does not turn it off again
            assert gc.isenabled()
        assert gc.isenabled()
    assert gc.isenabled()
    with gc_pause.paused():  # the next pause is a pause again
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_pause_that_ends_in_time_cancels_its_timer() -> None:
    with gc_pause.paused():
        timer = gc_pause._timer
        assert timer is not None
        assert timer.is_alive()
    timer.join(10)
    assert not timer.is_alive()
    assert gc_pause._timer is None
    assert gc.isenabled()
