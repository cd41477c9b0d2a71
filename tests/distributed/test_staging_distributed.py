"""DefaultStager in real gloo worlds: DTensors (1-D and 2-D meshes) and ShardedTensors on CPU."""

from __future__ import annotations

from typing import Any

import _staging_workers as workers
import pytest

from aiostage.testing import run_world

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(150)]

WORLD_TIMEOUT = 120.0


def _assert_dtensor_copy(where: str, seen: dict[str, Any]) -> None:
    """``seen`` (``_observe_dtensor``): a DTensor like its original, with its own CPU shard."""
    assert seen["type"] == "DTensor", f"{where}: staged as {seen['type']}"
    staged_mesh, original_mesh = seen["mesh"]
    assert seen["same_mesh"], f"{where}: mesh {staged_mesh} != the original's {original_mesh}"
    for fact in ("placements", "size", "stride", "dtype", "local_shape"):
        got, want = seen[fact]
        assert got == want, f"{where}: {fact} {got} != the original's {want}"
    assert seen["local_device"] == "cpu", f"{where}: local shard on {seen['local_device']}"
    assert seen["local_vs_before"] is None, f"{where}: local shard: {seen['local_vs_before']}"
    assert not seen["shares_original_memory"], f"{where}: shares the original's memory"


def _assert_staged_twice(where: str, r: dict[str, Any]) -> None:
    """What ``_stage_twice`` saw: both copies right, the first unmoved by the edit."""
    assert list(r["staged"]) == list(r["after_edit"]) == list(r["shapes"]), (where, r)
    for key, seen in r["staged"].items():
        _assert_dtensor_copy(f"{where}, {key!r}", seen)
    plain = r["plain"]
    assert plain["vs_before"] is None, f"{where}, 'plain': {plain['vs_before']}"
    assert not plain["shares_original_memory"], f"{where}, 'plain': shares the original's memory"
    assert r["step"] == 7, f"{where}: 'step' staged as {r['step']!r}"
    for key, seen in r["after_edit"].items():
        _assert_dtensor_copy(f"{where}, {key!r} after the edit", seen)  # the first copy held
        again, full = r["again"][key], r["full"][key]
        assert again is None, f"{where}, {key!r}: the second copy vs the edited original: {again}"
        assert full is None, f"{where}, {key!r}: the first copy's full_tensor(): {full}"
    edited = r["plain_after_edit"]
    assert edited is None, f"{where}, 'plain' after the edit: {edited}"


def test_dtensors_on_a_1d_mesh_stage_as_dtensors() -> None:
    rank0, rank1 = run_world(workers.stage_dtensors_1d, 2, timeout=WORLD_TIMEOUT)
    _assert_staged_twice("rank 0", rank0)
    _assert_staged_twice("rank 1", rank1)
    assert rank0["shapes"] == {
        "w": ((4, 4), (8, 4)),
        "w_cols": ((8, 2), (8, 4)),
        "uneven": ((3, 3), (5, 3)),
        "tiny": ((1, 4), (1, 4)),
        "b": ((6,), (6,)),
    }
    assert rank1["shapes"] == {
        "w": ((4, 4), (8, 4)),
        "w_cols": ((8, 2), (8, 4)),
        "uneven": ((2, 3), (5, 3)),
        "tiny": ((0, 4), (1, 4)),
        "b": ((6,), (6,)),
    }


def test_aliased_dtensor_is_staged_once() -> None:
    results = run_world(workers.stage_aliased_dtensor, 2, timeout=WORLD_TIMEOUT)
    for rank, seen in enumerate(results):
        assert seen["copies_share_storage"], f"rank {rank}: 'w' and 'tied' staged apart: {seen}"
        assert not seen["shares_original_memory"], f"rank {rank}: shares the original: {seen}"
        got, want = seen["tied_placements"]
        assert seen["same_tied_placements"], f"rank {rank}: 'tied' placements {got} != {want}"


@pytest.mark.slow
def test_dtensors_on_a_2d_mesh_stage_as_dtensors() -> None:
    results = run_world(workers.stage_dtensors_2d, 4, timeout=WORLD_TIMEOUT)
    for rank, r in enumerate(results):
        _assert_staged_twice(f"rank {rank}", r)
        got, want = r["sub_mesh"]
        assert r["sub_on_tp"], f"rank {rank}: 'sub' staged on {got}, not the tp mesh {want}"
        dp, tp = divmod(rank, 2)
        assert r["shapes"] == {
            "both": ((4, 3), (8, 6)),
            "dp_rep": ((4, 6), (8, 6)),
            "tp_rep": ((3, 3) if dp == 0 else (2, 3), (5, 3)),
            "same_dim": ((2, 6), (8, 6)),
            "sub": ((5, 2) if tp == 0 else (5, 1), (5, 3)),
        }, f"rank {rank}"


def test_sharded_tensor_stages_as_sharded_tensor() -> None:
    results = run_world(workers.stage_sharded_tensor, 2, timeout=WORLD_TIMEOUT)
    for rank, r in enumerate(results):
        assert r["is_sharded_tensor"], f"rank {rank}: staged as {r['type']}"
        got, want = r["shard_metadata"]
        assert r["same_shard_metadata"], f"rank {rank}: shard metadata {got} != {want}"
        got, want = r["metadata"]
        assert r["same_metadata"], f"rank {rank}: metadata {got} != {want}"
        got, want = r["size"]
        assert got == want, f"rank {rank}: size {got} != the original's {want}"
        assert r["device"] == "cpu", f"rank {rank}: the shard's copy is on {r['device']}"
        assert r["vs_before"] is None, f"rank {rank}: the shard's copy: {r['vs_before']}"
        assert not r["shares_original_memory"], f"rank {rank}: shares the original's memory"
        moved = r["vs_before_after_edit"]
        assert moved is None, f"rank {rank}: the copy moved with the original: {moved}"
    assert [{"offsets": r["offsets"], "sizes": r["sizes"]} for r in results] == [
        {"offsets": [0, 0], "sizes": [4, 4]},
        {"offsets": [4, 0], "sizes": [4, 4]},
    ]


def test_wrapped_dtensor_parameter_and_grad_sharded_tensor() -> None:
    results = run_world(
        workers.stage_wrapped_dtensor_and_grad_sharded_tensor, 2, timeout=WORLD_TIMEOUT
    )
    for rank, r in enumerate(results):
        p, frozen, shard = r["p"], r["frozen"], r["st_shard"]
        assert p["is_parameter"], f"rank {rank}: 'p' staged as {p['type']}, not a Parameter"
        assert p["is_dtensor"], f"rank {rank}: 'p' staged as {p['type']}, not a DTensor"
        assert p["requires_grad"], f"rank {rank}: 'p' lost requires_grad"
        assert p["local_vs_original"] is None, f"rank {rank}: 'p': {p['local_vs_original']}"
        assert frozen["is_parameter"], f"rank {rank}: 'frozen' staged as {frozen['type']}"
        assert not frozen["requires_grad"], f"rank {rank}: 'frozen' gained requires_grad"
        assert shard["requires_grad"], f"rank {rank}: the ShardedTensor's shard lost requires_grad"
        assert shard["vs_original"] is None, f"rank {rank}: 'st' shard: {shard['vs_original']}"
