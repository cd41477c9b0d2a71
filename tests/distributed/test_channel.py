"""The weight channel (WeightPublisher / WeightSubscriber) in real gloo worlds of spawned ranks."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import _channel_workers as workers
import pytest

from aiostage._channel import notes as wire
from aiostage.testing import WorldError, run_world

pytestmark = [pytest.mark.distributed]

WORLD_TIMEOUT = 60.0


def assert_served(served: dict[str, Any], who: str) -> None:
    """What ``workers.serve`` returned: no request read weights of several versions."""
    assert served["mixed"] == [], f"{who}: requests read weights of several versions: {served}"


def error_of(report: dict[str, Any], peer: int) -> dict[str, Any]:
    """The error of ``peer``'s delivery in a ``workers.report_seen`` report (it must have one)."""
    error = report["deliveries"][peer]["error"]
    assert error is not None, f"no error for subscriber {peer}: {report}"
    return error


def left_by_all(out: Path, caught: WorldError) -> dict[int, dict[str, Any]]:
    """What the three ranks left in ``out`` (``workers.leave``): every rank must have."""
    seen = workers.left(str(out))
    assert sorted(seen) == [0, 1, 2], f"only ranks {sorted(seen)} reported; the world:\n{caught}"
    assert seen[2]["kind"] == wire.OFFER, f"rank 2 was answered {seen[2]['note']}, not an offer"
    return seen


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("shared", "swap"),
    [(False, False), (True, False), (False, True)],
    ids=["gloo", "shared-memory", "gloo-swap"],
)
def test_five_versions_while_two_subscribers_keep_serving(shared: bool, swap: bool) -> None:
    pub, *subs = run_world(workers.publish_five, 3, 256, shared, swap, timeout=WORLD_TIMEOUT)
    reports = pub["reports"]
    assert len(reports) == 5, pub
    assert pub["done"] == [True] * 5, f"publications not done once their report came: {pub}"
    assert pub["each"] == [None] * 5, "the deliveries awaited one by one differ from the report"
    again = pub["again"]
    assert again is not None, "submitting version 5 again raised nothing"
    assert re.search("does not increase", again["message"]), again
    for r in reports:
        assert not r["dropped"], r
        assert {d["status"] for d in r["deliveries"].values()} <= {"delivered", "superseded"}, r
    last = reports[-1]
    assert last["delivered"] == pub["subscribers"], last
    assert all(d["shared_memory"] == shared for d in last["deliveries"].values()), last
    for rank, sub in enumerate(subs, 1):
        served = sub["served"]
        assert_served(served, f"rank {rank}")
        assert sub["received"] == 5, sub
        versions = served["versions"]
        assert versions == sorted(versions), f"rank {rank} served versions that go back: {sub}"
        applied = sorted(set(versions) - {0.0})
        assert sub["skipped"] + len(applied) == 5, (sub["skipped"], applied)
        assert applied[-1:] == [5.0], sub
        assert served["requests"] >= len(applied), sub


@pytest.mark.timeout(90)
def test_a_subscriber_killed_mid_transfer_is_dropped_and_the_other_keeps_going(
    tmp_path: Path,
) -> None:
    with pytest.raises(WorldError) as caught:
        run_world(workers.killed_mid_transfer, 3, str(tmp_path), timeout=WORLD_TIMEOUT)
    seen = left_by_all(tmp_path, caught.value)
    assert caught.value.ranks == (2,), caught.value  # ranks 0 and 1 raised nothing
    assert caught.value.failures[0].signal == "SIGKILL", caught.value
    assert_served(seen[1]["served"], "rank 1")
    first, second = seen[0]["first"], seen[0]["second"]
    assert first["delivered"] == [1], first
    error = error_of(first, 2)
    assert "ReplicationError" in error["classes"], error
    assert "ReplicationTimeout" not in error["classes"], error
    assert error["peer"] == 2, error
    seconds = seen[0]["seconds"]
    assert seconds < 10, f"the publisher took {seconds:.1f} s to drop the dead subscriber"
    assert second["delivered"] == [1], second
    assert second["deliveries"][2]["status"] == "dropped", second
    assert seen[0]["states"][2] == "dropped", seen[0]["states"]


@pytest.mark.timeout(90)
def test_a_late_joiner_gets_the_latest_version() -> None:
    pub, early, late = run_world(workers.late_joiner, 3, timeout=WORLD_TIMEOUT)
    reports = pub["reports"]
    first = reports[0]["deliveries"][2]
    assert first["status"] == "dropped", first
    assert "ReplicationTimeout" in error_of(reports[0], 2)["classes"], first
    assert first["error"]["phase"] == "ready", first["error"]
    assert [r["deliveries"][2]["status"] for r in reports[1:3]] == ["dropped"] * 2, reports
    assert reports[3]["delivered"] == [1, 2], reports[3]
    assert_served(early["served"], "rank 1")
    assert (late["first"], late["applied"], late["request"]) == (3, 3, [3.0]), late
    assert_served(late["served"], "rank 2")
    assert late["skipped"] == 2, late


@pytest.mark.timeout(90)
def test_a_closed_subscriber_rejoins_and_a_wrong_target_is_refused() -> None:
    pub, sub = run_world(workers.close_and_rejoin, 2, timeout=WORLD_TIMEOUT)
    assert pub["first"]["delivered"] == [1], pub["first"]
    assert pub["second"]["deliveries"][1]["status"] == "closed", pub["second"]
    assert sub["first"] == 1, sub
    mismatch = sub["mismatch"]
    assert mismatch is not None, "applying version 2 to a target of another shape raised nothing"
    assert mismatch["problems"], mismatch
    assert "published" in mismatch["problems"][0], mismatch
    assert "target" in mismatch["problems"][0], mismatch
    assert (sub["rejoined"], sub["request"]) == (2, [2.0]), sub


@pytest.mark.timeout(90)
def test_a_subscriber_frozen_mid_transfer_times_out_and_the_other_keeps_going(
    tmp_path: Path,
) -> None:
    with pytest.raises(WorldError) as caught:
        run_world(workers.frozen_mid_transfer, 3, str(tmp_path), timeout=WORLD_TIMEOUT)
    seen = left_by_all(tmp_path, caught.value)
    assert caught.value.ranks == (2,), caught.value  # killed by rank 0 after the transfers
    assert caught.value.failures[0].signal == "SIGKILL", caught.value
    assert_served(seen[1]["served"], "rank 1")
    first, second = seen[0]["first"], seen[0]["second"]
    error = error_of(first, 2)
    assert "ReplicationTimeout" in error["classes"], first
    assert (error["peer"], error["phase"]) == (2, "send"), error
    assert first["delivered"] == [1], first
    seconds, bound = seen[0]["seconds"], workers.FROZEN_TIMEOUT + 2
    assert seconds < bound, f"the publisher took {seconds:.1f} s to drop the frozen rank"
    assert second["delivered"] == [1], second
    assert second["deliveries"][2]["status"] == "dropped", second


@pytest.mark.timeout(90)
def test_the_channel_and_replication_share_two_ranks_without_mixing_frames() -> None:
    pub, sub = run_world(workers.beside_replication, 2, timeout=WORLD_TIMEOUT)
    assert pub["steps"] == [1] * 5, pub  # each replica is the partner's
    assert sub["steps"] == [0] * 5, sub
    assert pub["replicas"] == [1.0] * 5, pub
    assert sub["replicas"] == [0.0] * 5, sub
    assert pub["delivered"] == [[1]] * 3, pub
    assert sub["served"]["requests"] > 0, sub
    assert_served(sub["served"], "rank 1")
    assert sub["request"] == [3.0], sub


#: one rank of a 3-rank world, started by hand so rank 2 can get a /dev/shm of its own first
LAUNCH = """
import json, sys, anyio, torch.distributed as dist
sys.path.insert(0, sys.argv[3])
import _channel_workers as workers
rank = int(sys.argv[1])
dist.init_process_group(
    "gloo", init_method=f"tcp://127.0.0.1:{sys.argv[2]}", rank=rank, world_size=3
)
print(json.dumps(anyio.run(workers.shared_memory_fallback, rank, 3)))
dist.destroy_process_group()
"""
PRIVATE_SHM = [
    *("unshare", "-m", "--propagation", "private", "sh", "-c"),
    'mount -t tmpfs tmpfs /dev/shm && exec "$0" "$@"',
]


@pytest.mark.timeout(90)
def test_a_subscriber_that_cannot_map_the_shared_memory_gets_frames_instead() -> None:
    if subprocess.run([*PRIVATE_SHM, "true"], capture_output=True, check=False).returncode:
        pytest.skip("a private /dev/shm needs root (unshare -m, mount)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    here = str(Path(__file__).parent)
    procs = [
        subprocess.Popen(
            [
                *(PRIVATE_SHM if r == 2 else []),
                sys.executable,
                "-c",
                LAUNCH,
                str(r),
                str(port),
                here,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(3)
    ]
    try:
        outs = [p.communicate(timeout=WORLD_TIMEOUT) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outs]
    pub, *subs = (json.loads(out.splitlines()[-1]) for out, _ in outs)
    assert pub["delivered"] == [[1, 2], [1, 2]], pub
    assert pub["shared"] == [[True, False], [True, False]], pub  # rank 2 fell back to gloo
    for rank, sub in enumerate(subs, 1):
        assert_served(sub["served"], f"rank {rank}")
        assert sub["closing"] < 10, f"closing rank {rank}'s subscriber waited for the timeout"
        assert sub["version"] == [2.0], sub


@pytest.mark.timeout(90)
def test_nothing_outlives_a_subscriber_or_a_stager() -> None:
    """A WeightSubscriber and a ReplicationStager that really exchanges leave no task, no
    thread and no busy worker behind once closed (in-process objects: tests/test_ownership.py)."""
    pub, sub = run_world(workers.nothing_outlives_close, 2, timeout=WORLD_TIMEOUT)
    assert sub["received"] in ([1.0, 2.0], [2.0]), sub  # an older version may be skipped
    assert pub["left"] == [], f"rank 0 (publisher, stager) left running: {pub['left']}"
    assert sub["left"] == [], f"rank 1 (subscriber, stager) left running: {sub['left']}"
