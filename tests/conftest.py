"""Suite-wide fixtures: fail any test that blocks the event loop inside aiostage code."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from blockbuster import BlockBuster, blockbuster_ctx


@pytest.fixture(autouse=True)
def blockbuster() -> Iterator[BlockBuster]:
    """Raise ``BlockingError`` when aiostage code makes a blocking call on the loop thread."""
    with blockbuster_ctx("aiostage") as bb:
        yield bb
