"""The geometry of DTensor layouts: shard boxes follow torch's chunking rule exactly."""

from __future__ import annotations

import itertools

import pytest
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import Placement, Replicate, Shard

from aiostage._format.placements import Box, shard_box

PLACEMENTS: list[tuple[Placement, ...]] = [
    (Shard(0),),
    (Replicate(), Shard(0)),
    (Shard(0), Replicate()),
    (Shard(0), Shard(0)),  # nested on one dimension
    (Shard(1), Shard(0)),
    (Shard(0), Shard(1)),
]


def _json(placements: tuple[Placement, ...]) -> list[list[object]]:
    return [["shard", p.dim] if isinstance(p, Shard) else ["replicate"] for p in placements]


@pytest.mark.parametrize("placements", PLACEMENTS, ids=str)
@pytest.mark.parametrize("shape", [(10, 3), (7, 5), (5, 2), (1, 1), (0, 4), (13, 9)])
def test_shard_box_is_torchs_local_shape_and_offset(
    placements: tuple[Placement, ...], shape: tuple[int, int]
) -> None:
    meshes = [(4,)] if len(placements) == 1 else [(2, 2), (2, 3), (4, 2)]
    for mesh in meshes:
        for coord in itertools.product(*(range(n) for n in mesh)):
            local, offset = _compute_local_shape_and_global_offset(
                shape, mesh, list(coord), placements
            )
            got = shard_box(shape, mesh, _json(placements), coord)
            assert got.shape == tuple(local), (mesh, coord)
            if got.volume:  # torch gives an empty shard the offset of the dimension's end
                assert got.offset == tuple(offset), (mesh, coord)


def test_the_shards_of_a_layout_tile_the_tensor() -> None:
    shape, mesh, placements = (7, 5), (2, 4), [["shard", 1], ["shard", 0]]
    boxes = [shard_box(shape, mesh, placements, c) for c in itertools.product(range(2), range(4))]
    assert sum(b.volume for b in boxes) == 35
    for a, b in itertools.combinations(boxes, 2):
        assert a.intersect(b) is None


def test_intersect() -> None:
    a = Box((0, 0), (4, 10))
    assert a.intersect(Box((3, 2), (4, 4))) == Box((3, 2), (1, 4))
    assert a.intersect(Box((4, 0), (3, 10))) is None
    assert a.intersect(Box((2, 0), (0, 10))) is None  # an empty box meets nothing
    assert Box((), ()).intersect(Box((), ())) == Box((), ())  # 0-dim tensors
