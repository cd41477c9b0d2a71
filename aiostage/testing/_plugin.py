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
from ._s3 import S3Server

__all__ = [
    "aiostage_faults",
    "aiostage_s3_bucket",
    "aiostage_s3_server",
    "aiostage_world",
    "pytest_addoption",
]


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


@pytest.fixture(scope="session")
def aiostage_s3_server() -> Iterator[S3Server]:
    """An ``S3Server``: moto's S3 server on 127.0.0.1, started once per session (skips the test
    without ``moto[server]``). Blocks while it starts and stops."""
    pytest.importorskip("moto.server")
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture
def aiostage_s3_bucket(aiostage_s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket's name, with the environment (``AWS_ENDPOINT_URL``, ``AWS_ALLOW_HTTP``,
    test credentials) pointing at ``aiostage_s3_server`` for this test."""
    for name, value in aiostage_s3_server.environ().items():
        monkeypatch.setenv(name, value)
    return aiostage_s3_server.bucket()
