"""Tiered checkpoints in real 4-rank gloo worlds: ranks SIGKILLed for real and brought back as
fresh processes, then every rank restored from its fastest source."""

from __future__ import annotations

from pathlib import Path

import _tier_workers as workers
import pytest

from aiostage.testing import run_restarting_world, run_world

pytestmark = [pytest.mark.distributed]

WORLD_TIMEOUT = 60.0


def _sources(results: list[dict[str, object]]) -> list[tuple[str, int]]:
    """Each rank's (source, holder), as every rank's report says (checked to agree)."""
    reports = [r["sources"] for r in results]
    assert all(s == reports[0] for s in reports), reports
    return [(source, holder) for _, source, holder, _ in reports[0]]  # type: ignore[attr-defined]


def _all_exact(results: list[dict[str, object]], step: int) -> None:
    for rank, r in enumerate(results):
        assert r["step"] == step, f"rank {rank} restored step {r['step']}, not {step}"
        assert r["state_step"] == step, f"rank {rank}: the restored 'step' is {r['state_step']}"
        assert r["exact"], f"rank {rank}: the restored tensors differ from step {step}'s"
        assert r["same_objects"], f"rank {rank}: the report's state does not hold into's tensors"


@pytest.mark.timeout(120)
def test_a_lost_rank_comes_back_from_its_partners_memory(tmp_path: Path) -> None:
    results = run_restarting_world(
        workers.lose_ranks, 4, str(tmp_path), [2], [2], restarts=1, timeout=WORLD_TIMEOUT
    )
    _all_exact(results, 5)
    assert _sources(results) == [("memory", 0), ("memory", 1), ("peer_memory", 0), ("memory", 3)]
    assert all(r["skipped"] == [] for r in results), results
    assert all(r["saved_6"].endswith("durable/step_000000006") for r in results), results
    assert not (tmp_path / "node2-new" / "rank_00002" / "step_000000005").exists()  # not kept
    assert (tmp_path / "node2-new" / "rank_00002" / "step_000000006").is_dir()


@pytest.mark.timeout(120)
def test_partner_lost_too_comes_back_from_its_local_replica(tmp_path: Path) -> None:
    results = run_restarting_world(
        workers.lose_ranks, 4, str(tmp_path), [0, 2], [2], restarts=2, timeout=WORLD_TIMEOUT
    )
    _all_exact(results, 5)
    assert _sources(results) == [("local", 0), ("memory", 1), ("peer_local", 0), ("memory", 3)]


@pytest.mark.timeout(120)
def test_two_partners_lost_with_their_disks_restore_the_newest_durable_step(
    tmp_path: Path,
) -> None:
    results = run_restarting_world(
        workers.lose_ranks, 4, str(tmp_path), [0, 2], [0, 2], restarts=2, timeout=WORLD_TIMEOUT
    )
    _all_exact(results, 3)
    assert _sources(results) == [("durable", 0), ("local", 1), ("durable", 2), ("local", 3)]
    for rank in (1, 3):  # the newer local steps belonged to a history that is gone
        assert not (tmp_path / f"node{rank}" / f"rank_0000{rank}" / "step_000000004").exists()


@pytest.mark.timeout(120)
def test_a_whole_job_restart_restores_from_local_disk_alone(tmp_path: Path) -> None:
    run_world(workers.save_all, 4, str(tmp_path), timeout=WORLD_TIMEOUT)
    results = run_world(workers.restore_all, 4, str(tmp_path), timeout=WORLD_TIMEOUT)
    _all_exact(results, 5)
    assert _sources(results) == [("local", r) for r in range(4)]  # nothing crossed the network


@pytest.mark.timeout(120)
def test_a_local_copy_with_a_flipped_byte_is_skipped_for_the_partners(tmp_path: Path) -> None:
    run_world(workers.save_all, 4, str(tmp_path), timeout=WORLD_TIMEOUT)
    _flip_a_byte_of(tmp_path / "node2" / "rank_00002" / "step_000000005", workers.state(2, 5))
    results = run_world(workers.restore_all, 4, str(tmp_path), timeout=WORLD_TIMEOUT)
    _all_exact(results, 5)
    assert _sources(results) == [("local", 0), ("local", 1), ("peer_local", 0), ("local", 3)]
    for r in results:
        [(rank, step, source, holder, reason)] = r["skipped"]
        assert (rank, step, source, holder) == (2, 5, "local", 2), r["skipped"]
        assert "checksum mismatch" in reason, reason
        assert "'w'" in reason, reason


@pytest.mark.timeout(120)
@pytest.mark.parametrize("silent", [2, 0])  # a rank the roll call waits for; the gatherer
def test_a_rank_that_never_restores_is_named_within_the_timeout(
    tmp_path: Path, silent: int
) -> None:
    timeout = 3.0
    results = run_world(
        workers.one_rank_silent, 3, str(tmp_path), silent, timeout, timeout=WORLD_TIMEOUT
    )
    assert results[silent] == {"error": None}
    for rank, r in enumerate(results):
        if rank == silent:
            continue
        assert r["error"] == "ReplicationTimeout", (rank, r)
        assert r["peer"] == silent, (rank, r)
        assert f"rank {silent}" in r["message"], (rank, r)
        assert timeout * 0.9 <= r["seconds"] <= 2 * timeout + 5, (rank, r)


def _flip_a_byte_of(checkpoint: Path, state: dict[str, object]) -> None:
    """Flip one byte inside tensor ``w`` of the data file that holds it."""
    pattern = state["w"].numpy().tobytes()  # type: ignore[attr-defined]
    for file in checkpoint.iterdir():
        data = file.read_bytes()
        at = data.find(pattern)
        if at >= 0:
            with file.open("r+b") as f:
                f.seek(at + 10)
                f.write(bytes([data[at + 10] ^ 0x10]))
            return
    raise AssertionError(f"no file of {checkpoint} holds 'w'")
