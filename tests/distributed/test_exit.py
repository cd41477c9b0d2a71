"""A process that used aiostage exits cleanly: never SIGABRT ("terminate called ...") at exit.

Issue 13, item 11. ``run_world``'s ranks leave with ``os._exit``, which skips the interpreter's
finalization, where a daemon thread returning from a gloo wait into Python is killed by
``pthread_exit`` and aborts the process. So each rank here is a script run as a user runs one
(``_exit_workers.py``): a 2-rank gloo world per run, each scenario with and without
``destroy_process_group``, many runs, some at once. Every rank must exit with status 0 and
print nothing about ``terminate``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from subprocess import PIPE
from typing import Any

import pytest
from torch._C._distributed_c10d import TCPStore  # torch.distributed.TCPStore, typed

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("_exit_workers.py")
SCENARIOS = ("dtensors", "replicate", "channel", "stalled")
#: worlds of two ranks: 56 processes that each exit the normal way
WORLDS = 28
#: seconds one world may take (spawn, scenario, exit), under a loaded CI machine's CPU
WORLD_TIMEOUT = 150


def run_world_by_hand(scenario: str, destroy: bool) -> list[dict[str, Any]]:
    """Run ``scenario`` on two ranks started as scripts, joined through a store hosted here;
    each rank's exit status, stderr and printed result. SIGKILLs and reaps them on the way out."""
    store = TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=60), wait_for_workers=False)
    args = ["2", str(store.port), scenario, "1" if destroy else "0"]
    with contextlib.ExitStack() as stack:
        procs = []
        for rank in range(2):
            cmd = [sys.executable, str(WORKER), str(rank), *args]
            proc = subprocess.Popen(cmd, stdout=PIPE, stderr=PIPE, text=True)
            stack.enter_context(proc)  # closes its pipes and reaps it
            stack.callback(proc.kill)  # runs first: nothing is left running
            procs.append(proc)
        ends = []
        for rank, proc in enumerate(procs):
            try:
                out, err = proc.communicate(timeout=WORLD_TIMEOUT)
            except subprocess.TimeoutExpired:
                out, err = "", f"still running after {WORLD_TIMEOUT} s"
            lines = out.splitlines()
            ends.append(
                {
                    "rank": rank,
                    "status": proc.returncode,
                    "stderr": err,
                    "result": json.loads(lines[-1])["result"] if lines else None,
                }
            )
        return ends


@pytest.mark.timeout(900)
def test_processes_that_used_aiostage_exit_without_aborting() -> None:
    runs = list(
        itertools.islice(itertools.cycle(itertools.product(SCENARIOS, (True, False))), WORLDS)
    )
    with ThreadPoolExecutor(max(4, os.cpu_count() or 1)) as pool:
        worlds = list(pool.map(lambda run: run_world_by_hand(*run), runs))
    bad = [
        f"{scenario} (destroy={destroy}) rank {end['rank']}: status {end['status']}\n"
        f"{end['stderr'][-1500:]}"
        for (scenario, destroy), ends in zip(runs, worlds, strict=True)
        for end in ends
        if end["status"] != 0 or "terminate called" in end["stderr"] or end["result"] is None
    ]
    assert not bad, f"{len(bad)} of {2 * WORLDS} processes did not exit cleanly:\n" + "\n".join(bad)
    for (scenario, _), (first, second) in zip(runs, worlds, strict=True):
        if scenario == "replicate":
            assert (first["result"], second["result"]) == ([0, 1, 2], [0, 1, 2])
        if scenario == "channel":
            assert first["result"] == [[1], [1]], "a version was not delivered"
            assert second["result"][-1] == 2.0, "the subscriber did not serve version 2"
        if scenario == "stalled":
            assert first["result"] == [1], "the stalled subscriber was not dropped"
