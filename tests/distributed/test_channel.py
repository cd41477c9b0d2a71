"""The weight channel (WeightPublisher / WeightSubscriber) in real gloo worlds of spawned ranks."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

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
    assert subs == [{"version": 2.0}] * 2, subs
