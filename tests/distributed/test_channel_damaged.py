"""A subscriber refuses a version whose bytes differ from its publisher's digests (checked
after the frame landed, at a lower CPU priority), keeps serving what it has, and takes the
next version."""

from __future__ import annotations

import _channel_damaged_workers as workers
import pytest

from aiostage.testing import run_world


@pytest.mark.timeout(90)
def test_a_damaged_version_is_refused_and_the_next_one_installed() -> None:
    _, seen = run_world(workers.damaged_bytes, 2, timeout=60.0)
    after = seen["after_11"]
    assert (after["version"], after["target"], after["received_version"]) == (10, 10.0, 10)
    assert not after["pending"], f"a damaged version is pending: {after}"
    (refusal,) = after["refused"]
    assert "ReplicationError" in refusal["classes"], refusal
    assert refusal["phase"] == "verify", refusal
    assert "checksum mismatch in entry" in refusal["message"], refusal
    end = seen["end"]
    assert (end["version"], end["target"], end["error"]) == (12, 12.0, None), end
    assert len(end["refused"]) == 1, end
