"""The weight channel (WeightPublisher / WeightSubscriber) in real gloo worlds of spawned ranks."""

from __future__ import annotations

import _channel_workers as workers
import pytest

from aiostage.testing import WorldError, run_world

pytestmark = [pytest.mark.distributed]

WORLD_TIMEOUT = 60.0


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("shared", "swap"),
    [(False, False), (True, False), (False, True)],
    ids=["gloo", "shared-memory", "gloo-swap"],
)
def test_five_versions_while_two_subscribers_keep_serving(shared: bool, swap: bool) -> None:
    pub, *subs = run_world(workers.publish_five, 3, 256, shared, swap, timeout=WORLD_TIMEOUT)
    assert len(pub["statuses"]) == 5
    for sub in subs:
        assert sub["applied"][-1] == 5.0, sub
        assert sub["requests"] >= len(sub["applied"]), sub


@pytest.mark.timeout(90)
def test_a_subscriber_killed_mid_transfer_is_dropped_and_the_other_keeps_going() -> None:
    with pytest.raises(WorldError) as caught:
        run_world(workers.killed_mid_transfer, 3, timeout=WORLD_TIMEOUT)
    assert caught.value.ranks == (2,), caught.value  # ranks 0 and 1 raised nothing
    assert caught.value.failures[0].signal == "SIGKILL"


@pytest.mark.timeout(90)
def test_a_late_joiner_gets_the_latest_version() -> None:
    _, _, late = run_world(workers.late_joiner, 3, timeout=WORLD_TIMEOUT)
    assert late == {"skipped": 2, "first": 3}, late


@pytest.mark.timeout(90)
def test_a_closed_subscriber_rejoins_and_a_wrong_target_is_refused() -> None:
    _, sub = run_world(workers.close_and_rejoin, 2, timeout=WORLD_TIMEOUT)
    assert "published" in sub["mismatch"], sub
    assert "target" in sub["mismatch"], sub


@pytest.mark.timeout(90)
def test_a_subscriber_frozen_mid_transfer_times_out_and_the_other_keeps_going() -> None:
    with pytest.raises(WorldError) as caught:
        run_world(workers.frozen_mid_transfer, 3, timeout=WORLD_TIMEOUT)
    assert caught.value.ranks == (2,), caught.value  # killed by rank 0 after the checks
    assert caught.value.failures[0].signal == "SIGKILL"


@pytest.mark.timeout(90)
def test_the_channel_and_replication_share_two_ranks_without_mixing_frames() -> None:
    pub, sub = run_world(workers.beside_replication, 2, timeout=WORLD_TIMEOUT)
    assert pub["replicas"] == [1.0] * 5, pub
    assert sub["replicas"] == [0.0] * 5, sub
