"""ReplicationStager in real gloo worlds of spawned ranks on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import _replication_workers as workers
import pytest

from aiostage.testing import WorldError, run_world

pytestmark = [pytest.mark.distributed]

WORLD_TIMEOUT = 60.0


@pytest.mark.timeout(90)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_round_trip_persist_and_reuse(world: int, tmp_path: Path) -> None:
    results = run_world(workers.roundtrip, world, str(tmp_path), timeout=WORLD_TIMEOUT)
    for rank, r in enumerate(results):
        if world % 2 == 0:
            assert r["send_to"] == r["from"] == (rank + world // 2) % world
        else:
            assert (r["send_to"], r["from"]) == ((rank + 1) % world, (rank - 1) % world)
        assert r["allocations"] == 2, r  # two receive buffers, then reuse
        assert r["reused"], r
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"replica_of_rank_{r:05d}" for r in range(world)]


@pytest.mark.timeout(90)
def test_without_storage_and_4096_tiny_tensors() -> None:
    results = run_world(workers.no_storage_and_tiny, 2, timeout=WORLD_TIMEOUT)
    # The target (the anchor needs ~5 s): the best of three rounds, worst rank.
    assert max(r["seconds"] for r in results) < 0.5, results


@pytest.mark.timeout(90)
def test_dtensors_and_sharded_tensors_hold_the_partners_shards() -> None:
    assert run_world(workers.dtensors_and_sharded, 2, timeout=WORLD_TIMEOUT) == [{"ok": True}] * 2


@pytest.mark.timeout(90)
def test_a_partner_killed_mid_exchange_fails_the_survivor_fast() -> None:
    with pytest.raises(WorldError) as caught:
        run_world(workers.peer_dies, 2, timeout=WORLD_TIMEOUT)
    assert caught.value.ranks == (1,), caught.value  # rank 0 raised nothing unexpected
    assert caught.value.failures[0].signal == "SIGKILL"


@pytest.mark.timeout(90)
def test_a_partner_that_never_calls_times_out_and_breaks_the_stager() -> None:
    rank0, _ = run_world(workers.never_calls, 2, timeout=WORLD_TIMEOUT)
    assert 1.5 <= rank0["seconds"] < 1.5 + 2.0, rank0
    assert "recreate the group" in rank0["broken"], rank0


@pytest.mark.timeout(90)
def test_malformed_metadata_is_refused_before_allocation_and_never_unpickled() -> None:
    errors, _ = run_world(workers.malformed, 2, timeout=WORLD_TIMEOUT)
    assert len(errors) == 3, errors
    assert "not an aiostage frame" in errors[0]
    assert "header length" in errors[1]
    assert "bad header" in errors[2]
    assert all(e.startswith("peer rank 1, header:") for e in errors), errors


@pytest.mark.timeout(90)
def test_recover_from_partner_memory_then_from_its_file(tmp_path: Path) -> None:
    results = run_world(workers.recover, 2, str(tmp_path), timeout=WORLD_TIMEOUT)
    assert results == [["memory", "file"]] * 2


@pytest.mark.timeout(90)
@pytest.mark.parametrize("world", [3, 4])
def test_recovery_in_a_ring_and_of_two_ranks_at_once_keeps_dtensors(world: int) -> None:
    results = run_world(workers.recover_dtensors, world, timeout=WORLD_TIMEOUT)
    lost = [r["lost"] for r in results]
    assert lost == ([False] * (world - 1) + [True] if world % 2 else [True, True, False, False])


@pytest.mark.timeout(90)
def test_a_replica_damaged_in_memory_is_caught_end_to_end(tmp_path: Path) -> None:
    holder, owner = run_world(workers.damaged_replica, 2, str(tmp_path), timeout=WORLD_TIMEOUT)
    assert holder["persist"].startswith("verify: "), holder
    assert owner["recover"].startswith("verify: "), owner
    assert "ints" in holder["persist"], holder
    assert "ints" in owner["recover"], owner


@pytest.mark.timeout(90)
def test_chosen_partners_replicate_and_a_choice_that_does_not_pair_up_is_refused() -> None:
    results = run_world(workers.chosen_partners, 4, timeout=WORLD_TIMEOUT)
    assert len({r["error"] for r in results}) == 1, results  # the same diagnosis everywhere
    assert "rank 1 sends to rank 2, which expects rank 0" in results[0]["error"], results
    assert all(r["seconds"] < 10 for r in results), results
