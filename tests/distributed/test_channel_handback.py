"""``WeightPublisher.publish`` in real gloo worlds, once the caller has its tensors back and
changes them: a subscriber still gets the version as published (the one on the wire when
``publish`` was cancelled, and one that asks only afterwards), and nothing holds those tensors."""

from __future__ import annotations

import _channel_handback_workers as workers
import pytest

from aiostage._channel import notes as wire
from aiostage.testing import run_world

pytestmark = [pytest.mark.distributed]


@pytest.mark.timeout(90)
def test_a_publish_cancelled_midway_lets_go_of_the_callers_tensors() -> None:
    pub, slow = run_world(workers.cancelled_midway, 2, timeout=60)
    assert pub["cancelled"], pub
    assert not pub["held"], "something still holds the caller's tensor after publish returned"
    assert slow["offered"] == wire.OFFER, slow
    assert slow["values"] == [1.0], f"the frame on the wire changed with the caller's: {slow}"
    assert slow["end"] == wire.CLOSED, slow


@pytest.mark.timeout(90)
def test_a_subscriber_that_asks_after_publish_returned_gets_the_version_published() -> None:
    pub, late = run_world(workers.late_after_scribble, 2, timeout=60)
    assert pub["statuses"] == {1: "absent"}, pub
    assert late["got"] == 1, late
    assert late["values"] == [1.0], f"the late subscriber read the caller's changes: {late}"
