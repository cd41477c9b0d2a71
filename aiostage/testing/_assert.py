"""assert_state_dict_equal: compare two state dicts leaf by leaf and name the first difference."""

from __future__ import annotations

import math
from typing import Any

import torch

from .._core.tree import flatten


def assert_state_dict_equal(
    got: Any, want: Any, where: str = "", *, check_aliasing: bool = False
) -> None:
    """Assert ``got`` equals ``want``: container and key types, tensor dtype, shape, stride, bytes.

    Tensors must match byte for byte (NaNs included); a float NaN leaf equals a NaN. The
    ``AssertionError`` names the key path of the first difference and, for tensors of the same
    dtype and shape, the largest absolute difference. With ``check_aliasing``, tensors that share
    storage in ``want`` (tied weights, views) must share it in ``got`` too, and no others; the
    error names the first tensor whose sharing differs. Blocks on nothing but the comparison.
    """
    if check_aliasing:
        assert_state_dict_equal(got, want, where)
        _aliasing(got, want)
        return
    assert type(got) is type(want), f"{where or '<root>'}: {type(got)} != {type(want)}"
    if isinstance(want, torch.Tensor):
        _tensors(got, want, where or "<root>")
    elif isinstance(want, dict):
        assert list(got) == list(want), f"{where}: keys {list(got)} != {list(want)}"
        assert [type(k) for k in got] == [type(k) for k in want], f"{where}: key types differ"
        for k in want:
            assert_state_dict_equal(got[k], want[k], f"{where}.{k}" if where else str(k))
    elif isinstance(want, list | tuple):
        assert len(got) == len(want), f"{where}: length {len(got)} != {len(want)}"
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_state_dict_equal(a, b, f"{where}.{i}" if where else str(i))
    elif isinstance(want, float) and math.isnan(want):
        assert math.isnan(got), f"{where}: {got!r} != nan"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"
        assert repr(got) == repr(want), f"{where}: {got!r} != {want!r}"


def _tensors(got: torch.Tensor, want: torch.Tensor, where: str) -> None:
    meta = (got.dtype, tuple(got.shape), got.stride())
    expected = (want.dtype, tuple(want.shape), want.stride())
    assert meta == expected, f"{where}: (dtype, shape, stride) {meta} != {expected}"
    a = got.detach().contiguous().reshape(-1).view(torch.uint8)
    b = want.detach().contiguous().reshape(-1).view(torch.uint8)
    if torch.equal(a, b):
        return
    diff = ""
    if got.dtype.is_floating_point or got.dtype.is_complex:
        delta = (got.detach().to(torch.complex128) - want.detach().to(torch.complex128)).abs()
        diff = f", max abs difference {float(delta.max()):.6g}"
    raise AssertionError(f"{where}: tensor bytes differ{diff}")


def _aliasing(got: Any, want: Any) -> None:
    mine, theirs = _sharing(got), _sharing(want)
    for key, owner in theirs.items():
        if mine[key] != owner:
            raise AssertionError(
                f"{key}: aliasing differs: it shares storage with {_with(key, mine[key])} in "
                f"got but with {_with(key, owner)} in want"
            )


def _sharing(sd: Any) -> dict[str, str]:
    """Each tensor's key and the key of the first tensor sharing its storage (itself if none)."""
    first: dict[tuple[str, int], str] = {}
    out: dict[str, str] = {}
    for leaf in flatten(sd).leaves:
        t = leaf.data
        ptr = t.untyped_storage().data_ptr() if t.numel() else 0
        out[leaf.key] = first.setdefault((str(t.device), ptr), leaf.key) if ptr else leaf.key
    return out


def _with(key: str, owner: str) -> str:
    return "no earlier tensor" if owner == key else owner
