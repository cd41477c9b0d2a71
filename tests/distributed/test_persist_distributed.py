"""Saving and loading from every rank of a real gloo world (``aiostage.save(..., pg=...)``)."""

from __future__ import annotations

from pathlib import Path

import _persist_workers as workers
import pytest

from aiostage.testing import run_world

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(150)]

WORLD_TIMEOUT = 120.0


def test_every_rank_writes_its_file_and_rank_0_commits(tmp_path: Path) -> None:
    results = run_world(workers.save_and_load, 2, str(tmp_path), timeout=WORLD_TIMEOUT)
    for rank, r in enumerate(results):
        loaded = r["loaded"]
        assert loaded["w"] is None, f"rank {rank}: the loaded w differs: {loaded['w']}"
        assert loaded["tied_shares_w"], f"rank {rank}: the loaded tied does not alias w"
        assert loaded["rank"] == rank, f"rank {rank} loaded the state of rank {loaded['rank']}"
    files = ["rank_00000.safetensors", "rank_00001.safetensors"]
    assert results[0]["files"] == ("rank_00000.safetensors", "manifest.json"), results[0]
    assert results[1]["files"] == ("rank_00001.safetensors",), results[1]
    assert [r["world"] for r in results] == [(0, 2), (1, 2)]
    assert results[0]["manifest"] == (2, files)
    assert results[0]["listing"] == ["ckpt"]  # no temporary left


def test_no_rank_reports_success_when_one_rank_fails(tmp_path: Path) -> None:
    (zero, zero_msg), (one, one_msg) = run_world(
        workers.one_rank_cannot_save, 2, str(tmp_path), timeout=WORLD_TIMEOUT
    )
    assert one == "UnsupportedValueError", (one, one_msg)
    assert zero == "CheckpointWriteError", (zero, zero_msg)
    assert "rank(s) [1]" in zero_msg
    assert list(tmp_path.iterdir()) == []


def test_an_existing_checkpoint_needs_overwrite_on_every_rank(tmp_path: Path) -> None:
    results = run_world(workers.save_twice, 2, str(tmp_path), timeout=WORLD_TIMEOUT)
    # per rank: what the second save raised, and how the overwritten w differs (None: equal)
    assert results == [("FileExistsError", None), ("FileExistsError", None)]


def test_dtensors_save_their_shard_and_load_into_dtensors(tmp_path: Path) -> None:
    results = run_world(workers.dtensors, 2, str(tmp_path), timeout=WORLD_TIMEOUT)
    for rank, r in enumerate(results):
        assert r["shape"] == (4, 6), f"rank {rank} loaded a shard of shape {r['shape']}"
        assert r["shard"] is None, f"rank {rank}: the loaded shard differs: {r['shard']}"
        assert r["into_is_dtensor"], f"rank {rank} loaded into a {r['into_type']}, not a DTensor"
        assert r["into"] is None, f"rank {rank}: the DTensor loaded into differs: {r['into']}"


def test_a_peer_that_never_arrives_times_out_and_commits_nothing(tmp_path: Path) -> None:
    (zero, listing0), (one, listing1) = run_world(
        workers.slow_peer, 2, str(tmp_path), timeout=WORLD_TIMEOUT
    )
    assert "rank 0 of 2" in zero
    assert "did not complete within 1.5 s" in zero
    assert "nothing was committed" in one  # timed out, or saw rank 0 leave
    assert listing0 == listing1 == []
