"""Shared benchmark helpers: the seeded state dict, a loop-lag heartbeat, timing and tables."""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

from aiostage.testing import LoopLag, run_world

GB = 1e9
GIB = 1 << 30
VOCAB = 32000
LAYERS = 24
NORMS = 7


def hidden_for(gib: float) -> int:
    """Hidden size whose state dict holds about ``gib`` GiB: 912 for 1, 1888 for 4 (x16)."""
    a, b = 4 * LAYERS * 12, 4 * VOCAB  # bytes = a*h^2 + b*h (biases and norms are negligible)
    h = (-b + math.sqrt(b * b + 4 * a * gib * GIB)) / (2 * a)
    return max(16, math.ceil(h / 16) * 16)


def make_sd(gib: float, seed: int = 0) -> dict[str, Any]:
    """The baselines' state dict: 200 unique float32 tensors, a tied pair, a view, 4 values."""
    h, gen = hidden_for(gib), torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    sd: dict[str, Any] = {"embed.weight": rand(VOCAB, h)}
    for i in range(LAYERS):
        for name, rows, cols in (
            ("attn.qkv", 3 * h, h),
            ("attn.o", h, h),
            ("mlp.up", 4 * h, h),
            ("mlp.down", h, 4 * h),
        ):
            sd[f"layers.{i}.{name}.weight"] = rand(rows, cols)
            sd[f"layers.{i}.{name}.bias"] = rand(rows)
    for j in range(NORMS):
        sd[f"norms.{j}.weight"] = rand(h)
    sd["lm_head.weight"] = sd["embed.weight"]  # tied: the same object
    sd["layers.0.attn.q_view"] = sd["layers.0.attn.qkv.weight"][:h]  # a slice view
    sd.update(step=1234, lr=3e-4, tag="bench", sched={"last_epoch": 7, "milestones": [10, 20]})
    return sd


def tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nested dict / list / tuple, aliases included."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from tensors(v)


def unique_storages(obj: Any) -> list[torch.UntypedStorage]:
    """The distinct storages behind ``obj``'s tensors, in first-seen order."""
    seen: dict[int, torch.UntypedStorage] = {}
    for t in tensors(obj):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage())
    return list(seen.values())


def unique_bytes(obj: Any) -> int:
    """Bytes of the distinct storages behind ``obj``'s tensors (aliases counted once)."""
    return sum(s.nbytes() for s in unique_storages(obj))


def percentile_ms(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank) of ``samples`` in seconds, as ms."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return 1e3 * ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass
class Timing:
    """Per-rep wall times and loop lateness of one measured operation."""

    seconds: list[float] = field(default_factory=list)
    max_lag_ms: list[float] = field(default_factory=list)  # per rep
    lateness: list[float] = field(default_factory=list)  # pooled over reps, seconds

    @property
    def min(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def p99_ms(self) -> float:
        return percentile_ms(self.lateness, 99)


@dataclass
class Case:
    """One contender: ``await op()`` is timed under a ``LoopLag``; ``before``/``after`` are not."""

    name: str
    op: Callable[[], Awaitable[Any]]
    before: Callable[[], Awaitable[None]] | None = None
    after: Callable[[Any], Awaitable[None]] | None = None
    timing: Timing = field(default_factory=Timing)


async def run_rounds(cases: Sequence[Case], reps: int) -> None:
    """``reps`` rounds, each case once per round, so drift on a shared machine hits all alike."""
    for _ in range(reps):
        for case in cases:
            if case.before is not None:
                await case.before()
            async with LoopLag() as lag:
                began = time.perf_counter()
                result = await case.op()
                case.timing.seconds.append(time.perf_counter() - began)
            case.timing.max_lag_ms.append(lag.max_ms)
            case.timing.lateness.extend(lag.lateness)
            if case.after is not None:
                await case.after(result)
            del result


async def measure(
    op: Callable[[], Awaitable[Any]],
    reps: int,
    *,
    before: Callable[[], Awaitable[None]] | None = None,
    after: Callable[[Any], Awaitable[None]] | None = None,
) -> Timing:
    """Time ``await op()`` ``reps`` times in a row (see ``Case``); min and median via ``Timing``."""
    case = Case("", op, before, after)
    await run_rounds([case], reps)
    return case.timing


@dataclass(frozen=True)
class CpuSnapshot:
    """Wall clock, machine-wide busy CPU seconds and this process's CPU seconds."""

    wall: float
    busy: float
    own: float

    @classmethod
    def now(cls, children: bool = False) -> CpuSnapshot:
        """``children``: count this process's ended children (spawned ranks) as its own."""
        s, p = psutil.cpu_times(), psutil.Process().cpu_times()
        busy = s.user + s.nice + s.system + s.irq + s.softirq + s.steal
        own = p.user + p.system + (p.children_user + p.children_system if children else 0.0)
        return cls(time.perf_counter(), busy, own)

    def others_since(self, start: CpuSnapshot) -> str:
        """How busy other processes kept the CPUs between ``start`` and this snapshot."""
        wall, others = self.wall - start.wall, (self.busy - start.busy) - (self.own - start.own)
        cores = psutil.cpu_count() or 1
        return (
            f"other processes used {others:.1f} CPU-s over {wall:.1f} s "
            f"(mean {others / wall:.2f} of {cores} cores); figures are only clean near 0"
        )


def run_spawned(prefix: str, world: int, rank_fn: Any, *args: Any) -> tuple[list[Any], str]:
    """``rank_fn(rank, world, *args, tmp)`` in a spawned gloo world, ``tmp`` a scratch directory
    under bench/out; the ranks' results and the background-CPU line to print."""
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=prefix, dir=out) as tmp:
        start = CpuSnapshot.now(children=True)
        results = run_world(rank_fn, world, *args, tmp, timeout=1200)
    return results, "background: " + CpuSnapshot.now(children=True).others_since(start)


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
