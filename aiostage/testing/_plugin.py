"""The aiostage pytest plugin (entry point ``pytest11``): ``aiostage_world``, ``aiostage_faults``.

Both fixtures are plain (sync) fixtures, so they serve sync tests and async tests alike, under
pytest-asyncio's strict or auto mode, or anyio's plugin. The ini option
``aiostage_world_timeout`` sets the default deadline of a world, in seconds (60).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ._faults import FaultyWrites
from ._runner import WorldRunner

__all__ = ["aiostage_faults", "aiostage_world", "pytest_addoption"]


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register the ini option ``aiostage_world_timeout``."""
    parser.addini(
        "aiostage_world_timeout",
        "default deadline, in seconds, of a world run by the aiostage_world fixture",
        default="60",
    )


@pytest.fixture
def aiostage_world(request: pytest.FixtureRequest) -> WorldRunner:
    """A ``WorldRunner``: ``await aiostage_world(fn, 2, *args)`` runs ``fn`` on 2 gloo ranks.

    ``fn`` must be a top-level function of an importable module (the test module is one). Blocks
    on nothing until called; raises what ``WorldRunner`` raises.
    """
    return WorldRunner(timeout=float(request.config.getini("aiostage_world_timeout")))


@pytest.fixture
def aiostage_faults() -> Iterator[FaultyWrites]:
    """An active ``FaultyWrites``: add rules (``aiostage_faults.fail(2)``) before the save.

    Removed at teardown, so no fault leaks into the next test. Blocks on nothing.
    """
    with FaultyWrites() as faults:
        yield faults
