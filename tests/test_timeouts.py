"""The one ``timeout`` of the public API: seconds from a number or a timedelta, validated."""

from __future__ import annotations

import inspect
import math
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import aiostage
from aiostage._core.timeouts import DEFAULT_TIMEOUT, seconds


@pytest.mark.parametrize(
    ("given", "expected"),
    [(timedelta(minutes=2), 120.0), (timedelta(milliseconds=5), 0.005), (3, 3.0), (0.25, 0.25)],
)
def test_seconds_of_a_number_or_a_timedelta(given: timedelta | float, expected: float) -> None:
    got = seconds(given)
    assert isinstance(got, float)
    assert got == expected


@pytest.mark.parametrize(
    "bad", [0, -1.0, timedelta(0), timedelta(seconds=-3), math.inf, math.nan, "10", None]
)
def test_seconds_refuses_what_is_not_positive_and_finite(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"^timeout must be a positive, finite number of seconds"):
        seconds(bad)


def test_seconds_names_the_parameter() -> None:
    with pytest.raises(ValueError, match=r"^wait must be a positive, finite number of seconds"):
        seconds(-1, "wait")


PUBLIC = [
    aiostage.save,
    aiostage.async_save,
    aiostage.Checkpointer,
    aiostage.ReplicationStager,
    aiostage.WeightPublisher,
    aiostage.WeightSubscriber,
]


@pytest.mark.parametrize("obj", PUBLIC, ids=lambda o: o.__name__)
def test_one_name_one_type_one_default(obj: Any) -> None:
    params = inspect.signature(obj).parameters
    assert "pg_timeout" not in params
    timeout = params["timeout"]
    assert timeout.kind is inspect.Parameter.KEYWORD_ONLY
    assert timeout.default == DEFAULT_TIMEOUT == 600.0
    assert timeout.annotation == "float | timedelta"


async def test_a_bad_timeout_is_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="timeout"):
        await aiostage.save({}, tmp_path / "x", timeout=0)
    with pytest.raises(ValueError, match="timeout"):
        aiostage.Checkpointer(tmp_path, timeout=timedelta(0))
    with pytest.raises(ValueError, match="timeout"):
        aiostage.ReplicationStager(timeout=math.inf)
    assert not (tmp_path / "x").exists()
