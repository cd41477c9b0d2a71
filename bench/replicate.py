"""Replication benchmark: two gloo ranks on loopback exchange a ~1 GiB state dict (~200 tensors).

Run: ``.venv/bin/python bench/replicate.py [--gib 1] [--reps 3] [--runs K] [--stalls]``. Contenders, in rounds:
raw ``dist.send``/``recv`` of one flat tensor of the same size one way; raw simultaneous
``isend`` + ``irecv`` both ways (the link's limit for an exchange), and again hashing the sent
bytes with xxh3 (the limit with the checksums aiostage takes: on a host of few cores they
compete with gloo's copies for the same CPUs and memory bandwidth), and from a worker thread
while the loop's 1 ms heartbeat runs (as aiostage's stage is measured: its wake-ups take CPU from
the transfer too); aiostage
``ReplicationStager.stage`` (snapshot + exchange; the exchange alone from its statistics; with
``verify_on_arrival=True``; with ``storage_dir`` and ``persisted()``); the anchor ``_ReplicationStager.stage`` with and without
its ``_persist_state_dict``. Times are the max over both ranks per rep; each rep starts after a
barrier; the first two rounds (page faults of fresh buffers, for every contender) are dropped.
GB/s are per direction (unique bytes of the state dict). ``--runs K`` repeats the whole
measurement (a fresh world each time) and prints, per run, aiostage's loop lag and exchange time
beside the raw transfer's in the same run, and the median and worst of each difference / ratio.
The CPU rows are each rank's process CPU (every thread, gloo's included) per raw exchange and
per stage: on a host of few cores, what aiostage adds competes with gloo's own threads.
``--stalls`` also samples, in one more exchange per run, what each rank's loop thread ran while
its heartbeat was more than 2 ms overdue (``LoopLag(stalls=...)``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import anyio.to_thread
import torch
import torch.distributed as dist
import xxhash
from _lib import shapes
from _lib.machine import run_spawned
from _lib.report import GB, Ratio, Report, add_report_arguments, start
from _lib.runs import Figure, add_runs, add_stalls, merge_stalls, stalls_seen
from _lib.timing import Heartbeat

import aiostage

Results = dict[str, Any]


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
    began, cpu = time.perf_counter(), time.process_time()
    _both_ways(rank, flat, into)
    _timed(out, "raw isend+irecv, one flat tensor, both ways (limit)", time.perf_counter() - began)
    _timed(out, CPU_RAW, time.process_time() - cpu)
    dist.barrier()
    began = time.perf_counter()
    _both_ways(rank, flat, into, hashed=True)
    _timed(out, HASHED_LIMIT, time.perf_counter() - began)


def _both_ways(rank: int, flat: torch.Tensor, into: torch.Tensor, hashed: bool = False) -> None:
    """Send ``flat`` and receive ``into`` at once; with ``hashed``, also take the xxh3_64 of the
    sent bytes, 1 MiB at a time, once both are posted: the integrity work aiostage does per
    exchange, on the raw transfer."""
    works = [dist.isend(flat, 1 - rank), dist.irecv(into, 1 - rank)]
    if hashed:
        data = memoryview(flat.numpy()).cast("B")
        for at in range(0, len(data), 1 << 20):
            xxhash.xxh3_64_intdigest(data[at : at + (1 << 20)])
    for w in works:
        assert w is not None  # gloo returns a work for a point-to-point operation
        w.wait()


async def _raw_in_thread(out: Results, rank: int, flat: torch.Tensor, into: torch.Tensor) -> None:
    """The limit again, posted and waited from a worker thread: the loop lag it costs by itself."""
    dist.barrier()
    async with Heartbeat() as lag:
        began, cpu = time.perf_counter(), time.process_time()
        await anyio.to_thread.run_sync(_both_ways, rank, flat, into)
        took, cpu = time.perf_counter() - began, time.process_time() - cpu
    _timed(out, "raw both ways from a worker thread: loop max lag ms", lag.max_ms)
    _timed(out, RAW_BEATING, took)
    _timed(out, CPU_RAW_BEATING, cpu)


async def _ours(
    out: Results, sd: dict[str, Any], stager: aiostage.ReplicationStager, tag: str = ""
) -> None:
    dist.barrier()
    async with Heartbeat() as lag:
        began, cpu = time.perf_counter(), time.process_time()
        replica = await stager.stage(sd)
        took, cpu = time.perf_counter() - began, time.process_time() - cpu
    stager.release(replica)
    _timed(out, f"{CPU_STAGE}{tag}", cpu)
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

    assert dist.group.WORLD is not None
    anchor = _ReplicationStager(dist.group.WORLD, storage_dir=f"{tmp}/anchor_{dist.get_rank()}")
    if not persist:
        anchor._persist_state_dict = lambda *a, **k: None  # type: ignore[method-assign]
    dist.barrier()
    began = time.perf_counter()
    received = anchor.stage(sd)
    name = "anchor _ReplicationStager.stage" + (" (with persist)" if persist else " (no persist)")
    _timed(out, name, time.perf_counter() - began)
    del received


async def _traced(sd: dict[str, Any], stager: aiostage.ReplicationStager) -> dict[str, Any]:
    """One more exchange, its loop thread sampled while the heartbeat is overdue."""
    dist.barrier()
    async with Heartbeat(stalls=0.002) as lag:
        replica = await stager.stage(sd)
    stager.release(replica)
    return stalls_seen(lag.stalls)


async def _rank(
    rank: int, world: int, gib: float, reps: int, stalls: bool, tmp: str
) -> dict[str, Any]:
    torch.set_num_threads(1)
    sd = shapes.flat(gib).state_dict(seed=rank)
    n = shapes.unique_bytes(sd)
    flat, into = torch.ones(n // 4), torch.empty(n // 4)
    out: Results = {}
    async with (
        aiostage.ReplicationStager() as ours,
        aiostage.ReplicationStager(verify_on_arrival=True) as on_arrival,
        aiostage.ReplicationStager(verify=False) as unverified,
        aiostage.ReplicationStager(storage_dir=f"{tmp}/ours_{rank}") as persisted,
    ):
        for _ in range(reps + 2):  # two warm-up rounds (aiostage's two receive buffers) dropped
            _raw(out, rank, flat, into)
            await _raw_in_thread(out, rank, flat, into)
            await _ours(out, sd, ours)
            await _ours(out, sd, on_arrival, " (verify_on_arrival)")
            await _ours(out, sd, unverified, NO_SUMS)
            await _ours_persisted(out, sd, persisted)
            _anchor(out, sd, tmp, persist=False)
            _anchor(out, sd, tmp, persist=True)
        traced = await _traced(sd, ours) if stalls else None
    out["bytes"] = [float(n)]
    return {"stalls": traced, **{k: v[2:] if k != "bytes" else v for k, v in out.items()}}


#: the tag of the exchange without checksums: what hashing costs, in the same run
NO_SUMS = " (verify=False: no checksums)"
#: CPU seconds of the whole process (every thread, gloo's included) per rank
CPU_RAW = "CPU: raw both ways"
CPU_RAW_BEATING = "CPU: raw both ways from a worker thread, the heartbeat running"
CPU_STAGE = "CPU: aiostage stage (snapshot + exchange)"
LAGS = (
    "aiostage loop max lag ms",
    "aiostage loop max lag ms (verify_on_arrival)",
    "raw both ways from a worker thread: loop max lag ms",
    f"aiostage loop max lag ms{NO_SUMS}",
)


def _medians(results: list[Results]) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Per figure: each rep's worse rank, and the median over reps."""
    keys = [k for k in results[0] if k not in ("bytes", "stalls")]
    worst = {k: [max(r[k][i] for r in results) for i in range(len(results[0][k]))] for k in keys}
    return worst, {k: statistics.median(v) for k, v in worst.items()}


def _run_figures(results: list[Results]) -> list[Figure]:
    """One run's figures: aiostage beside the raw transfer measured in the same run."""
    med = _medians(results)[1]
    lag, raw_lag = med[LAGS[0]], med[LAGS[2]]
    ex, limit = med["aiostage exchange only (both ways)"], med[LIMIT]
    bare = med[f"aiostage exchange only (both ways){NO_SUMS}"]
    hashed = med[HASHED_LIMIT]
    # on a host whose cores the transfer keeps busy, time follows CPU: both near the core count
    cpu = {k: _summed(results, k) for k in (CPU_RAW_BEATING, CPU_STAGE)}
    busy_raw = cpu[CPU_RAW_BEATING] / med[RAW_BEATING]
    busy_ours = cpu[CPU_STAGE] / med["aiostage stage: snapshot + exchange"]
    return [
        Figure("added loop lag: aiostage max lag - raw's, ms", lag, raw_lag, lag - raw_lag, 2, False, " ms"),
        Figure("raw limit / aiostage exchange (throughput), ms", 1e3 * ex, 1e3 * limit, limit / ex, 0.85),
        Figure("raw limit / aiostage exchange without checksums (what hashing costs), ms", 1e3 * bare, 1e3 * limit, limit / bare),
        Figure("raw limit with checksums / aiostage exchange (same integrity work), ms", 1e3 * ex, 1e3 * hashed, hashed / ex, 0.85),
        Figure("raw limit beside the same heartbeat / aiostage exchange, ms", 1e3 * ex, 1e3 * med[RAW_BEATING], med[RAW_BEATING] / ex),
        Figure("CPU of both ranks, heartbeat running: raw exchange's / aiostage stage's, ms", 1e3 * cpu[CPU_STAGE], 1e3 * cpu[CPU_RAW_BEATING], cpu[CPU_RAW_BEATING] / cpu[CPU_STAGE]),
        Figure("cores busy (both ranks' CPU / wall), heartbeat running: aiostage stage, raw exchange", busy_ours, busy_raw, busy_ours / busy_raw),
    ]  # fmt: skip


def _summed(results: list[Results], key: str) -> float:
    """The median over reps of ``key`` summed over the ranks (CPU seconds of every process)."""
    return statistics.median(sum(v) for v in zip(*(r[key] for r in results), strict=True))


def _worst_lags(runs: list[list[Figure]]) -> Ratio:
    """aiostage's worst-run loop lag against the raw transfer's worst-run lag."""
    ours = max(run[0].ours for run in runs)
    raw = max(run[0].raw for run in runs)
    return Ratio("aiostage worst-run loop lag / raw's worst-run loop lag", ours / raw, 1.5, False)


LIMIT = "raw isend+irecv, one flat tensor, both ways (limit)"
#: the limit posted from a worker thread while the loop's heartbeat runs, as aiostage's exchange is
#: measured (the heartbeat's wake-ups take CPU from the transfer too)
RAW_BEATING = "raw both ways from a worker thread, the loop's heartbeat running"
#: the limit with the checksums aiostage takes: what a 2-core host can reach with them on
HASHED_LIMIT = "raw isend+irecv both ways + xxh3 of the sent bytes (limit with checksums)"


def _report(results: list[Results], report: Report) -> None:
    n = results[0]["bytes"][0]
    names = [
        k
        for k in results[0]
        if k not in ("bytes", "stalls") and k not in LAGS and not k.startswith("CPU: ")
    ]
    worst, med = _medians(results)
    rows = [
        [k, f"{1e3 * min(worst[k]):.1f}", f"{1e3 * med[k]:.1f}", f"{n / med[k] / GB:.2f}"]
        for k in names
    ]
    report.add(
        f"{n / GB:.3f} GB unique per rank, max over 2 ranks per rep",
        ["figure", "min ms", "median ms", "GB/s per direction (median)"],
        rows,
    )
    report.figures["replicate"] = {
        k: {"seconds": worst[k], "median_s": med[k], "bytes": n} for k in names
    }
    report.figures["replicate loop lag"] = {k: {"max_lag_ms": worst[k]} for k in LAGS}
    report.ratios += _ratios(med)


def _ratios(med: dict[str, float]) -> list[Ratio]:
    """The ratios against the replication issue's targets (lags in ms, the rest in seconds)."""
    ex = med["aiostage exchange only (both ways)"]
    st = med["aiostage stage: snapshot + exchange"]
    limit = med[LIMIT]
    oa = med["aiostage exchange only (both ways) (verify_on_arrival)"]
    anchor = med["anchor _ReplicationStager.stage (no persist)"]
    persisted = (
        med["aiostage stage + persisted()"] / med["anchor _ReplicationStager.stage (with persist)"]
    )
    return [
        Ratio("aiostage exchange / anchor stage (no persist)", ex / anchor, 0.6, False),
        Ratio("aiostage stage (snapshot+exchange) / anchor (no persist)", st / anchor, 0.6, False),
        Ratio("aiostage stage+persisted / anchor (with persist)", persisted, 0.6, False),
        Ratio("raw simultaneous limit / aiostage exchange (verify_on_arrival)", limit / oa, 0.85),
        Ratio("raw simultaneous limit / aiostage stage (snapshot+exchange)", limit / st, 0.85),
        Ratio("aiostage loop max lag during stage (median over reps of the worse rank)", med[LAGS[0]], unit=" ms"),
        Ratio("aiostage loop max lag, verify_on_arrival (same statistic)", med[LAGS[1]], unit=" ms"),
        Ratio("reference: loop max lag, raw both ways from a worker thread (same statistic)", med[LAGS[2]], unit=" ms"),
        Ratio("CPU per exchange, raw both ways (whole process, worse rank)", 1e3 * med[CPU_RAW], unit=" ms"),
        Ratio("CPU per stage, aiostage (same statistic)", 1e3 * med[CPU_STAGE], unit=" ms"),
        Ratio("CPU per stage, aiostage verify=False (same statistic)", 1e3 * med[CPU_STAGE + NO_SUMS], unit=" ms"),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--runs", type=int, default=1, help="repeat the whole measurement")
    parser.add_argument("--stalls", action="store_true", help="sample the loop during a stall")
    add_report_arguments(parser)
    args = parser.parse_args()
    report = start("replicate", args)
    report.children = True
    report.shape = shapes.flat(args.gib).describe()
    runs, traced = [], []
    for _ in range(args.runs):
        results, report.background = run_spawned(
            "replicate_", 2, _rank, args.gib, args.reps, args.stalls
        )
        runs.append(_run_figures(results))
        traced += [r["stalls"] for r in results if r["stalls"] is not None]
    _report(results, report)  # the last run's tables
    add_runs(report, runs)
    report.ratios.append(_worst_lags(runs))
    if traced:
        add_stalls(report, "loop stalls during an exchange, both ranks", merge_stalls(traced))
    report.finish(args.json)


if __name__ == "__main__":
    main()
