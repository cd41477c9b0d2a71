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
    files = ["rank_00000.safetensors", "rank_00001.safetensors"]
    assert results[0]["files"] == ("rank_00000.safetensors", "manifest.json")
    assert results[1]["files"] == ("rank_00001.safetensors",)
    assert [r["world"] for r in results] == [(0, 2), (1, 2)]
    assert results[0]["manifest"] == (2, files)
    assert results[0]["listing"] == ["ckpt"]  # no temporary left


def test_no_rank_reports_success_when_one_rank_fails(tmp_path: Path) -> None:
    (zero, zero_msg), (one, _) = run_world(
        workers.one_rank_cannot_save, 2, str(tmp_path), timeout=WORLD_TIMEOUT
    )
    assert one == "UnsupportedValueError"
    assert zero == "CheckpointWriteError"
    assert "rank(s) [1]" in zero_msg
    assert list(tmp_path.iterdir()) == []


def test_an_existing_checkpoint_needs_overwrite_on_every_rank(tmp_path: Path) -> None:
    results = run_world(workers.save_twice, 2, str(tmp_path), timeout=WORLD_TIMEOUT)
    assert results == [("FileExistsError", True), ("FileExistsError", True)]


def test_dtensors_save_their_shard_and_load_into_dtensors(tmp_path: Path) -> None:
    results = run_world(workers.dtensors, 2, str(tmp_path), timeout=WORLD_TIMEOUT)
    assert results == [((4, 6), True, True), ((4, 6), True, True)]


def test_a_peer_that_never_arrives_times_out_and_commits_nothing(tmp_path: Path) -> None:
    (zero, listing0), (one, listing1) = run_world(
        workers.slow_peer, 2, str(tmp_path), timeout=WORLD_TIMEOUT
    )
    assert "rank 0 of 2" in zero
    assert "did not complete within 1.5 s" in zero
    assert "nothing was committed" in one  # timed out, or saw rank 0 leave
    assert listing0 == listing1 == []
