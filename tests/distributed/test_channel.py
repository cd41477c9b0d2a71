"""The weight channel (WeightPublisher / WeightSubscriber) in real gloo worlds of spawned ranks."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from subprocess import PIPE
from typing import Any

import _channel_end_workers as ends
import _channel_workers as workers
import pytest
from torch._C._distributed_c10d import TCPStore  # torch.distributed.TCPStore, typed

from aiostage._channel import notes as wire
from aiostage.testing import WorldError, run_world

pytestmark = [pytest.mark.distributed]

WORLD_TIMEOUT = 60.0


def assert_served(served: dict[str, Any], who: str) -> None:
    """What ``workers.serve`` returned: no request read weights of several versions."""
    assert served["mixed"] == [], f"{who}: requests read weights of several versions: {served}"


def error_of(report: dict[str, Any], peer: int) -> dict[str, Any]:
    """The error of ``peer``'s delivery in a ``workers.report_seen`` report (it must have one)."""
    error: dict[str, Any] | None = report["deliveries"][peer]["error"]
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
    # through shared memory where asked (a version whose region torch's manager failed to make
    # on a loaded host goes as plain frames: at least the others share memory)
    how = [d["shared_memory"] for r in reports for d in r["deliveries"].values()]
    assert any(how) if shared else not any(how), reports
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
def test_a_late_joiner_stalls_nobody_and_gets_the_latest_version() -> None:
    pub, early, late = run_world(workers.late_joiner, 3, timeout=WORLD_TIMEOUT)
    reports = pub["reports"]
    assert pub["early"] == [1], pub  # wait_for_subscribers(1): rank 1 only
    assert pub["states"] == {1: "live", 2: "absent"}, pub
    # the publisher's timeout is 20 s: versions 1..3 did not wait for the absent rank 2
    assert pub["seconds"] < 10, f"versions 1..3 took {pub['seconds']:.1f} s: they waited"
    for r in reports[:3]:
        assert r["delivered"] == [1], r
        assert r["deliveries"][2] == {"status": "absent", "shared_memory": False, "error": None}
    assert pub["everyone"] == [1, 2], pub  # wait_for_subscribers() once rank 2 subscribed
    assert reports[3]["delivered"] == [1, 2], reports[3]
    assert [e["type"] for e in pub["bad_n"]] == ["ValueError"] * 2, pub["bad_n"]
    assert "between 0 and 2" in pub["bad_n"][0]["message"], pub["bad_n"]
    assert pub["unentered"]["type"] == "UsageError", pub["unentered"]
    assert pub["closed"]["type"] == "ClosedError", pub["closed"]
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


BY_HAND = [sys.executable, str(Path(__file__).with_name("_channel_end_workers.py"))]


@contextlib.contextmanager
def by_hand(
    size: int, name: str, *args: str, prefix: dict[int, list[str]] | None = None
) -> Iterator[list[subprocess.Popen[str]]]:
    """Start the ``size`` ranks of a world as scripts (``_channel_end_workers.by_hand``), each
    running the rank function ``name`` (rank ``r`` behind the command ``prefix[r]``), joined
    through a store this process hosts; SIGKILL (stopped ones too) and reap them on the way out."""
    span = timedelta(seconds=WORLD_TIMEOUT)
    store = TCPStore("127.0.0.1", 0, None, True, span, wait_for_workers=False)
    where = [str(size), str(store.port), name, *args]
    with contextlib.ExitStack() as stack:
        procs = []
        for r in range(size):
            command = [*(prefix or {}).get(r, []), *BY_HAND, str(r), *where]
            proc = subprocess.Popen(command, stdout=PIPE, stderr=PIPE, text=True)
            stack.enter_context(proc)  # closes its pipes and reaps it
            stack.callback(proc.kill)  # runs first: nothing is left waiting for a stopped rank
            procs.append(proc)
        yield procs


def printed(proc: subprocess.Popen[str], out: str, err: str) -> dict[str, Any]:
    """What a ``by_hand`` rank printed (``{"result", "lingering"}``); it must have exited 0."""
    assert proc.returncode == 0, f"exit status {proc.returncode}:\n{err[-3000:]}"
    seen: dict[str, Any] = json.loads(out.splitlines()[-1])
    return seen


PRIVATE_SHM = [
    *("unshare", "-m", "--propagation", "private", "sh", "-c"),
    'mount -t tmpfs tmpfs /dev/shm && exec "$0" "$@"',
]


@pytest.mark.timeout(90)
def test_a_subscriber_that_cannot_map_the_shared_memory_gets_frames_instead() -> None:
    if subprocess.run([*PRIVATE_SHM, "true"], capture_output=True, check=False).returncode:
        pytest.skip("a private /dev/shm needs root (unshare -m, mount)")
    with by_hand(3, "shared_memory_fallback", prefix={2: PRIVATE_SHM}) as procs:
        outs = [p.communicate(timeout=WORLD_TIMEOUT) for p in procs]
    pub, *subs = (printed(p, *o)["result"] for p, o in zip(procs, outs, strict=True))
    assert pub["delivered"] == [[1, 2], [1, 2]], pub
    assert pub["shared"] == [[True, False], [True, False]], pub  # rank 2 fell back to gloo
    for rank, sub in enumerate(subs, 1):
        assert_served(sub["served"], f"rank {rank}")
        assert sub["closing"] < 10, f"closing rank {rank}'s subscriber waited for the timeout"
        assert sub["version"] == [2.0], sub


@pytest.mark.timeout(90)
def test_a_version_without_shared_memory_goes_as_plain_frames() -> None:
    """torch's shared-memory manager failing for one region costs that version its fast
    path, not the publish: it is delivered over gloo, and the next one shares memory again."""
    pub, sub = run_world(workers.shared_memory_unavailable, 2, timeout=WORLD_TIMEOUT)
    assert pub["delivered"] == [[1], [1], [1]], pub
    assert pub["shared"] == [True, False, True], pub
    assert_served(sub["served"], "rank 1")
    assert sub["served"]["versions"][-1] == 3, sub
    assert sub["version"] == [3.0], sub


@pytest.mark.timeout(90)
def test_nothing_outlives_a_subscriber_or_a_stager() -> None:
    """A WeightSubscriber and a ReplicationStager that really exchanges leave no task, no
    thread and no busy worker behind once closed (in-process objects: tests/test_ownership.py)."""
    pub, sub = run_world(workers.nothing_outlives_close, 2, timeout=WORLD_TIMEOUT)
    assert sub["received"] in ([1.0, 2.0], [2.0]), sub  # an older version may be skipped
    assert pub["left"] == [], f"rank 0 (publisher, stager) left running: {pub['left']}"
    assert sub["left"] == [], f"rank 1 (subscriber, stager) left running: {sub['left']}"


@pytest.mark.timeout(90)
def test_a_version_is_handed_out_once_and_both_styles_see_the_end() -> None:
    pub, waiting, polling = run_world(ends.delivered_once_and_ended, 3, timeout=WORLD_TIMEOUT)
    assert pub["delivered"] == [[1, 2]] * 5, pub
    assert (waiting["wait_for"], waiting["applied"], waiting["ended_before"]) == (4, 4, False)
    assert waiting["yielded"] == [5], "iteration handed out again what wait_for had returned"
    assert polling["before"]["versions"][-1] == 4.0, polling
    assert polling["after"]["versions"][-1] == 5.0, polling  # polled until sub.ended
    assert_served(polling["before"], "rank 2")
    assert_served(polling["after"], "rank 2")
    assert polling["yielded"] == [], "iteration handed out again what apply had installed"
    for seen in (waiting, polling):
        assert (seen["ended"], seen["error"], seen["version"]) == (True, None, 5), seen


@pytest.mark.timeout(90)
def test_a_polling_subscriber_sees_a_broken_stream_end(tmp_path: Path) -> None:
    with pytest.raises(WorldError) as caught:
        run_world(ends.publisher_killed_mid_frame, 2, str(tmp_path), timeout=WORLD_TIMEOUT)
    assert caught.value.ranks == (0,), caught.value  # rank 1 raised nothing
    seen = workers.left(str(tmp_path))[1]
    assert (seen["ended"], seen["pending"]) == (True, False), seen
    error = seen["error"]
    assert error is not None, seen
    assert "ReplicationError" in error["classes"], error
    assert error["peer"] == 0, error
    assert seen["iterating"]["message"] == error["message"], seen  # the same error
    assert seen["wait_for"]["message"] == error["message"], seen


@pytest.mark.timeout(90)
def test_the_channel_page_blocks_run_as_written() -> None:
    trainer, *servers = run_world(ends.doc_blocks, 3, timeout=WORLD_TIMEOUT)
    assert trainer == {"version": 4, "delivered": [1, 2]}, trainer
    for rank, seen in enumerate(servers, 1):
        assert (seen["version"], seen["ended"], seen["error"]) == (4, True, None), seen
        assert seen["last"] == [5.0], f"rank {rank}'s last request did not read version 4"
        assert seen["mixed"] == [], f"rank {rank}: requests read several versions: {seen}"


def process_state(pid: int) -> str:
    """The state letter of process ``pid`` (``T``: stopped), from /proc."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rpartition(")")[2].split()[0]


@pytest.mark.timeout(90)
def test_a_trainer_exits_while_its_subscriber_is_frozen(tmp_path: Path) -> None:
    """Nothing a closed publisher leaves keeps its process alive: not the wait of a send to a
    subscriber frozen (SIGSTOP) mid-frame, which gloo cannot withdraw."""
    with by_hand(2, "frozen_at_exit", str(tmp_path)) as (trainer, frozen):
        try:
            out, err = trainer.communicate(timeout=45)
        except subprocess.TimeoutExpired:
            pytest.fail("the trainer did not exit within 45 s while its subscriber was frozen")
        state = process_state(frozen.pid)
    seen = printed(trainer, out, err)
    assert state == "T", f"the subscriber was not stopped when the trainer exited ({state})"
    assert workers.left(str(tmp_path))[1]["kind"] == wire.OFFER, "no frame was under way"
    assert seen["lingering"] == [], f"threads that keep the process alive: {seen['lingering']}"
    delivery = seen["result"]["report"]["deliveries"]["1"]
    assert delivery["status"] == "dropped", delivery
    assert "ReplicationTimeout" in delivery["error"]["classes"], delivery
    assert delivery["error"]["phase"] == "send", delivery
    assert seen["result"]["closing"] < 5, seen["result"]
