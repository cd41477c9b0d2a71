"""ReplicationStager in real gloo worlds of spawned ranks on 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import _replication_workers as workers
import pytest
import torch
from torch.distributed.tensor import Replicate, Shard

from aiostage.testing import WorldError, run_world

pytestmark = [pytest.mark.distributed]

WORLD_TIMEOUT = 60.0


def _assert_raised(where: str, seen: dict[str, Any], expected: str, *, phase: str = "") -> None:
    """``seen`` (``_seen.raised`` in the worker) is an ``expected`` (a class name in its MRO)."""
    assert expected in seen["classes"], f"{where}: wanted {expected}, got {seen['type']}: {seen}"
    if phase:
        assert seen["phase"] == phase, f"{where}: phase {seen['phase']!r}, not {phase!r}: {seen}"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_round_trip_persist_and_reuse(world: int, tmp_path: Path) -> None:
    results = run_world(workers.roundtrip, world, str(tmp_path), timeout=WORLD_TIMEOUT)
    for rank, r in enumerate(results):
        if world % 2 == 0:
            assert r["send_to"] == r["from"] == (rank + world // 2) % world
        else:
            assert (r["send_to"], r["from"]) == ((rank + 1) % world, (rank - 1) % world)
        assert len(r["rounds"]) == 4, r
        for i, round_ in enumerate(r["rounds"]):
            diff, lost = round_["vs_partner"], round_["aliases_lost"]
            assert diff is None, f"rank {rank}, round {i}: the replica differs: {diff}"
            assert lost == [], f"rank {rank}, round {i}: aliases of 'w' lost: {lost}"
        assert r["on_disk"] is None, f"rank {rank}: the persisted replica differs: {r['on_disk']}"
        assert r["allocations"] == 2, r  # two receive buffers, then reuse
        assert r["reused"], r
        assert ("subgroup" in r) == (world == 4), r
        if world == 4:
            diff = r["subgroup"]
            assert diff is None, f"rank {rank}: the subgroup replica differs: {diff}"
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"replica_of_rank_{r:05d}" for r in range(world)]


@pytest.mark.timeout(90)
def test_without_storage_and_4096_tiny_tensors() -> None:
    results = run_world(workers.no_storage_and_tiny, 2, timeout=WORLD_TIMEOUT)
    for rank, r in enumerate(results):
        assert r["replica"] is None, f"rank {rank}: the replica differs: {r['replica']}"
        diff = r["unverified"]
        assert diff is None, f"rank {rank}: the verify=False replica differs: {diff}"
        want = (1 - rank) * 10_000 + 4095
        assert r["t4095"] == [want] * 3, f"rank {rank}: 't4095' per round {r['t4095']}, not {want}"
    rank0, rank1 = results
    diff = rank0["mixed"]
    assert diff is None, f"rank 0: the replica checked on arrival differs: {diff}"
    # rank 1 checks on arrival, but rank 0 (verify=False) sent zero digests
    error = rank1["mixed_error"]
    _assert_raised("rank 1", error, "ReplicationError", phase="verify")
    assert "verify=False" in error["message"], error
    # 4096 tensors travel packed in a few messages, not one message (and one wait) each
    for rank, r in enumerate(results):
        assert max(r["sends"]) <= 8, f"rank {rank}: messages sent per round {r['sends']}"


@pytest.mark.timeout(90)
def test_dtensors_and_sharded_tensors_hold_the_partners_shards() -> None:
    results = run_world(workers.dtensors_and_sharded, 2, timeout=WORLD_TIMEOUT)
    full = torch.arange(48.0).reshape(8, 6)
    for rank, r in enumerate(results):
        peer = 1 - rank
        for key, placements, want in [
            ("sharded", (Shard(0),), full[4 * peer : 4 * peer + 4]),
            ("replicated", (Replicate(),), full * 2),
        ]:
            d = r[key]
            assert d["is_dtensor"], f"rank {rank}: {key!r} arrived as {d['type']}"
            assert d["placements"] == str(placements), f"rank {rank}, {key!r}: {d['placements']}"
            got = d["local"]
            assert torch.equal(got, want), f"rank {rank}, {key!r}: holds\n{got}\nnot\n{want}"
        st = r["st"]
        assert st["is_sharded_tensor"], f"rank {rank}: 'st' arrived as {st['type']}"
        assert st["shards"] == 1, f"rank {rank}: 'st' has {st['shards']} local shards"
        want = torch.full((4, 4), float(peer))
        assert torch.equal(st["local"], want), f"rank {rank}: 'st' holds\n{st['local']}"
        assert st["offsets"] == [4 * peer, 0], f"rank {rank}: 'st' offsets {st['offsets']}"


@pytest.mark.timeout(90)
def test_a_partner_killed_mid_exchange_fails_the_survivor_fast(tmp_path: Path) -> None:
    report = tmp_path / "rank0.json"
    with pytest.raises(WorldError) as caught:
        run_world(workers.peer_dies, 2, str(report), timeout=WORLD_TIMEOUT)
    assert caught.value.ranks == (1,), caught.value  # rank 0 raised nothing unexpected
    assert caught.value.failures[0].signal == "SIGKILL"
    assert report.exists(), f"rank 0 wrote no report (killed while waiting?): {caught.value}"
    seen = json.loads(report.read_text())
    _assert_raised("rank 0", seen, "ReplicationError")
    assert "ReplicationTimeout" not in seen["classes"], f"rank 0 timed out instead: {seen}"
    assert seen["peer"] == 1, seen
    assert seen["seconds"] < 10, f"the survivor took {seen['seconds']:.1f} s to notice: {seen}"


@pytest.mark.timeout(90)
def test_a_partner_that_never_calls_times_out_and_breaks_the_stager() -> None:
    rank0, _ = run_world(workers.never_calls, 2, timeout=WORLD_TIMEOUT)
    timeout = rank0["timeout"]
    _assert_raised("the first stage", timeout, "ReplicationTimeout")
    assert timeout["peer"] == 1, timeout
    assert 1.5 <= rank0["seconds"] < 1.5 + 2.0, rank0
    again = rank0["again"]
    _assert_raised("the stage after the timeout", again, "ReplicationError")
    assert "recreate the group" in again["message"], again


@pytest.mark.timeout(90)
def test_malformed_metadata_is_refused_before_allocation_and_never_unpickled() -> None:
    rank0, _ = run_world(workers.malformed, 2, timeout=WORLD_TIMEOUT)
    errors = rank0["errors"]
    assert len(errors) == 3, errors
    assert rank0["allocations"] == [], f"buffers allocated for malformed frames: {rank0}"
    for i, error in enumerate(errors):
        _assert_raised(f"frame {i}", error, "ReplicationError", phase="header")
        assert error["peer"] == 1, error
    messages = [e["message"] for e in errors]
    assert "not an aiostage frame" in messages[0], messages
    assert "a header of 1099511627776 bytes is more than" in messages[1], messages
    assert "bad header" in messages[2], messages
    assert all(m.startswith("peer rank 1, header:") for m in messages), messages


@pytest.mark.timeout(90)
def test_recover_from_partner_memory_then_from_its_file(tmp_path: Path) -> None:
    holder, owner = run_world(workers.recover, 2, str(tmp_path), timeout=WORLD_TIMEOUT)
    for rank, r in enumerate((holder, owner)):
        assert r["replica"] is None, f"rank {rank}: the replica differs: {r['replica']}"
    assert holder["kept"] == "NoneType", f"rank 0: recover(lost=False) returned a {holder['kept']}"
    diff = owner["from_memory"]
    assert diff is None, f"rank 1: the state recovered from rank 0's memory differs: {diff}"
    diff = owner["from_file"]
    assert diff is None, f"rank 1: the state recovered from rank 0's file differs: {diff}"
    lost = owner["from_file_aliases_lost"]
    assert lost == [], f"rank 1: aliases of 'w' lost in the state from the file: {lost}"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("world", [3, 4])
def test_recovery_in_a_ring_and_of_two_ranks_at_once_keeps_dtensors(world: int) -> None:
    results = run_world(workers.recover_dtensors, world, timeout=WORLD_TIMEOUT)
    lost = [r["lost"] for r in results]
    assert lost == ([False] * (world - 1) + [True] if world % 2 else [True, True, False, False])
    for rank, r in enumerate(results):
        if not r["lost"]:
            assert r["back"] == "NoneType", f"rank {rank} lost nothing but got a {r['back']}"
            continue
        assert r["back"] != "NoneType", f"rank {rank}: recover(lost=True) returned None"
        assert r["step"] == 7, f"rank {rank}: 'step' came back as {r['step']!r}"
        for key in ("w", "r"):
            d = r[key]
            assert d["is_dtensor"], f"rank {rank}: {key!r} came back as {d['type']}"
            got, want = d["placements"], d["want_placements"]
            assert got == want, f"rank {rank}, {key!r}: placements {got} != {want}"
            got, want = d["local"], d["want_local"]
            assert torch.equal(got, want), f"rank {rank}, {key!r}: holds\n{got}\nnot\n{want}"


@pytest.mark.timeout(90)
def test_a_replica_damaged_in_memory_is_caught_end_to_end(tmp_path: Path) -> None:
    holder, owner = run_world(workers.damaged_replica, 2, str(tmp_path), timeout=WORLD_TIMEOUT)
    persist, recover = holder["persist"], owner["recover"]
    _assert_raised("rank 0, persisted()", persist, "ReplicationError", phase="verify")
    _assert_raised("rank 1, recover(lost=True)", recover, "ReplicationError", phase="verify")
    assert "ints" in persist["message"], persist
    assert "ints" in recover["message"], recover
    diff = holder["kept"]
    assert diff is None, f"rank 0: the replica left on disk differs: {diff}"
    kept = holder["recover_kept"]
    assert kept == "NoneType", f"rank 0: recover(lost=False) returned a {kept}"


@pytest.mark.timeout(90)
def test_chosen_partners_replicate_and_a_choice_that_does_not_pair_up_is_refused() -> None:
    results = run_world(workers.chosen_partners, 4, timeout=WORLD_TIMEOUT)
    for rank, r in enumerate(results):
        diff = r["replica"]
        assert diff is None, f"rank {rank}: the replica from rank {r['partner']} differs: {diff}"
        _assert_raised(f"rank {rank}", r["error"], "UsageError")
        assert "does not pair up" in r["error"]["message"], r["error"]
    messages = [r["error"]["message"] for r in results]
    assert len(set(messages)) == 1, messages  # the same diagnosis everywhere
    assert "rank 1 sends to rank 2, which expects rank 0" in messages[0], messages
    assert all(r["seconds"] < 10 for r in results), results


@pytest.mark.timeout(90)
def test_digests_given_after_the_data_are_checked_as_it_lands() -> None:
    sender, receiver = run_world(workers.late_digests, 2, timeout=WORLD_TIMEOUT)
    assert sender["asked"] == 2, sender
    assert receiver["state"] is None, f"rank 1: the frame differs: {receiver['state']}"
    assert receiver["digests"], "rank 1: the digests returned are not the sender's"
    _assert_raised(
        "rank 1, damaged digests", receiver["damaged"], "ReplicationError", phase="verify"
    )
