"""Repeated runs: each run's figure for aiostage beside the raw transfer's in the same run, their
difference or ratio, and the median and worst of it over ``--runs K`` (one noisy run never
decides); and the loop-stall samples of ``LoopLag(stalls=...)`` as a table."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .report import Ratio, Report


@dataclass(frozen=True)
class Figure:
    """One run's ``what``: aiostage's figure (``ours``), the raw transfer's in the same run
    (``raw``), and ``value`` (their difference or ratio) held to ``target``."""

    what: str
    ours: float
    raw: float
    value: float
    target: float | None = None
    at_least: bool = True
    unit: str = "x"


def add_runs(report: Report, runs: Sequence[Sequence[Figure]]) -> None:
    """A table of every run's figures, and the median and worst of each over the runs as ratios
    (the median against the target; the worst for information)."""
    rows = [
        [i + 1, f.what, f"{f.ours:.2f}", f"{f.raw:.2f}", f"{f.value:.2f}{f.unit}"]
        for i, run in enumerate(runs)
        for f in run
    ]
    report.add(
        f"per run ({len(runs)}): aiostage beside the raw transfer in the same run",
        ["run", "figure", "aiostage", "raw", "difference / ratio"],
        rows,
    )
    for first in runs[0]:
        values = [f.value for run in runs for f in run if f.what == first.what]
        worst = min(values) if first.at_least else max(values)
        median = statistics.median(values)
        n = len(values)
        report.ratios.append(
            Ratio(
                f"{first.what}, median of {n} runs",
                median,
                first.target,
                first.at_least,
                first.unit,
            )
        )
        report.ratios.append(Ratio(f"{first.what}, worst of {n} runs", worst, unit=first.unit))
    report.figures["runs"] = [[f.__dict__ for f in run] for run in runs]


def merge_stalls(samples: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Stall samples (``stalls_seen``) added up, over ranks and runs."""
    total: dict[str, Any] = {
        "samples": 0,
        "loop": Counter(),
        "owners": Counter(),
        "others": Counter(),
    }
    for s in samples:
        total["samples"] += s["samples"]
        for kind in ("loop", "owners", "others"):
            total[kind].update(s[kind])
    return total


def stalls_seen(stalls: Any) -> dict[str, Any]:
    """A ``LoopLag``'s ``stalls`` as plain data (from a rank)."""
    return {
        "samples": stalls.samples,
        "loop": dict(stalls.loop),
        "owners": dict(stalls.owners),
        "others": dict(stalls.others),
    }


def add_stalls(report: Report, title: str, merged: Mapping[str, Any], top: int = 8) -> None:
    """The stall samples as a table: where the loop thread was while a heartbeat was overdue."""
    n = max(merged["samples"], 1)
    names = {
        "loop": "loop thread at",
        "owners": "innermost aiostage frame",
        "others": "other threads at",
    }
    rows = [
        [names[kind], where, count, f"{100 * count / n:.0f}%"]
        for kind in ("loop", "owners", "others")
        for where, count in Counter(merged[kind]).most_common(top)
    ]
    report.add(f"{title} ({merged['samples']} samples)", ["who", "where", "samples", "share"], rows)
    report.figures.setdefault("stalls", {})[title] = {
        k: dict(v) if isinstance(v, Counter) else v for k, v in merged.items()
    }
