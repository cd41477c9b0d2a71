"""Restore benchmark: two gloo ranks on loopback bring a ~1 GiB state dict per rank back from each
tier of a tiered ``Checkpointer`` (docs/tiers.md), against ``dcp.load`` of the same state.

Run: ``.venv/bin/python bench/restore.py [--gib 1] [--reps 3] [--no-s3] [--only-stalls] [--held]
[--json PATH]``. Each rank saves its state (``flat``: ~200 tensors) to every tier: the partner's
memory, the node-local directory, the durable root on local disk, and (with ``obstore`` and
``moto``) a durable root on moto's S3 server in a child process on 127.0.0.1; and once with
``dcp.save``. Then, per rep, ``Checkpointer.restore`` into the same preallocated state dict, each
source forced the way a failure forces it: the partner's memory (rank 1 a new Checkpointer with an
empty local directory, rank 0 keeping its memory through ``rejoin``), the local directory (both new,
their local directories kept: a whole-job restart), the durable root (both new, local directories
empty), and ``dcp.load`` from local disk. The page cache of every file read is dropped first (cold
reads, as on a fresh node). Times are the whole ``restore`` call, the max over both ranks per rep,
after a barrier; GB/s is one rank's unique tensor bytes per second. Two raw anchors bound what the
tiers can reach here: the same bytes sent over gloo from rank 0 straight into rank 1's tensors (one
transfer, nothing else), and, with S3, each rank's bytes as one object fetched with obstore's plain
GET (moto's own speed). Also the training-visible stall of a fast-tier save (memory + local,
``durable=False``) against a plain ``Checkpointer.save`` to the durable root, both reserved first,
the first two saves of each dropped, in turns whose order rotates (at least twelve of each: on a
shared host the stall is mostly the staging copy's wait for a core), with the process's CPU time
during each save (the work the caller waited for). Besides the ratio of the medians it prints the
median of the per-turn ratios (each fast-tier save against the plain save next to it): the host's
drift between turns cancels in a pair. ``--held`` adds a plain save whose last copy is held until
the next save (two buffers staged into in turn, as the fast tier's memory tier makes it: it keeps
the newest copy while the next is staged); ``--only-stalls`` runs the stall turns alone.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import resource
import statistics
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio.to_thread
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from _lib import anchors, shapes
from _lib.machine import run_spawned
from _lib.report import GB, Ratio, Report, add_report_arguments, start

import aiostage
from aiostage.testing import assert_state_dict_equal

Results = dict[str, list[float]]
MEMORY, LOCAL, DURABLE, S3, DCP = (
    "the partner's memory",
    "the local directory",
    "the durable root on local disk",
    "the durable root on S3 (moto, loopback)",
    "dcp.load from local disk",
)
RAW_GLOO = "raw gloo send, rank 0 into rank 1's tensors"
RAW_S3 = "raw S3 GET of each rank's bytes (obstore)"
FAST_STALL, PLAIN_STALL = "stall: fast-tier save (memory + local)", "stall: plain Checkpointer.save"
HELD_STALL = "stall: plain Checkpointer.save, its last copy held (2 buffers in turn)"
STALLS = (FAST_STALL, PLAIN_STALL, HELD_STALL)
CPU = "CPU during the "  # + a stall's name: the process's CPU seconds while ``save`` ran
TIMEOUT = 600.0


def _tiered(root: str | Path, local: Path, replicate: bool = True) -> aiostage.Checkpointer:
    return aiostage.Checkpointer(
        root, pg=dist.group.WORLD, replicate=replicate, local_dir=local, durable_every=1,
        keep_local=1, keep_last=1, timeout=TIMEOUT,
    )  # fmt: skip


async def _barrier() -> None:
    await anyio.to_thread.run_sync(dist.barrier)


class _HoldLast:
    """A ``DefaultStager`` of two buffers whose ``release`` lets go of the copy before the
    given one, holding the given one (as the memory tier holds the newest save's copy): a
    plain Checkpointer over it stages into the two buffers in turn, as a tiered one does."""

    def __init__(self) -> None:
        self.inner = aiostage.DefaultStager(pool_size=2)
        self.held: Any = None

    async def stage(self, state_dict: Any) -> Any:
        return await self.inner.stage(state_dict)

    async def reserve(self, state_dict: Any, copies: int = 1) -> None:
        await self.inner.reserve(state_dict, 2)

    def release(self, staged: Any) -> None:
        old, self.held = self.held, staged
        if old is not None:
            self.inner.release(old)

    async def aclose(self) -> None:
        await self.inner.aclose()


class _Rank:
    """One rank's run: its state, the state dict it restores into, and its Checkpointer."""

    def __init__(self, rank: int, gib: float, base: Path) -> None:
        self.rank, self.base = rank, base
        self.sd = shapes.flat(gib).state_dict(seed=rank)
        self.into = shapes.tree_map(torch.zeros_like, self.sd)  # allocated and faulted in once
        self.out: Results = {"bytes": [float(shapes.unique_bytes(self.sd))]}
        self.ckpt: aiostage.Checkpointer | None = None
        self._fresh: Iterator[int] = itertools.count()
        self.step = 0
        self.checked: set[str] = set()

    def empty(self) -> Path:
        """A local directory nothing was written to (a fresh node's)."""
        return self.base / f"empty_{self.rank}_{next(self._fresh)}"

    async def enter(self, ckpt: aiostage.Checkpointer) -> None:
        """Close this rank's Checkpointer (its memory goes) and enter ``ckpt``."""
        if self.ckpt is not None:
            await self.ckpt.aclose()
        self.ckpt = ckpt
        await ckpt.__aenter__()

    async def stalls(
        self, kinds: list[tuple[aiostage.Checkpointer, str, bool | None]], reps: int
    ) -> None:
        """``reps`` stalls of each of ``kinds`` (a fast-tier save first), in turns whose order
        rotates (after two of each dropped), each committed before the next."""
        for ckpt, _, _ in kinds:
            await ckpt.reserve(self.sd)
        for i in range(reps + 2):
            self.step += 1
            turn = kinds[i % len(kinds) :] + kinds[: i % len(kinds)]  # each kind first in turn
            for ckpt, name, durable in turn:
                await _barrier()
                cpu = _cpu_seconds()
                handle = await ckpt.save(self.step, self.sd, durable=durable)
                cpu = _cpu_seconds() - cpu
                stall = (await handle.report).stall_seconds
                if i >= 2:
                    self.out.setdefault(name, []).append(stall)
                    self.out.setdefault(CPU + name, []).append(cpu)

    async def restore(self, name: str) -> None:
        """One timed restore under ``name``: its seconds and every rank's source (as digits of
        a number: the figures are floats); its bytes checked once per ``name``."""
        assert self.ckpt is not None
        await _barrier()
        report = await self.ckpt.restore(into=self.into)
        self.out.setdefault(name, []).append(report.seconds)
        self.out.setdefault(f"{name}: sources", []).append(
            float(sum(10**r.rank * _SOURCE_CODE[r.source] for r in report.ranks))
        )
        if name not in self.checked:  # once per source: the bytes came back
            self.checked.add(name)
            await anyio.to_thread.run_sync(assert_state_dict_equal, report.state, self.sd)

    async def raw_gloo(self) -> None:
        """One timed transfer of rank 0's tensors straight into rank 1's (the anchor of a
        restore from the partner's memory: one transfer, no checks, no copies)."""
        pairs = list(zip(shapes.tensors(self.sd), shapes.tensors(self.into), strict=True))

        def transfer() -> None:
            works = [
                dist.isend(src, 1, tag=77) if self.rank == 0 else dist.irecv(dst, 0, tag=77)
                for src, dst in pairs
            ]
            for work in works:
                work.wait()

        await _barrier()
        began = time.perf_counter()
        await anyio.to_thread.run_sync(transfer)
        self.out.setdefault(RAW_GLOO, []).append(time.perf_counter() - began)

    async def dcp_load(self, where: Path) -> None:
        """One timed ``dcp.load`` into the same state dict, its files' pages dropped first."""
        await anyio.to_thread.run_sync(anchors.evict, where)
        await _barrier()
        began = time.perf_counter()
        await anyio.to_thread.run_sync(lambda: dcp.load(self.into, checkpoint_id=str(where)))
        self.out.setdefault(DCP, []).append(time.perf_counter() - began)


def _cpu_seconds() -> float:
    """This process's CPU time so far, every thread (the staging copy runs in a worker)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


_SOURCE_CODE = {"memory": 1, "local": 2, "peer_memory": 3, "peer_local": 4, "durable": 5}
_SOURCE_NAME = {v: k for k, v in _SOURCE_CODE.items()}


async def _stall_turns(me: _Rank, kept: aiostage.Checkpointer, held: bool, reps: int) -> None:
    """The stall turns: ``kept`` (fast tiers) against a plain Checkpointer and, with ``held``,
    a plain one whose last copy is held (``_HoldLast``: two buffers in turn, as ``kept``)."""
    holder = _HoldLast()
    try:
        async with contextlib.AsyncExitStack() as stack:
            root, pg = me.base / "plain", dist.group.WORLD
            plain = await stack.enter_async_context(aiostage.Checkpointer(root, pg=pg, keep_last=1))
            kinds = [(kept, FAST_STALL, False), (plain, PLAIN_STALL, None)]
            if held:
                root = me.base / "held"
                ckpt = aiostage.Checkpointer(root, pg=pg, keep_last=1, stager=holder)
                kinds.append((await stack.enter_async_context(ckpt), HELD_STALL, None))
            await me.stalls(kinds, reps)
    finally:
        await holder.aclose()


async def _rank(
    rank: int, world: int, gib: float, reps: int, bucket: str, stalls: str, tmp: str
) -> Results:
    """``stalls``: "only" (no restores) and/or "held" (the held plain save too), comma-joined."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)  # DCP's notes on the process group
    me = _Rank(rank, gib, Path(tmp))
    durable, node = me.base / "durable", me.base / f"node{rank}"
    kept = _tiered(durable, node)
    await me.enter(kept)
    await _stall_turns(me, kept, "held" in stalls, max(4 * reps, 12))
    if "only" in stalls:
        await kept.aclose()
        return me.out
    me.step += 1
    await (await kept.save(me.step, me.sd, durable=True)).committed  # every tier has it
    for _ in range(reps):  # rank 1 comes back with nothing, rank 0 keeps its memory
        if rank == 0:
            await kept.rejoin(dist.group.WORLD)
        else:
            await me.enter(_tiered(durable, me.empty()))
        await me.restore(MEMORY)
    for _ in range(reps):  # a whole-job restart, the nodes' local directories kept
        await anyio.to_thread.run_sync(anchors.evict, node)
        await me.enter(_tiered(durable, node))
        await me.restore(LOCAL)
    for _ in range(reps):  # fresh nodes
        await anyio.to_thread.run_sync(anchors.evict, durable)
        await me.enter(_tiered(durable, me.empty()))
        await me.restore(DURABLE)
    where = me.base / "dcp"
    await anyio.to_thread.run_sync(lambda: dcp.save(me.sd, checkpoint_id=str(where)))
    for _ in range(reps):
        await me.dcp_load(where)
    for _ in range(reps):
        await me.raw_gloo()
    if bucket:
        await _from_s3(me, f"s3://{bucket}/restore", reps)
    assert me.ckpt is not None
    await me.ckpt.aclose()
    return me.out


async def _from_s3(me: _Rank, root: str, reps: int) -> None:
    """Save once to a durable root on S3, then restore from it on empty local directories."""
    ckpt = _tiered(root, me.empty(), replicate=False)
    await me.enter(ckpt)
    await (await ckpt.save(1, me.sd)).committed
    for _ in range(reps):
        await me.enter(_tiered(root, me.empty(), replicate=False))
        await me.restore(S3)
    from object_store import raw_get, raw_put, storage_views
    from obstore.store import from_url

    store, key = from_url(root), f"raw/rank_{me.rank}.bin"
    await raw_put(store, key, storage_views(me.sd))
    for _ in range(reps):
        await _barrier()
        began = time.perf_counter()
        await raw_get(store, key, int(me.out["bytes"][0]))  # its bytes dropped at once
        me.out.setdefault(RAW_S3, []).append(time.perf_counter() - began)


def _worst(results: list[Results]) -> dict[str, list[float]]:
    """Per figure and rep, the max over the ranks (a restore ends when the last rank has)."""
    names = [k for k in results[0] if k != "bytes" and not k.endswith(": sources")]
    return {k: [max(r[k][i] for r in results) for i in range(len(results[0][k]))] for k in names}


def _sources(results: list[Results], name: str) -> str:
    """The source each rank restored from (the same in every rep, as every rank reported)."""
    codes = {int(c) for r in results for c in r[f"{name}: sources"]}
    assert len(codes) == 1, f"{name}: the sources changed between reps or ranks: {codes}"
    code = codes.pop()
    return " / ".join(_SOURCE_NAME[code // 10**r % 10] for r in range(len(results)))


def _report(results: list[Results], report: Report) -> None:
    n = results[0]["bytes"][0]
    worst = _worst(results)
    med = {k: statistics.median(v) for k, v in worst.items()}
    if DCP in med:  # restores were run (not --only-stalls)
        _restores(results, worst, med, report)
    stalls = [
        [k, f"{1e3 * min(worst[k]):.1f}", f"{1e3 * med[k]:.1f}", f"{1e3 * med[CPU + k]:.1f}"]
        for k in STALLS
        if k in med
    ]
    report.add(
        "training-visible stall of a save (staging), max over the ranks per save",
        ["save", "min ms", "median ms", "median CPU ms"],
        stalls,
    )
    report.figures["restore"] = {
        k: {"seconds": worst[k], "median_s": med[k], "bytes": n} for k in worst
    }
    report.ratios += _stall_ratios(med, worst)


def _restores(
    results: list[Results], worst: dict[str, list[float]], med: dict[str, float], report: Report
) -> None:
    """The restore table and the restore targets."""
    n = results[0]["bytes"][0]
    restores = [k for k in (MEMORY, LOCAL, DURABLE, S3, DCP, RAW_GLOO, RAW_S3) if k in med]
    rows = []
    for k in restores:
        used = "-" if k in (DCP, RAW_GLOO, RAW_S3) else _sources(results, k)
        rows.append([
            k, used, f"{min(worst[k]):.3f}", f"{med[k]:.3f}", f"{n / med[k] / GB:.2f}",
            f"{med[DCP] / med[k]:.2f}x",
        ])  # fmt: skip
    report.add(
        f"restore of {n / GB:.3f} GB per rank, 2 ranks, max over the ranks per rep",
        ["from", "source (rank 0 / rank 1)", "min s", "median s", "GB/s", "speed-up vs dcp.load"],
        rows,
    )
    out = [Ratio(f"restore from {MEMORY}: time vs the {RAW_GLOO}", med[MEMORY] / med[RAW_GLOO])]
    if S3 in med:
        out += [
            Ratio(f"restore from {MEMORY}: speed-up vs {S3}", med[S3] / med[MEMORY], 5.0),
            Ratio(f"restore from S3: time vs the {RAW_S3}", med[S3] / med[RAW_S3]),
            Ratio(f"the raw anchors' ceiling of that speed-up: {RAW_S3} / {RAW_GLOO}",
                  med[RAW_S3] / med[RAW_GLOO]),
        ]  # fmt: skip
    out += [
        Ratio(f"restore from {MEMORY}: speed-up vs {DCP}", med[DCP] / med[MEMORY], 1.5),
        Ratio(f"restore from {LOCAL}: speed-up vs {DCP}", med[DCP] / med[LOCAL]),
        Ratio(f"restore from {DURABLE}: speed-up vs {DCP}", med[DCP] / med[DURABLE]),
    ]
    report.ratios += out


def _paired(worst: dict[str, list[float]], ours: str, theirs: str) -> float:
    """The median of the per-turn ratios ``ours / theirs`` (the host's drift cancels in a turn)."""
    return statistics.median(a / b for a, b in zip(worst[ours], worst[theirs], strict=True))


def _stall_ratios(med: dict[str, float], worst: dict[str, list[float]]) -> list[Ratio]:
    """The stall target (the fast-tier save against today's plain save) and, with the held
    plain save (``--held``), what two buffers in turn cost it: the memory tier holds the newest
    copy while the next is staged, so fast-tier saves stage into two buffers in turn."""
    cpu = CPU + FAST_STALL
    out = [
        Ratio(f"{FAST_STALL} / {PLAIN_STALL}", med[FAST_STALL] / med[PLAIN_STALL], 1.0, False),
        Ratio(
            f"{FAST_STALL} / {PLAIN_STALL}, median of the per-turn ratios",
            _paired(worst, FAST_STALL, PLAIN_STALL),
            1.0,
            False,
        ),
        Ratio(f"{cpu} / the plain save's", med[cpu] / med[CPU + PLAIN_STALL]),
    ]
    if HELD_STALL in med:
        out += [
            Ratio(
                f"{FAST_STALL} / {HELD_STALL}, median of the per-turn ratios",
                _paired(worst, FAST_STALL, HELD_STALL),
            ),
            Ratio(
                f"{HELD_STALL} / {PLAIN_STALL}, median of the per-turn ratios",
                _paired(worst, HELD_STALL, PLAIN_STALL),
            ),
            Ratio(f"{cpu} / the held plain save's", med[cpu] / med[CPU + HELD_STALL]),
        ]
    return out


def _s3_bucket(report: Report) -> tuple[str, Any]:
    """A bucket on moto's S3 server in a child process (the environment the ranks inherit set
    here), and the server's context to leave; none without obstore and moto."""
    try:
        import boto3  # type: ignore[import-untyped]
        import obstore  # noqa: F401
        from object_store import s3_server
    except ImportError as exc:
        report.notes.append(f"no S3 row: {exc}")
        return "", None
    server = s3_server()
    env = server.__enter__()
    name = "restore-bench"
    boto3.client(
        "s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_REGION"],
    ).create_bucket(Bucket=name)  # fmt: skip
    return name, server


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="state per rank, GiB (1)")
    parser.add_argument("--reps", type=int, default=3, help="restores per source (3)")
    parser.add_argument("--no-s3", action="store_true", help="leave out the S3 durable root")
    parser.add_argument("--only-stalls", action="store_true", help="the save stalls alone")
    parser.add_argument(
        "--held", action="store_true",
        help="also a plain save whose last copy is held (two buffers in turn, as the fast tier)",
    )  # fmt: skip
    add_report_arguments(parser)
    args = parser.parse_args()
    report = start("restore", args)
    report.children = True
    report.shape = shapes.flat(args.gib).describe()
    stalls = ",".join(k for k, on in (("only", args.only_stalls), ("held", args.held)) if on)
    skip_s3 = args.no_s3 or args.only_stalls
    bucket, server = ("", None) if skip_s3 else _s3_bucket(report)
    try:
        results, report.background = run_spawned(
            "restore_", 2, _rank, args.gib, args.reps, bucket, stalls
        )
    finally:
        if server is not None:
            server.__exit__(None, None, None)
    _report(results, report)
    report.finish(args.json)


if __name__ == "__main__":
    main()
