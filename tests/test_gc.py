"""The collector pause: nested and concurrent pauses share one, and it restores the old state."""

from __future__ import annotations

import gc
import threading

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
