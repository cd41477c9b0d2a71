"""A ``WeightSubscriber``'s reading sections in a real gloo world: a section sees one version
while newer ones land and an ``apply`` is due, and its buffer is not landed in meanwhile."""

from __future__ import annotations

import _channel_reading_workers as workers
import pytest

from aiostage.testing import run_world

pytestmark = [pytest.mark.distributed]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("swap", [True, False], ids=["swap", "copy"])
def test_a_reading_section_keeps_its_version_while_newer_ones_land(swap: bool) -> None:
    _, seen = run_world(workers.section_held_across_landings, 2, swap, timeout=60)
    assert seen["given"] == 1, seen
    assert seen["start"] == [1.0], seen
    assert seen["end"] == [1.0], f"the section's weights changed while it was open: {seen}"
    assert seen["installed_meanwhile"] == 1, seen
    assert seen["after"] == [float(workers.LAST)], seen
