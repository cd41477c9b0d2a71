"""DefaultStager in real gloo worlds: DTensors (1-D and 2-D meshes) and ShardedTensors on CPU."""

from __future__ import annotations

import _staging_workers as workers
import pytest

from aiostage.testing import run_world

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(150)]

WORLD_TIMEOUT = 120.0


def test_dtensors_on_a_1d_mesh_stage_as_dtensors() -> None:
    rank0, rank1 = run_world(workers.stage_dtensors_1d, 2, timeout=WORLD_TIMEOUT)
    assert rank0 == {
        "w": ((4, 4), (8, 4)),
        "w_cols": ((8, 2), (8, 4)),
        "uneven": ((3, 3), (5, 3)),
        "tiny": ((1, 4), (1, 4)),
        "b": ((6,), (6,)),
    }
    assert rank1 == {
        "w": ((4, 4), (8, 4)),
        "w_cols": ((8, 2), (8, 4)),
        "uneven": ((2, 3), (5, 3)),
        "tiny": ((0, 4), (1, 4)),
        "b": ((6,), (6,)),
    }


def test_aliased_dtensor_is_staged_once() -> None:
    assert run_world(workers.stage_aliased_dtensor, 2, timeout=WORLD_TIMEOUT) == [True, True]


@pytest.mark.slow
def test_dtensors_on_a_2d_mesh_stage_as_dtensors() -> None:
    results = run_world(workers.stage_dtensors_2d, 4, timeout=WORLD_TIMEOUT)
    for rank, summary in enumerate(results):
        dp, tp = divmod(rank, 2)
        assert summary == {
            "both": ((4, 3), (8, 6)),
            "dp_rep": ((4, 6), (8, 6)),
            "tp_rep": ((3, 3) if dp == 0 else (2, 3), (5, 3)),
            "same_dim": ((2, 6), (8, 6)),
            "sub": ((5, 2) if tp == 0 else (5, 1), (5, 3)),
        }, f"rank {rank}"


def test_sharded_tensor_stages_as_sharded_tensor() -> None:
    results = run_world(workers.stage_sharded_tensor, 2, timeout=WORLD_TIMEOUT)
    assert results == [
        {"offsets": [0, 0], "sizes": [4, 4]},
        {"offsets": [4, 0], "sizes": [4, 4]},
    ]


def test_wrapped_dtensor_parameter_and_grad_sharded_tensor() -> None:
    run_world(workers.stage_wrapped_dtensor_and_grad_sharded_tensor, 2, timeout=WORLD_TIMEOUT)
