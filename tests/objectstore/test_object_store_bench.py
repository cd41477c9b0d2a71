"""``bench/object_store.py`` runs at a tiny size and reports every contender and target."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("obstore")
pytest.importorskip("s3fs")  # the bench extra: DCP's fsspec path

BENCH = Path(__file__).resolve().parent.parent.parent / "bench"


@pytest.mark.timeout(120)
def test_the_object_store_bench_runs_at_a_tiny_size() -> None:
    done = subprocess.run(
        [sys.executable, "object_store.py", "--gib", "0.01", "--reps", "1", "--background-s", "0"],
        cwd=BENCH,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "aiostage round trip: equal, aliasing kept" in out
    for what in ("save vs the raw multipart put", "load vs dcp.load over s3fs", "loop max lag"):
        assert what in out, out[-3000:]
