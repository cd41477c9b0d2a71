"""Replication benchmark: two gloo ranks on loopback exchange a ~1 GiB state dict (~200 tensors).

Run: ``.venv/bin/python bench/replicate.py [--gib 1] [--reps 3]``. Contenders, in rounds:
raw ``dist.send``/``recv`` of one flat tensor of the same size one way; raw simultaneous
``isend`` + ``irecv`` both ways (the link's limit for an exchange); aiostage
``ReplicationStager.stage`` (snapshot + exchange; the exchange alone from its statistics; with
``verify_on_arrival=True``; with ``storage_dir`` and ``persisted()``); the anchor ``_ReplicationStager.stage`` with and without
its ``_persist_state_dict``. Times are the max over both ranks per rep; each rep starts after a
barrier; the first two rounds (page faults of fresh buffers, for every contender) are dropped.
GB/s are per direction (unique bytes of the state dict).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio.to_thread
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

from _common import GB, make_sd, run_spawned, table, unique_bytes

import aiostage
from aiostage.testing import LoopLag

Results = dict[str, list[float]]


def _timed(out: Results, name: str, seconds: float) -> None:
    out.setdefault(name, []).append(seconds)


def _raw(out: Results, rank: int, flat: torch.Tensor, into: torch.Tensor) -> None:
    peer = 1 - rank
    dist.barrier()
    began = time.perf_counter()
    if rank == 0:
        dist.send(flat, peer)
    else:
        dist.recv(into, peer)
    _timed(out, "raw send/recv, one flat tensor, one way", time.perf_counter() - began)
    dist.barrier()
    began = time.perf_counter()
    works = [dist.isend(flat, peer), dist.irecv(into, peer)]
    for w in works:
        w.wait()
    _timed(out, "raw isend+irecv, one flat tensor, both ways (limit)", time.perf_counter() - began)


def _both_ways(rank: int, flat: torch.Tensor, into: torch.Tensor) -> None:
    works = [dist.isend(flat, 1 - rank), dist.irecv(into, 1 - rank)]
    for w in works:
        w.wait()


async def _raw_in_thread(out: Results, rank: int, flat: torch.Tensor, into: torch.Tensor) -> None:
    """The limit again, posted and waited from a worker thread: the loop lag it costs by itself."""
    dist.barrier()
    async with LoopLag() as lag:
        await anyio.to_thread.run_sync(_both_ways, rank, flat, into)
    _timed(out, "raw both ways from a worker thread: loop max lag ms", lag.max_ms)


async def _ours(
    out: Results, sd: dict[str, Any], stager: aiostage.ReplicationStager, tag: str = ""
) -> None:
    dist.barrier()
    async with LoopLag() as lag:
        began = time.perf_counter()
        replica = await stager.stage(sd)
        took = time.perf_counter() - began
    stager.release(replica)
    stats = stager.statistics()
    _timed(out, f"aiostage stage: snapshot + exchange{tag}", took)
    _timed(out, f"aiostage exchange only (both ways){tag}", stats.last_exchange_seconds)
    _timed(out, f"aiostage loop max lag ms{tag}", lag.max_ms)


async def _ours_persisted(out: Results, sd: dict[str, Any], stager: Any) -> None:
    dist.barrier()
    began = time.perf_counter()
    replica = await stager.stage(sd)
    staged = time.perf_counter() - began
    await stager.persisted()
    _timed(out, "aiostage stage + persisted()", time.perf_counter() - began)
    _timed(out, "aiostage stage with storage_dir (persist in background)", staged)
    stager.release(replica)


def _anchor(out: Results, sd: dict[str, Any], tmp: str, persist: bool) -> None:
    from torch.distributed.checkpoint.staging import _ReplicationStager

    anchor = _ReplicationStager(dist.group.WORLD, storage_dir=f"{tmp}/anchor_{dist.get_rank()}")
    if not persist:
        anchor._persist_state_dict = lambda *a, **k: None  # type: ignore[method-assign]
    dist.barrier()
    began = time.perf_counter()
    received = anchor.stage(sd)
    name = "anchor _ReplicationStager.stage" + (" (with persist)" if persist else " (no persist)")
    _timed(out, name, time.perf_counter() - began)
    del received


async def _rank(rank: int, world: int, gib: float, reps: int, tmp: str) -> Results:
    torch.set_num_threads(1)
    sd = make_sd(gib, seed=rank)
    n = unique_bytes(sd)
    flat, into = torch.ones(n // 4), torch.empty(n // 4)
    out: Results = {}
    async with (
        aiostage.ReplicationStager() as ours,
        aiostage.ReplicationStager(verify_on_arrival=True) as on_arrival,
        aiostage.ReplicationStager(storage_dir=f"{tmp}/ours_{rank}") as persisted,
    ):
        for _ in range(reps + 2):  # two warm-up rounds (aiostage's two receive buffers) dropped
            _raw(out, rank, flat, into)
            await _raw_in_thread(out, rank, flat, into)
            await _ours(out, sd, ours)
            await _ours(out, sd, on_arrival, " (verify_on_arrival)")
            await _ours_persisted(out, sd, persisted)
            _anchor(out, sd, tmp, persist=False)
            _anchor(out, sd, tmp, persist=True)
    out["bytes"] = [float(n)]
    return {k: v[2:] if k != "bytes" else v for k, v in out.items()}


def _report(results: list[Results]) -> str:
    n = results[0]["bytes"][0]
    lags = (
        "aiostage loop max lag ms",
        "aiostage loop max lag ms (verify_on_arrival)",
        "raw both ways from a worker thread: loop max lag ms",
    )
    names = [k for k in results[0] if k != "bytes" and k not in lags]
    worst = {k: [max(r[k][i] for r in results) for i in range(len(results[0][k]))] for k in names}
    med = {k: statistics.median(v) for k, v in worst.items()}
    rows = [
        [k, f"{1e3 * min(worst[k]):.1f}", f"{1e3 * med[k]:.1f}", f"{n / med[k] / GB:.2f}"]
        for k in names
    ]
    lag, lag_oa, raw_lag = (
        statistics.median(max(r[k][i] for r in results) for i in range(len(results[0][k])))
        for k in lags
    )
    ex = med["aiostage exchange only (both ways)"]
    st = med["aiostage stage: snapshot + exchange"]
    limit = med["raw isend+irecv, one flat tensor, both ways (limit)"]
    oa = med["aiostage exchange only (both ways) (verify_on_arrival)"]
    ratios = [
        ["aiostage exchange / anchor stage (no persist)", f"{ex / med['anchor _ReplicationStager.stage (no persist)']:.2f}", "<= 0.6"],
        ["aiostage stage (snapshot+exchange) / anchor (no persist)", f"{st / med['anchor _ReplicationStager.stage (no persist)']:.2f}", "<= 0.6"],
        ["aiostage stage+persisted / anchor (with persist)", f"{med['aiostage stage + persisted()'] / med['anchor _ReplicationStager.stage (with persist)']:.2f}", "<= 0.6"],
        ["raw simultaneous limit / aiostage exchange", f"{limit / ex:.2f}", ">= 0.85"],
        ["raw simultaneous limit / aiostage exchange (verify_on_arrival)", f"{limit / oa:.2f}", ">= 0.85"],
        ["raw simultaneous limit / aiostage stage (snapshot+exchange)", f"{limit / st:.2f}", ">= 0.85"],
        ["aiostage loop max lag during stage (ms, median over reps of the worse rank)", f"{lag:.1f}", "<= 5"],
        ["aiostage loop max lag, verify_on_arrival (same statistic)", f"{lag_oa:.1f}", "<= 5"],
        ["reference: loop max lag, raw both ways from a worker thread (same statistic)", f"{raw_lag:.1f}", ""],
    ]  # fmt: skip
    return (
        f"{n / GB:.3f} GB unique per rank, max over 2 ranks per rep\n\n"
        + table(["figure", "min ms", "median ms", "GB/s per direction (median)"], rows)
        + "\n\n"
        + table(["ratio", "value", "target"], ratios)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    results, background = run_spawned("replicate_", 2, _rank, args.gib, args.reps)
    print(_report(results))
    print(background)


if __name__ == "__main__":
    main()
