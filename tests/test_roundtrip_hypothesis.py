"""Random nested state dicts survive save and load bit for bit, aliasing included."""

from __future__ import annotations

import asyncio
import math
import tempfile
from pathlib import Path
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aiostage
from aiostage.testing import assert_state_dict_equal

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.uint16,
    torch.uint64,
    torch.bool,
    torch.complex64,
    torch.complex128,
    torch.float8_e4m3fn,
]

values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**80), 2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.sampled_from(DTYPES),
    st.lists(st.integers(0, 9), max_size=3).map(torch.Size),
)
keys = st.one_of(st.text(max_size=6), st.integers(-5, 50))


@st.composite
def tensors(draw: st.DrawFn, pool: list[torch.Tensor]) -> torch.Tensor:
    """A fresh tensor of random bytes, or an alias or view of one drawn before."""
    if pool and draw(st.integers(0, 3)) == 0:
        base = draw(st.sampled_from(pool))
        how = draw(st.sampled_from(["same", "slice", "transpose", "flat"]))
        if how == "slice" and base.dim() and base.shape[0]:
            start = draw(st.integers(0, base.shape[0] - 1))
            return base[start : draw(st.integers(start, base.shape[0]))]
        if how == "transpose" and base.dim() >= 2:
            return base.transpose(0, 1)
        if how == "flat" and base.is_contiguous():
            return base.reshape(-1)
        return base
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 5), max_size=3))
    raw = draw(
        st.binary(
            min_size=math.prod(shape) * dtype.itemsize, max_size=math.prod(shape) * dtype.itemsize
        )
    )
    t = (
        torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        if raw
        else torch.empty(0, dtype=torch.uint8)
    )
    if dtype == torch.bool:
        t = t % 2  # only 0 and 1 are valid bools
    t = t.view(dtype).reshape(shape)
    pool.append(t)
    return t


@st.composite
def state_dicts(draw: st.DrawFn) -> dict[Any, Any]:
    pool: list[torch.Tensor] = []
    leaf = st.one_of(tensors(pool), values)
    tree = st.recursive(
        leaf,
        lambda kids: st.one_of(
            st.dictionaries(keys, kids, max_size=4),
            st.lists(kids, max_size=3),
            st.lists(kids, max_size=3).map(tuple),
        ),
        max_leaves=12,
    )
    return draw(st.dictionaries(keys, tree, min_size=1, max_size=5))


def storages(obj: Any) -> list[int]:
    """The storage identity of every non-empty tensor, in walk order."""
    if isinstance(obj, torch.Tensor):
        return [obj.untyped_storage().data_ptr()] if obj.numel() else []
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list | tuple) else []
    return [p for x in items for p in storages(x)]


def sharing(ptrs: list[int]) -> list[int]:
    """Which earlier tensor each tensor shares storage with (its own index if none)."""
    return [ptrs.index(p) for p in ptrs]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sd=state_dicts())
def test_random_state_dicts_round_trip(sd: dict[Any, Any]) -> None:
    with tempfile.TemporaryDirectory() as root:
        out = asyncio.run(_round_trip(sd, Path(root) / "ckpt"))
    assert_state_dict_equal(sd, out)
    assert sharing(storages(out)) == sharing(storages(sd))


async def _round_trip(sd: dict[Any, Any], path: Path) -> Any:
    await aiostage.save(sd, path)
    return await aiostage.load(path)
