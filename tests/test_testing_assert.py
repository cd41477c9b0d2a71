"""aiostage.testing.assert_state_dict_equal: passes on equal dicts, names the first difference."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from aiostage.testing import assert_state_dict_equal


def make() -> dict[str, Any]:
    return {"w": torch.arange(6.0).reshape(2, 3), "opt": {0: [1, math.nan, "x"]}}


def test_equal_dicts_pass() -> None:
    assert_state_dict_equal(make(), make())


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda sd: sd["w"].add_(0.5), r"w: tensor bytes differ, max abs difference 0\.5"),
        (lambda sd: sd.update(w=sd["w"].t()), r"w: \(dtype, shape, stride\)"),
        (lambda sd: sd.update(opt={"0": sd["opt"][0]}), "key"),
        (lambda sd: sd["opt"][0].append(2), r"opt\.0: length"),
        (lambda sd: sd["opt"][0].__setitem__(2, "y"), r"opt\.0\.2: 'y' != 'x'"),
    ],
)
def test_the_first_difference_is_named(change: Any, words: str) -> None:
    sd = make()
    change(sd)
    with pytest.raises(AssertionError, match=words):
        assert_state_dict_equal(sd, make())


def test_aliasing_is_compared_when_asked() -> None:
    w = torch.arange(6.0)
    tied = {"a": w, "b": w, "v": w[2:4]}
    copied = {"a": w.clone(), "b": w.clone(), "v": w[2:4].clone()}
    assert_state_dict_equal(copied, tied)  # values only by default
    assert_state_dict_equal({"a": w, "b": w, "v": w[2:4]}, tied, check_aliasing=True)
    with pytest.raises(
        AssertionError,
        match=r"^b: aliasing differs: .* no earlier tensor in got but with a in want",
    ):
        assert_state_dict_equal(copied, tied, check_aliasing=True)
    with pytest.raises(AssertionError, match=r"^b: aliasing differs"):
        assert_state_dict_equal(tied, copied, check_aliasing=True)


def test_dtype_and_shape_mismatches_are_named() -> None:
    with pytest.raises(AssertionError, match=r"x: \(dtype, shape, stride\)"):
        assert_state_dict_equal({"x": torch.zeros(2, dtype=torch.int32)}, {"x": torch.zeros(2)})
    with pytest.raises(AssertionError, match=r"x: \(dtype, shape, stride\)"):
        assert_state_dict_equal({"x": torch.zeros(3)}, {"x": torch.zeros(2)})
