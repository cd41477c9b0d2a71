"""Checkpointer with a ProcessGroup: spawned gloo ranks on 127.0.0.1 sharing one root."""

from __future__ import annotations

from pathlib import Path

import _checkpointer_workers as workers
import pytest

from aiostage.testing import run_world

pytestmark = [pytest.mark.distributed]


@pytest.mark.timeout(90)
def test_replicated_saves_retention_load_and_recover(tmp_path: Path) -> None:
    results = run_world(workers.replicated_saves, 2, str(tmp_path), timeout=60)
    for rank, r in enumerate(results):
        assert r["totals"] == [2.0] * 3, f"rank {rank}: the user's all_reduce gave {r['totals']}"
        assert r["kept"] == [2, 3], f"rank {rank} kept steps {r['kept']} before closing"
        assert r["loaded"] is None, f"rank {rank}: the loaded step 3 differs: {r['loaded']}"
        assert r["steps"] == [2, 3], f"rank {rank} kept steps {r['steps']} after closing"
    lost, kept = results[1]["recovered"], results[0]["recovered"]
    assert lost is None, f"rank 1's recovered state differs: {lost}"
    assert kept == "NoneType", f"rank 0 lost nothing, yet recover returned a {kept}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000000002", "step_000000003"]


@pytest.mark.timeout(90)
def test_skip_decisions_are_the_same_on_every_rank(tmp_path: Path) -> None:
    a, b = run_world(workers.skip_is_agreed, 2, str(tmp_path), timeout=60)
    assert a == b, (a, b)
    assert a["skipped"][0] is False
    saved = [s for s, skipped in enumerate(a["skipped"]) if not skipped]
    assert a["steps"][-3:] == saved[-3:]


@pytest.mark.timeout(90)
def test_async_save_with_a_group_and_replication(tmp_path: Path) -> None:
    results = run_world(workers.async_save_with_replication, 2, str(tmp_path), timeout=60)
    for rank, r in enumerate(results):
        assert r["replicated"], f"rank {rank}: the report shows no replication time"
        assert r["loaded"] is None, f"rank {rank}: the loaded checkpoint differs: {r['loaded']}"
    recovered = results[0]["recovered"]
    assert recovered is None, f"rank 0's recovered state differs: {recovered}"


@pytest.mark.timeout(120)
def test_every_rank_refuses_the_same_save_and_none_hangs(tmp_path: Path) -> None:
    a, b = run_world(workers.saves_are_agreed, 2, str(tmp_path), timeout=90)
    for key in ("again", "older", "split"):
        assert a[key]["type"] == b[key]["type"] == "UsageError", (key, a[key], b[key])
        assert a[key]["message"] == b[key]["message"], key
    assert "step_000000001 exists" in a["again"]["message"]
    assert "step 0 is older than step 1" in a["older"]["message"]
    assert "rank 0: 2, rank 1: 3" in a["split"]["message"]
    # rank 1 holds the value: its own error names the key; rank 0's names rank 1
    assert b["opaque"]["key"] == "opaque", b["opaque"]
    assert "rank(s) [1]" in a["opaque"]["message"], a["opaque"]
    # step 2 failed on both; rank 0 received it, rank 1 did not: its next save raises it, and
    # rank 0's names rank 1 instead of saving alone
    assert a["received"]["type"] == "CheckpointWriteError", a["received"]
    assert b["after"]["type"] == "CheckpointWriteError", b["after"]
    assert a["after"]["type"] == "PersistenceError", a["after"]
    assert "rank(s) [1]" in a["after"]["message"]
    for rank, r in enumerate((a, b)):
        assert r["steps"] == [1, 2], f"rank {rank} kept {r['steps']}"
        assert r["loaded"] is None, f"rank {rank}: the overwritten step 2 differs: {r['loaded']}"
