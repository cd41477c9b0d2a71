"""A bench's report: tables, ratios against the issues' targets (PASS / MISS), the machine and
background lines, printed as markdown and written as JSON (``--json``) for ``scripts/bench``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import machine as mach
from .timing import Timing

GB = 1e9


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass(frozen=True)
class Ratio:
    """A figure against its target: ``value >= target`` (``at_least``) or ``<=``; no target:
    information only."""

    what: str
    value: float
    target: float | None = None
    at_least: bool = True
    unit: str = "x"

    @property
    def verdict(self) -> str:
        if self.target is None:
            return "info"
        ok = self.value >= self.target if self.at_least else self.value <= self.target
        return "PASS" if ok else "MISS"

    def line(self) -> str:
        value = f"{self.value:.2f}{self.unit}"
        if self.target is None:
            return f"- {self.what}: {value}"
        op = ">=" if self.at_least else "<="
        target = f"{self.target:g}" if self.unit == "x" else f"{self.target:.2f}"
        return f"- {self.what}: {value} (target {op} {target}{self.unit}) {self.verdict}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "what": self.what,
            "value": self.value,
            "target": self.target,
            "at_least": self.at_least,
            "unit": self.unit,
            "verdict": self.verdict,
        }


def speedup(what: str, ours: Timing, theirs: Timing, target: float | None) -> Ratio:
    """``theirs / ours`` by median time: how many times faster aiostage is."""
    return Ratio(what, theirs.median / ours.median, target)


@dataclass
class Report:
    """What one bench run found; ``finish`` prints it and writes its JSON."""

    bench: str
    argv: list[str]
    shape: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=mach.machine)
    before: dict[str, Any] = field(default_factory=mach.background_before)
    sections: list[tuple[str, str]] = field(default_factory=list)  # (title, markdown)
    ratios: list[Ratio] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)  # raw figures by group and contender
    traces: dict[str, dict[str, Any]] = field(default_factory=dict)  # timelines by picture
    background: str = ""
    children: bool = False  # count spawned ranks' CPU as this bench's own
    cpu: mach.CpuSnapshot = field(default_factory=mach.CpuSnapshot.now)

    def add(self, title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        """A table, under ``title``."""
        self.sections.append((title, table(header, rows)))

    def add_timings(self, group: str, by: dict[str, Timing], nbytes: int) -> None:
        """Keep ``by``'s raw figures (and GB/s) under ``group``."""
        self.figures[group] = {
            name: {**t.as_dict(), "bytes": nbytes, "gb_per_s": nbytes / GB / t.median}
            for name, t in by.items()
            if t.seconds
        }

    def markdown(self) -> str:
        """The whole report as markdown."""
        head = f"## {self.bench} {' '.join(self.argv)}".rstrip()
        parts = [head, shape_line(self.shape), mach.machine_line(self.machine)]
        parts.append(mach.background_line(self.before))
        parts += [f"### {title}\n\n{body}" for title, body in self.sections]
        if self.ratios:
            parts.append(
                "### ratios against the targets\n\n" + "\n".join(r.line() for r in self.ratios)
            )
        parts += self.notes
        if self.background:
            parts.append(self.background)
        return "\n\n".join(p for p in parts if p)

    def as_dict(self) -> dict[str, Any]:
        return {
            "bench": self.bench,
            "argv": self.argv,
            "shape": self.shape,
            "machine": self.machine,
            "before": self.before,
            "sections": [{"title": t, "markdown": m} for t, m in self.sections],
            "ratios": [r.as_dict() for r in self.ratios],
            "notes": self.notes,
            "figures": self.figures,
            "traces": self.traces,
            "background": self.background,
        }

    def finish(self, json_path: str | None) -> None:
        """Print the report; write its JSON to ``json_path`` if given."""
        if not self.background:
            now = mach.CpuSnapshot.now(children=self.children)
            self.background = "background during the run: " + now.others_since(self.cpu)
        print("\n" + self.markdown(), flush=True)
        if json_path:
            Path(json_path).write_text(json.dumps(self.as_dict()))


def shape_line(shape: dict[str, Any]) -> str:
    """The shape a report measured, in one line (empty for benches without one)."""
    if not shape:
        return ""
    return (
        f"shape: {shape['shape']} ({shape['detail']}): {shape['params']} parameters, "
        f"{shape['tensors']} tensors, {shape['unique_bytes'] / GB:.3f} GB unique"
    )


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    """``--json PATH`` (the raw figures, for ``scripts/bench``) and ``--background-s``."""
    p.add_argument("--json", metavar="PATH", help="also write the report's raw figures here")
    p.add_argument(
        "--background-s",
        type=float,
        default=1.0,
        help="how long to watch other processes' CPU use before starting (default 1)",
    )


def start(bench: str, args: argparse.Namespace) -> Report:
    """A report for ``bench``, with the machine described and the background measured now,
    before anything runs; its command line is this process's, less ``--json``."""
    argv = sys.argv[1:]
    shown = [a for i, a in enumerate(argv) if a != "--json" and (i == 0 or argv[i - 1] != "--json")]
    return Report(bench, shown, before=mach.background_before(args.background_s))
