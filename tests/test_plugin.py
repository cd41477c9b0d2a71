"""The aiostage pytest plugin: its fixtures here, and the documented example run by pytester."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from aiostage._storage import localfs
from aiostage.testing import FaultyWrites, WorldError, WorldRunner

pytest_plugins = ["pytester"]

DOC = Path(__file__).parent.parent / "docs" / "testing.md"
EXAMPLE = re.compile(r"<!-- example: (?P<name>\S+) -->\n```python\n(?P<code>.*?)```", re.S)


def rank_that_fails(rank: int, world_size: int) -> int:
    """Rank function: rank 1 raises."""
    if rank == 1:
        raise ValueError(f"rank {rank} of {world_size} refuses")
    return rank


def test_aiostage_faults_is_active_and_removed_at_teardown(aiostage_faults: FaultyWrites) -> None:
    assert localfs.write_hooks == [aiostage_faults]


def test_no_fault_outlives_its_test() -> None:
    assert localfs.write_hooks == []


@pytest.mark.distributed
async def test_aiostage_world_names_the_failed_rank(aiostage_world: WorldRunner) -> None:
    assert aiostage_world.timeout == 60.0  # the ini default
    with pytest.raises(WorldError, match="rank 1 of 2 refuses") as info:
        await aiostage_world(rank_that_fails, 2, timeout=60)
    assert info.value.rank == 1


@pytest.mark.distributed
@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["strict", "auto"])
def test_the_documented_example_passes(pytester: pytest.Pytester, mode: str) -> None:
    match = EXAMPLE.search(DOC.read_text())
    assert match is not None, f"no example in {DOC}"
    pytester.makefile(".py", **{match["name"].removesuffix(".py"): match["code"]})
    pytester.makeini(
        f"[pytest]\nasyncio_mode = {mode}\nasyncio_default_fixture_loop_scope = function\n"
        "filterwarnings = error\naiostage_world_timeout = 90\n"
    )
    result = pytester.runpytest_subprocess("-p", "asyncio", "-p", "no:cacheprovider", timeout=200)
    result.assert_outcomes(passed=4)


def test_strict_mode_without_a_marker_does_not_run_the_async_test(
    pytester: pytest.Pytester,
) -> None:
    """Sanity check of the set-up above: strict mode really is strict."""
    pytester.makepyfile(
        "async def test_unmarked(aiostage_faults):\n    assert aiostage_faults.writes == []\n"
    )
    pytester.makeini("[pytest]\nasyncio_mode = strict\n")
    result = pytester.runpytest_subprocess("-p", "asyncio", "-p", "no:cacheprovider", timeout=120)
    assert result.ret != 0 or result.parseoutcomes().get("passed", 0) == 0
